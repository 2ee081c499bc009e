"""The mesh-wide `meshtrust check` against a real CA process with a plugged-in chain (no
root key): its `signing CA chain` step warns exactly when the CA itself does (log line and
gauge), and passes when the chain is far from expiry."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from meshtrust.ca import init_ca_dir
from meshtrust.clock import SystemClock
from meshtrust.mesh.state import CaState, MeshState, write_state
from meshtrust.spiffe import TrustDomain
from tests.processes import CaProcess, run_cli

pytestmark = pytest.mark.slow

TD = "example.org"
DAY = dt.timedelta(days=1)


def _plugged_in_ca(tmp_path: Path, made: dt.datetime, lifetime: dt.timedelta) -> Path:
    """A CA directory whose intermediate was made at ``made`` and lives ``lifetime``, with
    the root key moved away: the CA cannot rotate it."""
    ca_dir = tmp_path / "ca"
    init_ca_dir(ca_dir, TrustDomain.parse(TD), made, intermediate_lifetime=lifetime)
    (ca_dir / "root-key.pem").unlink()
    return ca_dir


def _state(tmp_path: Path, ca: CaProcess) -> MeshState:
    """What `meshtrust up` records of a mesh whose CA is ``ca`` (no workloads)."""
    return MeshState(
        mesh_file=str(tmp_path / "mesh.yaml"),
        work_dir=str(tmp_path / "work"),
        trust_domain=TD,
        cert_ttl_seconds=600,
        ca=CaState(
            pid=ca.proc.pid,
            address=ca.address,
            metrics=f"127.0.0.1:{ca.metrics_port}",
            ca_dir=str(ca.ca_dir),
            log=str(ca.log_path),
        ),
        services=[],
        ca_address=ca.address,
        root_cert=str(ca.ca_dir / "root-cert.pem"),
    )


@pytest.mark.parametrize(
    ("made_ago", "lifetime", "verdict", "gauge"),
    [
        # 11-day intermediate with a day left: past the activation point a rotating CA
        # would have used (lifetime/6 before NotAfter), not yet its last day: level 2.
        (10 * DAY, 11 * DAY, "WARN", 2),
        (DAY, 365 * DAY, "PASS", 0),
    ],
)
def test_check_shows_the_plugged_in_chain_warning_of_a_running_ca(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    made_ago: dt.timedelta,
    lifetime: dt.timedelta,
    verdict: str,
    gauge: int,
) -> None:
    made = SystemClock().now() - made_ago
    ca_dir = _plugged_in_ca(tmp_path, made, lifetime)
    ca = CaProcess(ca_dir, "--trust-domain", TD)
    try:
        ca.wait_ready()
        monkeypatch.setenv("MESHTRUST_HOME", str(tmp_path / "home"))
        (tmp_path / "work").mkdir(mode=0o700)
        write_state(_state(tmp_path, ca))  # `check` finds the mesh started last

        result = run_cli("check", "-o", "json")
        assert result.returncode == 0, result.stdout + result.stderr  # a WARN is no FAIL
        report = json.loads(result.stdout)
        steps = {s["id"]: s for s in report["ca"]["steps"]}
        assert [s["id"] for s in report["ca"]["steps"]] == ["ca", "root", "signing-chain"]
        assert (steps["ca"]["verdict"], steps["root"]["verdict"]) == ("PASS", "PASS")
        chain = steps["signing-chain"]
        assert chain["verdict"] == verdict, chain
        not_after = made + lifetime
        metrics = ca.metrics()
        assert f"meshtrust_ca_chain_expiry_warning {gauge}" in metrics
        if verdict == "WARN":
            # The CA's own warning (logged at start), said the same way by `check`.
            assert f"signing CA chain expires at {not_after:%Y-%m-%d %H:%M}" in chain["detail"]
            assert "warning" in chain["detail"] and "days left" in chain["detail"]
            assert "no root key" in chain["hint"] and "meshtrust ca rotate-root" in chain["hint"]
            assert f"{chain['detail']}: {chain['hint']}" in ca.log()
        else:
            assert f"NotAfter {not_after:%Y-%m-%dT%H:%M}" in chain["detail"]
            assert "plugged-in CA (no root key)" in chain["detail"] and chain["hint"] is None
            assert "signing CA chain expires" not in ca.log()

        table = run_cli("check")
        assert table.returncode == 0, table.stdout + table.stderr
        assert "signing CA chain" in table.stdout
        if verdict == "WARN":
            assert "WARN signing CA chain: this CA has no root key" in table.stdout
    finally:
        ca.stop()
