"""Prometheus for a local mesh: what ``meshtrust up`` writes under ``<workDir>/prometheus/``.

- ``targets.json``: Prometheus file-based service discovery (``file_sd_configs``), one
  target group per agent (its status port, scraped at ``/stats/prometheus``: the agent's
  metrics merged with its Envoy's) and one for the CA (``/metrics``). Each group sets
  ``job`` and ``__metrics_path__`` itself, so any scrape job reading the file scrapes each
  target right; agents also carry ``service``, ``pod`` (the service name: the article's
  alerts say ``{{ $labels.pod }}``) and ``spiffe_id``, and every target ``mesh`` (the trust
  domain).
- ``meshtrust-rules.yaml``: a copy of the shipped rules (``deploy/prometheus/``, packaged as
  ``meshtrust/mesh/prometheus-rules.yaml``), so the directory is complete on its own.
- ``prometheus.yml``: a ready configuration reading both:
  ``prometheus --config.file=<workDir>/prometheus/prometheus.yml``.

:func:`targets` and :func:`config_text` are pure (the plan in, documents out);
:func:`write_prometheus_files` writes them. With hosts, each host's ``up`` writes its own
share (its agents, and the CA on the CA's host) under ``<workDir>/<host>/prometheus/``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import yaml

from meshtrust.fileio import ensure_private_dir, write_file_atomic
from meshtrust.mesh.plan import MeshPlan

__all__ = [
    "AGENT_JOB",
    "CA_JOB",
    "RULES_FILE",
    "config_text",
    "prometheus_dir",
    "shipped_rules",
    "targets",
    "write_prometheus_files",
]

AGENT_JOB = "meshtrust-agent"
CA_JOB = "meshtrust-ca"
RULES_FILE = "meshtrust-rules.yaml"

#: How often the written prometheus.yml scrapes and evaluates: short enough to watch the
#: quickstart's one-minute certificates rotate.
SCRAPE_INTERVAL = "5s"


def prometheus_dir(plan: MeshPlan) -> Path:
    return plan.work_dir / "prometheus"


def targets(plan: MeshPlan) -> list[dict[str, object]]:
    """The file-SD target groups of ``plan``: every agent, then the CA when it runs here."""
    mesh = str(plan.config.trust_domain)
    out: list[dict[str, object]] = [
        {
            "targets": [svc.status_listen],
            "labels": {
                "job": AGENT_JOB,
                "__metrics_path__": "/stats/prometheus",
                "mesh": mesh,
                "service": svc.spec.name,
                "pod": svc.spec.name,
                "spiffe_id": str(svc.spec.spiffe_id),
            },
        }
        for svc in plan.services
    ]
    if plan.ca_metrics is not None:
        out.append(
            {
                "targets": [plan.ca_metrics],
                "labels": {"job": CA_JOB, "__metrics_path__": "/metrics", "mesh": mesh},
            }
        )
    return out


def config_text(directory: Path, interval: str = SCRAPE_INTERVAL) -> str:
    """A ``prometheus.yml`` scraping the targets in ``directory`` and loading its rules."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(directory / RULES_FILE)],
        "scrape_configs": [
            {
                "job_name": "meshtrust",
                "file_sd_configs": [
                    {"files": [str(directory / "targets.json")], "refresh_interval": "10s"}
                ],
            }
        ],
    }
    head = (
        "# Written by `meshtrust up` (docs/observability.md): every agent and the CA, and\n"
        "# meshtrust's alert rules. Run: prometheus --config.file=THIS_FILE\n"
    )
    return head + yaml.safe_dump(config, sort_keys=False)


def shipped_rules() -> bytes:
    """The alert and recording rules (``deploy/prometheus/meshtrust-rules.yaml``)."""
    return resources.files("meshtrust.mesh").joinpath("prometheus-rules.yaml").read_bytes()


def write_prometheus_files(plan: MeshPlan) -> Path:
    """Write ``targets.json``, the rules and ``prometheus.yml``; return their directory.
    Raises :class:`OSError` (the launcher names the path)."""
    directory = prometheus_dir(plan)
    ensure_private_dir(directory, tighten=True)
    # Atomically: a running Prometheus re-reads targets.json when it changes.
    write_file_atomic(directory / RULES_FILE, shipped_rules())
    body = json.dumps(targets(plan), indent=2) + "\n"
    write_file_atomic(directory / "targets.json", body.encode())
    write_file_atomic(directory / "prometheus.yml", config_text(directory).encode())
    return directory
