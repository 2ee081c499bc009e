"""The shipped alert rules under a real ``promtool`` (check + unit tests), and what
``meshtrust up`` writes for Prometheus: file-SD targets and a ``prometheus.yml`` that
``promtool check config`` accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust.mesh import plan_mesh
from meshtrust.mesh.prometheus import (
    AGENT_JOB,
    CA_JOB,
    config_text,
    prometheus_dir,
    shipped_rules,
    targets,
    write_prometheus_files,
)
from tests.test_mesh_plan import mesh_file, ports

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "meshtrust-rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "meshtrust-rules.test.yaml"


def prometheus_binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; where missing the test *fails* with the
    hint (as the PostgreSQL tests do) rather than skip."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: run scripts/system-packages "
            "(Debian: apt-get install prometheus)",
            pytrace=False,
        )
    return found


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    promtool = prometheus_binary("promtool")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_checks_the_rules() -> None:
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = _promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_articles_rules_are_there_as_it_wrote_them() -> None:
    rules = {
        r.get("alert") or r["record"]: r
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for r in group["rules"]
    }
    expiring = rules["CertificateExpiringSoon"]
    assert "istio_certificate_expiration_timestamp_seconds - time() < 12 * 3600" in expiring["expr"]
    failed = rules["CertificateRotationFailed"]
    assert "istio_agent_certificate_rotation_failure_total" in failed["expr"]
    assert failed["expr"].endswith("> 0") and failed["for"] == "5m"
    assert failed["labels"] == {"severity": "critical"}
    assert failed["annotations"]["summary"] == "Certificate rotation failed for {{ $labels.pod }}"
    rate = rules["certificate_rotation_rate"]["expr"]
    assert rate == "rate(istio_agent_certificate_rotation_success_total[1h])"
    assert {
        "CertificateRenewalOverdue",
        "CaCertChainExpiringSoon",
        "CaRootCertExpiringSoon",
        "CaUnreachable",
        "CrlStale",
    } <= set(rules)


def test_the_packaged_rules_are_the_shipped_ones() -> None:
    """``meshtrust up`` copies the packaged rules; they must be deploy/'s, byte for byte."""
    assert shipped_rules() == RULES.read_bytes()


def test_targets_cover_every_agent_and_the_ca(tmp_path: Path) -> None:
    from meshtrust.mesh import load_mesh_config

    plan = plan_mesh(load_mesh_config(mesh_file(tmp_path)), ports(40001, 40002, 40003, 40004))
    groups: list[dict[str, Any]] = targets(plan)
    by_job = {(g["labels"]["job"], g["labels"].get("service")): g for g in groups}
    web = by_job[(AGENT_JOB, "web")]
    assert web["targets"] == [plan.service("web").status_listen]
    assert web["labels"] == {
        "job": AGENT_JOB,
        "__metrics_path__": "/stats/prometheus",
        "mesh": "cluster.local",
        "service": "web",
        "pod": "web",
        "spiffe_id": "spiffe://cluster.local/ns/default/sa/web",
    }
    assert (AGENT_JOB, "db-main") in by_job
    ca = by_job[(CA_JOB, None)]
    assert ca["targets"] == [plan.ca_metrics]
    assert ca["labels"] == {"job": CA_JOB, "__metrics_path__": "/metrics", "mesh": "cluster.local"}
    assert len(groups) == 3


def test_written_files_pass_promtool_check_config(tmp_path: Path) -> None:
    from meshtrust.mesh import load_mesh_config

    plan = plan_mesh(load_mesh_config(mesh_file(tmp_path)), ports(40001, 40002, 40003, 40004))
    directory = write_prometheus_files(plan)
    assert directory == plan.work_dir / "prometheus"
    assert json.loads((directory / "targets.json").read_text()) == targets(plan)
    assert (directory / "prometheus.yml").read_text() == config_text(directory)
    done = _promtool("check", "config", str(directory / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_each_host_writes_its_own_share(tmp_path: Path) -> None:
    """Across hosts each host's `up` lists its own agents, and the CA only on the CA's host,
    under ``<workDir>/<host>/prometheus/``."""
    from tests.test_mesh_hosts import plan_for

    def share(host: str) -> set[tuple[str, str | None]]:
        groups: list[dict[str, Any]] = targets(plan_for(tmp_path, host))
        return {(g["labels"]["job"], g["labels"].get("service")) for g in groups}

    assert share("h1") == {(CA_JOB, None)}
    assert share("h2") == {(AGENT_JOB, "web")}
    assert share("h3") == {(AGENT_JOB, "api"), (AGENT_JOB, "db")}
    assert prometheus_dir(plan_for(tmp_path, "h3")) == tmp_path / "work" / "h3" / "prometheus"
