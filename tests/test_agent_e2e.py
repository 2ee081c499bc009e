"""The whole chain as a user runs it: ``meshtrust ca serve`` + ``meshtrust agent`` + the real
Envoy, with real TLS; and py-spiffe's own client against the agent's Workload API."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import spiffe
from cryptography import x509

from meshtrust.envoy import EnvoyProcess
from meshtrust.pki import load_private_key_pem
from tests.badcerts import Leaf
from tests.envoy_helpers import WAIT, https_get, sidecar_bootstrap, uri_sans
from tests.processes import MESHTRUST, CaProcess, free_port, run_cli
from tests.waiting import eventually

pytestmark = pytest.mark.slow

SERVER = "spiffe://example.org/ns/default/sa/server"


@dataclass
class Stack:
    work: Path
    ca: CaProcess
    root: x509.Certificate
    client: Leaf

    def start_agent(self, ttl: str = "8s") -> AgentProcess:
        return AgentProcess(self, ttl)


class AgentProcess:
    def __init__(self, stack: Stack, ttl: str) -> None:
        self.status_port = free_port()
        self.sds = stack.work / "sds.sock"
        self.workload = stack.work / "workload.sock"
        self.certs = stack.work / "certs"
        self.log_path = stack.work / f"agent-{self.status_port}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                *MESHTRUST,
                "agent",
                "--ca-address",
                stack.ca.address,
                "--ca-root",
                str(stack.ca.ca_dir / "root-cert.pem"),
                "--token-file",
                str(stack.work / "server.token"),
                "--sds-socket",
                str(self.sds),
                "--workload-socket",
                str(self.workload),
                "--output-dir",
                str(self.certs),
                "--cert-ttl",
                ttl,
                "--status-listen",
                f"127.0.0.1:{self.status_port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        import time

        end = time.monotonic() + 30
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log()
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.status_port}/healthz/ready", timeout=1
                ) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready:\n{self.log()}")

    def serial(self) -> int:
        """The serial the agent serves now (from its status; files follow a moment later)."""
        return int(str(self.status()["serial"]), 16)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.status_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def status(self) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.status_port}/debug/status"
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.loads(resp.read())
        assert isinstance(data, dict)
        return data

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def stack() -> Iterator[Stack]:
    # Short paths: Unix socket paths are limited to 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="mt-e2e-"))
    ca_dir = work / "ca"
    try:
        assert (
            run_cli("ca", "init", "--dir", str(ca_dir), "--trust-domain", "example.org").returncode
            == 0
        )
        ca = CaProcess(ca_dir)
        try:
            ca.wait_ready()
            for sa in ("server", "client"):
                out = run_cli(
                    "token",
                    "create",
                    "--ca-dir",
                    str(ca_dir),
                    "--namespace",
                    "default",
                    "--service-account",
                    sa,
                    "-o",
                    str(work / f"{sa}.token"),
                )
                assert out.returncode == 0, out.stderr
            got = run_cli(
                "cert",
                "request",
                "--ca-address",
                ca.address,
                "--ca-root",
                str(ca_dir / "root-cert.pem"),
                "--token-file",
                str(work / "client.token"),
                "--spiffe-id",
                "spiffe://example.org/ns/default/sa/client",
                "--ttl",
                "1h",
                "--out-dir",
                str(work / "client"),
            )
            assert got.returncode == 0, got.stderr
            chain = x509.load_pem_x509_certificates((work / "client/cert-chain.pem").read_bytes())
            key = load_private_key_pem((work / "client/key.pem").read_bytes())
            root = x509.load_pem_x509_certificate((ca_dir / "root-cert.pem").read_bytes())
            yield Stack(work, ca, root, Leaf(chain[0], key, tuple(chain[1:])))
        finally:
            ca.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def served_serial(envoy: EnvoyProcess) -> int:
    certs = await asyncio.to_thread(envoy.certs)
    for entry in certs["certificates"]:
        for cert in entry.get("cert_chain", []):
            return int(cert["serial_number"], 16)
    return 0


@pytest.mark.asyncio
async def test_envoy_gets_rotates_and_keeps_the_agents_certificate(stack: Stack) -> None:
    agent = stack.start_agent(ttl="8s")
    port = free_port()
    envoy = EnvoyProcess(sidecar_bootstrap(agent.sds, port), stack.work)
    try:
        envoy.start()
        await asyncio.to_thread(envoy.wait_ready, 60)
        pid = envoy.pid
        first = agent.serial()
        # Envoy's /certs shows the agent's certificate: the same serial.
        await eventually(lambda: served_serial(envoy), lambda s: s == first)
        before = await asyncio.to_thread(https_get, port, stack.root, stack.client, stack.work)
        assert (before.status, before.body) == (200, b"hello")
        assert before.peer.serial_number == first
        assert uri_sans(before.peer) == [SERVER]
        status = agent.status()
        assert status["spiffe_id"] == SERVER and status["serial"] == format(first, "x")
        assert status["state"] == "valid" and status["ready"] is True

        # Rotation (8 s certificates renew after ~4 s): new serial, same Envoy process.
        second = await eventually(lambda: served_serial(envoy), lambda s: s not in (0, first))
        assert envoy.pid == pid and envoy.running
        after = await asyncio.to_thread(https_get, port, stack.root, stack.client, stack.work)
        assert after.status == 200 and after.peer.serial_number == second
        assert 'istio_agent_num_outgoing_requests{request_type="csr"}' in agent.metrics()

        # The agent restarts; Envoy keeps serving meanwhile and reconnects to SDS after.
        assert agent.stop() == 0
        assert not agent.sds.exists() and not agent.workload.exists()
        assert "Traceback" not in agent.log()
        during = await asyncio.to_thread(https_get, port, stack.root, stack.client, stack.work)
        assert during.status == 200
        agent = stack.start_agent(ttl="8s")
        # The new agent's certificate (it may even rotate meanwhile: 8 s certificates).
        restarted = await eventually(lambda: served_serial(envoy), lambda s: s == agent.serial())
        assert envoy.pid == pid
        final = await asyncio.to_thread(https_get, port, stack.root, stack.client, stack.work)
        assert final.status == 200 and final.peer.serial_number in (restarted, agent.serial())
    finally:
        envoy.stop()
        agent.stop()
    assert "Traceback" not in agent.log()


@pytest.mark.asyncio
async def test_py_spiffe_follows_the_agents_rotations(stack: Stack) -> None:
    agent = stack.start_agent(ttl="6s")
    try:
        source = await asyncio.to_thread(
            spiffe.X509Source, socket_path=f"unix://{agent.workload}", timeout_in_seconds=WAIT
        )
        try:
            svid = source.get_x509_context().default_svid
            assert str(svid.spiffe_id) == SERVER
            first = svid.leaf.serial_number
            assert first == agent.serial()
            # The key came over the socket, and it is the one the certificate is for.
            assert svid.private_key.public_key() == svid.leaf.public_key()
            rotated = threading.Event()

            def on_update() -> None:
                if source.get_x509_context().default_svid.leaf.serial_number != first:
                    rotated.set()

            source.subscribe_for_updates(on_update)
            assert await asyncio.to_thread(rotated.wait, WAIT)
            assert not source.is_closed()
            bundle = source.get_x509_context().x509_bundle_set.get_bundle_for_trust_domain(
                spiffe.TrustDomain("example.org")
            )
            assert bundle is not None and bundle.x509_authorities == {stack.root}
        finally:
            source.close()
    finally:
        assert agent.stop() == 0
