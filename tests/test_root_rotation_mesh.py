"""Root rotation of a live mesh (`meshtrust up`: the CA with its workers, agents, real Envoy
sidecars, STRICT mTLS) under load: ``a`` calls ``b`` (HTTP) and ``t`` (TCP, a new handshake per
call), ``b`` calls ``t``, in loops, throughout.

One mesh, one story: ``c`` and ``d`` are down when ``meshtrust ca rotate-root`` starts, so
phase 1 holds and the command stops naming them; ``c`` returns and the re-run with ``--force``
goes on without ``d`` only (named). While the command drives the phases, the CA is SIGKILLed
in the middle of each phase and restarted: each resumes from the ledger. Envoy and py-spiffe
see each bundle change; a certificate issued during the overlap verifies against old and new
peers (openssl); at the end no Envoy serves a chain to the old root, and not one call failed.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509

from meshtrust.ca import SqlLedger
from meshtrust.ca.rootrotation import Phase, RotationLedger
from meshtrust.clock import SystemClock
from meshtrust.envoy import EnvoyAdmin
from meshtrust.mesh import MeshState
from meshtrust.pki import load_certs_pem
from tests.mesh_helpers import (
    APP,
    agent_status,
    http_get,
    meshtrust,
    running_mesh,
    tcp_roundtrip,
    upstream_port,
    write_mesh,
)
from tests.test_trust_mesh import (
    Relaunch,
    _port_free,
    envoy_roots,
    rotation_status,
    spiffe_roots,
)
from tests.waiting import until

pytestmark = pytest.mark.slow

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""
RUNNING = ("a", "b", "t", "c")
C_ID = "spiffe://cluster.local/ns/default/sa/c"
D_ID = "spiffe://cluster.local/ns/default/sa/d"


def served_chain(mesh: MeshState, service: str) -> list[x509.Certificate]:
    """The chain ``service``'s Envoy presents (resource ``default``, from its config dump)."""
    admin = agent_status(mesh, service)["envoy"]["admin"]
    status, body = EnvoyAdmin.at(admin).get(
        "/config_dump?resource=dynamic_active_secrets", timeout=5
    )
    assert status == 200, body
    for secret in json.loads(body)["configs"]:
        if secret.get("name") == "default":
            chain = secret["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"]
            return x509.load_pem_x509_certificates(base64.b64decode(chain))
    return []


