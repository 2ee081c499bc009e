"""The shipped rules on a live mesh, scraped by a real Prometheus server.

One mesh of two sidecars with 40-second certificates, and the ``prometheus.yml`` that
``meshtrust up`` wrote (only its intervals shortened to 1 s), on loopback with a temporary
data directory. While the CA runs, every target is up, the agents' merged
``/stats/prometheus`` carries their Envoys' stats and their CRL metrics, and the article's
rotation-rate recording rule is non-zero; once the CA is stopped, the expiry alert (a renewal
overdue) fires for both workloads, the CA-unreachable alert is raised and failed rotations
are counted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust.mesh import MeshState
from meshtrust.mesh.probes import alive
from tests.mesh_helpers import running_mesh, write_mesh
from tests.processes import free_port
from tests.test_prometheus_rules import prometheus_binary
from tests.waiting import until

pytestmark = pytest.mark.slow

STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
)


class Prometheus:
    """A Prometheus server's HTTP API on loopback."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> dict[str, float]:
        """``{pod or job: value}`` of an instant query."""
        result = self.get("/api/v1/query", query=expr)["data"]["result"]
        return {
            r["metric"].get("pod", r["metric"].get("job", "")): float(r["value"][1]) for r in result
        }

    def alerts(self, name: str) -> dict[str, str]:
        """``{pod or job: state}`` of the active alerts called ``name``."""
        alerts = self.get("/api/v1/alerts")["data"]["alerts"]
        return {
            a["labels"].get("pod", a["labels"].get("job", "")): a["state"]
            for a in alerts
            if a["labels"]["alertname"] == name
        }


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshState]:
    tmp = tmp_path_factory.mktemp("prom-mesh")
    path = write_mesh(
        tmp, [{"name": "a", "upstreams": [{"service": "b"}]}, {"name": "b"}], STRICT, "40s"
    )
    with running_mesh(path) as state:
        yield state


@pytest.fixture(scope="module")
def prometheus(mesh: MeshState, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("prometheus")
    written = Path(mesh.work_dir) / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(written.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] = "1s"
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(tmp / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                prometheus_binary("prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
    try:
        server = Prometheus(port)
        until(lambda: server.ready() or proc.poll() is not None, 60, "Prometheus ready")
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# One test, in phases: stopping the CA is for good, so no phase may run after it (and
# pytest-randomly would reorder separate tests).
def test_rules_on_a_live_mesh(mesh: MeshState, prometheus: Prometheus) -> None:
    scrapes_every_agent_and_the_ca(prometheus)
    rotation_rate_is_non_zero_while_rotations_happen(prometheus)
    stopping_the_ca_fires_the_expiry_alert(mesh, prometheus)


def scrapes_every_agent_and_the_ca(prometheus: Prometheus) -> None:
    def all_up() -> bool:
        return prometheus.query("up") == {"a": 1.0, "b": 1.0, "meshtrust-ca": 1.0}

    until(all_up, 60, f"every target up (targets: {prometheus.get('/api/v1/targets')})")
    # The article's names and Istio's, from each agent; Envoy's, merged into the same scrape.
    for expr in (
        "istio_certificate_expiration_timestamp_seconds",
        "istio_agent_cert_expiry_seconds",
        'envoy_server_live{job="meshtrust-agent"}',
    ):
        until(lambda e=expr: set(prometheus.query(e)) == {"a", "b"}, 30, expr)  # type: ignore[misc]
    assert set(prometheus.query("citadel_server_cert_chain_expiry_seconds")) == {"meshtrust-ca"}
    # The CRL the agents follow from the CA: held, fresh.
    until(
        lambda: (
            set(prometheus.query("meshtrust_agent_crl_next_update_timestamp_seconds")) == {"a", "b"}
        ),
        30,
        "the agents' CRL metrics",
    )
    assert prometheus.query("meshtrust_agent_crl_stale") == {"a": 0.0, "b": 0.0}


def rotation_rate_is_non_zero_while_rotations_happen(prometheus: Prometheus) -> None:
    # 40 s certificates renew about every 20 s: the 1h rate sees an increase after the first.
    def both_rotating() -> bool:
        rates = prometheus.query("certificate_rotation_rate")
        return set(rates) == {"a", "b"} and all(v > 0 for v in rates.values())

    until(both_rotating, 90, "certificate_rotation_rate > 0 for a and b")
    assert prometheus.alerts("CertificateRenewalOverdue") == {}


def stopping_the_ca_fires_the_expiry_alert(mesh: MeshState, prometheus: Prometheus) -> None:
    assert mesh.ca is not None
    ca_pid = mesh.ca.pid
    os.kill(ca_pid, signal.SIGTERM)
    until(lambda: not alive(ca_pid), 30, "the CA stopped")
    until(
        lambda: prometheus.alerts("CaUnreachable").get("meshtrust-ca") in ("pending", "firing"),
        30,
        "CaUnreachable raised",
    )
    # The last certificate was issued at most ~20 s before the stop; it has a quarter of its
    # 40 s left at most 30 s after, when the alert fires (no `for:`).
    until(
        lambda: prometheus.alerts("CertificateRenewalOverdue") == {"a": "firing", "b": "firing"},
        90,
        "CertificateRenewalOverdue firing for a and b",
    )
    failed = prometheus.query("istio_agent_certificate_rotation_failure_total")
    assert set(failed) == {"a", "b"} and all(v > 0 for v in failed.values()), failed
