"""The trust bundle on a live mesh (`meshtrust up`: the CA, agents, real Envoy sidecars, STRICT
mTLS) while ``a`` calls ``b`` in a loop: adding root B reaches every running agent's Envoy
(SDS ``ROOTCA``), py-spiffe over the Workload API and the files; ``ca rotation status`` shows
nobody behind but the workload that is down, until it returns; the CA killed and restarted
keeps the bundle version; not one request fails."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import spiffe
from cryptography import x509

from meshtrust.envoy import EnvoyAdmin
from meshtrust.mesh import MeshState
from meshtrust.pki import load_certs_pem
from tests.mesh_helpers import (
    APP,
    agent_status,
    envoy_serial,
    http_get,
    meshtrust,
    running_mesh,
    upstream_port,
    write_mesh,
)
from tests.waiting import until

pytestmark = pytest.mark.slow

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""
C_ID = "spiffe://cluster.local/ns/default/sa/c"


@dataclass
class Load:
    """``a`` calling ``b`` through its sidecar, one request after another."""

    port: int
    ok: int = 0
    failed: int = 0
    last_failure: str = ""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = http_get(self.port, timeout=10)[0]
            except OSError as exc:
                status, self.last_failure = 0, repr(exc)
            if status == 200:
                self.ok += 1
            else:
                self.failed += 1
                self.last_failure = self.last_failure or f"HTTP {status}"
            self._stop.wait(0.02)

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=30)


@dataclass
class Relaunch:
    """A process of the mesh stopped by the test, to be started again as it was."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: str
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def stop(cls, pid: int, log: str, sig: signal.Signals = signal.SIGTERM) -> Relaunch:
        proc = Path(f"/proc/{pid}")
        argv = proc.joinpath("cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        env = dict(
            item.split(b"=", 1)
            for item in proc.joinpath("environ").read_bytes().split(b"\0")
            if b"=" in item
        )
        found = cls(
            [a.decode() for a in argv],
            {k.decode(): v.decode() for k, v in env.items()},
            os.readlink(proc / "cwd"),
            log,
        )
        os.kill(pid, sig)
        until(lambda: not _alive(pid), timeout=60, what=f"pid {pid} gone")
        return found

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT
            )

    def end(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rotation_status(ca_dir: Path, home: Path) -> dict[str, Any]:
    done = meshtrust("ca", "rotation", "status", "--ca-dir", str(ca_dir), "-o", "json", home=home)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert isinstance(doc, dict)
    return doc


def envoy_roots(mesh: MeshState, service: str) -> list[x509.Certificate]:
    """The roots in the ROOTCA secret the running Envoy of ``service`` holds."""
    try:
        admin = agent_status(mesh, service)["envoy"]["admin"]
        status, body = EnvoyAdmin.at(admin).get(
            "/config_dump?resource=dynamic_active_secrets", timeout=5
        )
    except OSError:
        return []
    assert status == 200, body
    for entry in json.loads(body)["configs"]:
        secret = entry.get("secret", {})
        if secret.get("name") == "ROOTCA":
            inline = secret["validation_context"]["trusted_ca"]["inline_bytes"]
            return load_certs_pem(base64.b64decode(inline))
    return []


def spiffe_roots(mesh: MeshState, service: str) -> set[x509.Certificate]:
    client = spiffe.WorkloadApiClient(f"unix://{mesh.service(service).workload_socket}")
    try:
        bundles = client.fetch_x509_bundles()
        found = bundles.get_bundle_for_trust_domain(spiffe.TrustDomain("cluster.local"))
        assert found is not None
        return set(found.x509_authorities)
    finally:
        client.close()


def file_roots(mesh: MeshState, service: str, name: str) -> list[x509.Certificate]:
    try:
        return load_certs_pem((Path(mesh.service(service).cert_dir) / name).read_bytes())
    except (OSError, ValueError):
        return []


def test_adding_a_root_reaches_every_output_and_status_shows_who_is_behind(
    tmp_path: Path,
) -> None:
    path = write_mesh(
        tmp_path,
        [
            {"name": "a", "upstreams": [{"service": "b"}]},
            {"name": "b", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
            {"name": "c", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
        ],
        STRICT,
        cert_ttl="1h",
    )
    ca_dir, home = tmp_path / "work" / "ca", tmp_path / "home"
    # Root B: another CA directory's root (a rotation would sign under it next).
    made = meshtrust(
        "ca", "init", "--dir", str(tmp_path / "ca-b"), "--trust-domain", "cluster.local", home=home
    )
    assert made.returncode == 0, made.stderr
    root_b = load_certs_pem((tmp_path / "ca-b" / "root-cert.pem").read_bytes())[0]
    relaunched: list[Relaunch] = []
    with running_mesh(path) as mesh:
        root_a = load_certs_pem((ca_dir / "root-cert.pem").read_bytes())[0]
        try:
            until(lambda: http_get(upstream_port(mesh, "a", "b"))[0] == 200, timeout=60)
            until(
                lambda: rotation_status(ca_dir, home)["workloads"] == 3,
                timeout=60,
                what="every agent reported bundle version 1",
            )
            first = rotation_status(ca_dir, home)
            assert first["bundle"]["version"] == 1 and first["behind"] == []
            load = Load(upstream_port(mesh, "a", "b"))
            with load.running():
                c_agent = Relaunch.stop(mesh.service("c").agent_pid, mesh.service("c").agent_log)
                relaunched.append(c_agent)
                serial_a = envoy_serial(mesh, "a")

                added = meshtrust(
                    "ca", "bundle", "add-root", str(tmp_path / "ca-b" / "root-cert.pem"),
                    "--ca-dir", str(ca_dir), "--why", "rotation test", home=home,
                )  # fmt: skip
                assert added.returncode == 0, added.stderr
                assert "trust bundle version 2" in added.stdout
                for service in ("a", "b"):
                    until(
                        lambda s=service: envoy_roots(mesh, s) == [root_a, root_b],  # type: ignore[misc]
                        timeout=60,
                        what=f"{service}'s Envoy has A+B in ROOTCA",
                    )
                    assert spiffe_roots(mesh, service) == {root_a, root_b}
                    assert file_roots(mesh, service, "root-cert.pem") == [root_a, root_b]
                    assert file_roots(mesh, service, "bundle.pem") == [root_a, root_b]
                until(
                    lambda: (
                        [w["spiffe_id"] for w in rotation_status(ca_dir, home)["behind"]] == [C_ID]
                    ),
                    timeout=60,
                    what="a and b report version 2, c (down) is behind",
                )
                # The roots changed: a re-issued at once (its certificate lives an hour).
                until(lambda: envoy_serial(mesh, "a") not in (0, serial_a), timeout=60)

                # The CA killed and restarted: the bundle version is the ledger's.
                assert mesh.ca is not None
                ca = Relaunch.stop(mesh.ca.pid, mesh.ca.log, signal.SIGKILL)
                relaunched.append(ca)
                until(lambda: _port_free(mesh.ca.address), timeout=60, what="CA port free")  # type: ignore[union-attr]
                ca.start()
                c_agent.start()  # c returns, while the CA comes back
                until(
                    lambda: rotation_status(ca_dir, home)["behind"] == [],
                    timeout=120,
                    what="c is back and serves version 2",
                )
                until(lambda: envoy_roots(mesh, "c") == [root_a, root_b], timeout=60)
                assert rotation_status(ca_dir, home)["bundle"]["version"] == 2
                until(lambda: load.ok > 50, timeout=60, what="requests flowing")
            assert load.failed == 0, load.last_failure
            text = meshtrust("ca", "rotation", "status", "--ca-dir", str(ca_dir), home=home)
            assert text.returncode == 0, text.stderr
            assert "trust bundle version 2" in text.stdout
            assert "3 of 3 workload(s) serve this version" in text.stdout
        finally:
            for process in reversed(relaunched):
                process.end()


def _port_free(address: str) -> bool:
    import socket

    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            sock.bind((host, int(port)))
        except OSError:
            return False
    return True