def issued_by(cert: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(root)
    except Exception:  # noqa: BLE001 - any failure means "not issued by it"
        return False
    return True


class Load(threading.Thread):
    """a -> b (HTTP), a -> t (TCP) and b -> t (TCP) every 30 ms; counts what failed, and why."""

    def __init__(self, ports: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.ports = ports
        self.calls = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.03):
            self.calls += 1
            at = f"{SystemClock().now():%H:%M:%S.%f}"
            try:
                status, _ = http_get(self.ports["a-b"], timeout=10)
                if status != 200:
                    self.failures.append(f"{at} a->b HTTP {status}")
                for name in ("a-t", "b-t"):
                    if tcp_roundtrip(self.ports[name], b"ping", timeout=10) != b"echo:ping":
                        self.failures.append(f"{at} {name} connection closed")
            except OSError as exc:
                self.failures.append(f"{at} {exc.__class__.__name__}: {exc}")


def openssl_verifies(leaf_chain: Path, roots: list[x509.Certificate], tmp: Path) -> bool:
    """``openssl verify`` of the leaf in ``leaf_chain`` (its intermediates untrusted) with
    ``roots`` as the trust anchors: a peer that trusts only those."""
    certs = load_certs_pem(leaf_chain.read_bytes())
    from meshtrust.pki import certs_pem

    (tmp / "leaf.pem").write_bytes(certs_pem(certs[:1]))
    (tmp / "untrusted.pem").write_bytes(certs_pem(certs[1:]))
    (tmp / "anchors.pem").write_bytes(certs_pem(roots))
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp / "anchors.pem"), "-untrusted",
         str(tmp / "untrusted.pem"), str(tmp / "leaf.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.returncode == 0


def test_root_rotation_of_a_live_mesh_fails_no_call(tmp_path: Path) -> None:
    path = write_mesh(
        tmp_path,
        [
            {"name": "a", "upstreams": [{"service": "b"}, {"service": "t"}]},
            {
                "name": "b",
                "command": ["python3", str(APP)],
                "env": {"CALL_EVERY": "0"},
                "upstreams": [{"service": "t"}],
            },
            {"name": "t", "protocol": "tcp", "command": ["python3", "tcp_echo.py"]},
            {"name": "c", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
            {"name": "d", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
        ],
        STRICT,
        cert_ttl="2m",
    )
    ca_dir, home = tmp_path / "work" / "ca", tmp_path / "home"
    relaunched: list[Relaunch] = []
    with running_mesh(path) as mesh:
        sql = SqlLedger(f"sqlite:///{ca_dir / 'ledger.db'}")
        rotations = RotationLedger(sql.engine)
        root_a = load_certs_pem((ca_dir / "root-cert.pem").read_bytes())[0]
        driver: subprocess.Popen[str] | None = None
        load = Load(
            {
                "a-b": upstream_port(mesh, "a", "b"),
                "a-t": upstream_port(mesh, "a", "t"),
                "b-t": upstream_port(mesh, "b", "t"),
            }
        )
        try:
            until(lambda: http_get(load.ports["a-b"])[0] == 200, timeout=60, what="a calls b")
            until(lambda: tcp_roundtrip(load.ports["b-t"]) == b"echo:ping", timeout=60)
            until(
                lambda: rotation_status(ca_dir, home)["workloads"] == 5,
                timeout=60,
                what="every agent reported bundle version 1",
            )
            load.start()
            c_agent = Relaunch.stop(mesh.service("c").agent_pid, mesh.service("c").agent_log)
            relaunched.append(c_agent)
            d_agent = Relaunch.stop(mesh.service("d").agent_pid, mesh.service("d").agent_log)
            relaunched.append(d_agent)

            # Phase 1 holds while c and d are down: the command stops, naming them.
            held = meshtrust(
                "ca", "rotate-root", "--ca-dir", str(ca_dir), "--timeout", "8", home=home
            )
            assert held.returncode == 1, held.stdout + held.stderr
            assert C_ID in held.stderr and D_ID in held.stderr, held.stderr
            assert "--force" in held.stderr
            status = rotation_status(ca_dir, home)["root_rotation"]
            assert status["phase"] == "publish" and not status["driver_alive"]
            assert {b["spiffe_id"] for b in status["behind"]} == {C_ID, D_ID}
            rec = rotations.current()
            assert rec is not None
            root_b = rec.new_root
            for service in ("a", "b", "t"):
                assert envoy_roots(mesh, service) == [root_a, root_b]
            assert spiffe_roots(mesh, "a") == {root_a, root_b}

            # The CA killed in phase 1; c returns; the re-run resumes, --force for d only.
            assert mesh.ca is not None
            ca_address = mesh.ca.address
            ca = Relaunch.stop(mesh.ca.pid, mesh.ca.log, signal.SIGKILL)
            relaunched.append(ca)
            until(lambda: _port_free(ca_address), timeout=60, what="CA port free")
            ca.start()
            c_agent.start()
            until(
                lambda: C_ID not in {b["spiffe_id"] for b in
                                     rotation_status(ca_dir, home)["root_rotation"]["behind"]},
                timeout=90, what="c is back and serves bundle A+B",
            )  # fmt: skip
            assert openssl_verifies(  # issued during the overlap: old and new peers accept it
                Path(mesh.service("c").cert_dir) / "cert-chain.pem", [root_a], tmp_path
            )
            assert openssl_verifies(
                Path(mesh.service("c").cert_dir) / "cert-chain.pem", [root_a, root_b], tmp_path
            )
            with open(tmp_path / "rotate-root.log", "w") as out:  # the child keeps its copy
                driver = subprocess.Popen(
                    [sys.executable, "-m", "meshtrust", "ca", "rotate-root", "--ca-dir",
                     str(ca_dir), "--force", "--timeout", "240"],
                    stdout=out, stderr=subprocess.STDOUT, text=True,
                    env={**os.environ, "MESHTRUST_HOME": str(home)},
                )  # fmt: skip

            # Each later phase: seen in the ledger, the CA SIGKILLed in it, and restarted.
            seen: list[Phase] = []
            for phase in (Phase.PREPARE, Phase.SIGN, Phase.DROP):
                until(
                    lambda p=phase: (r := rotations.current()) is not None and r.phase >= p,  # type: ignore[misc]
                    timeout=180,
                    what=f"phase {phase.name}",
                )
                current = rotations.current()
                assert current is not None
                if current.phase != phase:
                    continue  # passed while we looked (not expected: the CA is needed)
                if phase is Phase.DROP:
                    for service in ("a", "b", "t", "c"):  # phase 2 done: all on B
                        leaf = served_chain(mesh, service)
                        assert leaf and issued_by(leaf[-1], root_b), service
                assert ca.process is not None
                ca.process.send_signal(signal.SIGKILL)
                ca.process.wait(timeout=30)
                assert rotations.current().phase == phase  # type: ignore[union-attr]
                seen.append(phase)
                until(lambda: _port_free(ca_address), timeout=60, what="CA port free")
                ca.start()
            assert seen == [Phase.PREPARE, Phase.SIGN, Phase.DROP]
            assert driver.wait(timeout=240) == 0, (tmp_path / "rotate-root.log").read_text()
            log = (tmp_path / "rotate-root.log").read_text()
            assert f"--force: going on without {D_ID}" in log
            assert f"--force: going on without {C_ID}" not in log

            # The end: B alone everywhere, every Envoy presents a chain to B, none to A.
            for service in RUNNING:
                until(
                    lambda s=service: envoy_roots(mesh, s) == [root_b],  # type: ignore[misc]
                    timeout=60,
                    what=f"{service}'s Envoy trusts B alone",
                )
                chain = served_chain(mesh, service)
                assert issued_by(chain[-1], root_b) and not issued_by(chain[-1], root_a)
            assert spiffe_roots(mesh, "a") == {root_b}
            assert openssl_verifies(
                Path(mesh.service("a").cert_dir) / "cert-chain.pem", [root_b], tmp_path
            )
            calls = load.calls
            until(lambda: load.calls > calls + 20, timeout=60, what="calls go on")
            final = rotation_status(ca_dir, home)
            assert final["root_rotation"]["phase"] == "done"
            assert final["root_rotation"]["forced_without"] == [D_ID]
        finally:
            load.stop.set()
            if load.is_alive():
                load.join(timeout=30)
            if driver is not None and driver.poll() is None:
                driver.kill()
                driver.wait()
            for process in reversed(relaunched):
                process.end()
            sql.close()
        assert load.calls > 100
        assert load.failures == [], load.failures[:10]
