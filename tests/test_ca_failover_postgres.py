"""Three real ``ca serve`` replicas on one real PostgreSQL ledger, under load, one SIGKILLed
mid-burst: agents (in-process with the real CaClient, and one real ``meshtrust agent``
process) fail over with no failed renewal, every rotation lands before the certificate it
replaces expires, and every certificate anyone received is in the ledger."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa
from cryptography import x509

from meshtrust.agent.agent import Agent
from meshtrust.agent.build import build_agent
from meshtrust.agent.config import AgentConfig
from meshtrust.caapi import CaClient
from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
from meshtrust.clock import SystemClock
from meshtrust.pki import build_csr, format_serial, generate_key
from meshtrust.spiffe import SpiffeId
from tests.conftest import TD, workload_token
from tests.postgres import PostgresServer, postgres_server
from tests.processes import MESHTRUST, CaProcess, free_port
from tests.test_ca_failover import NAME, FakeDns
from tests.waiting import async_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # all loopback on Linux
TTL = dt.timedelta(seconds=6)  # renewal every ~3 s: several rotations per test


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@dataclass
class Received:
    at: dt.datetime
    serial: str
    not_after: dt.datetime


@dataclass
class RecordingCa:
    """The real :class:`CaClient`, noting every certificate it hands the agent and when."""

    client: CaClient
    received: list[Received] = field(default_factory=list)

    async def sign(
        self,
        csr_pem: str,
        *,
        ttl_seconds: int,
        token: str | None,
        client_cert: tuple[bytes, bytes] | None,
    ) -> list[str]:
        chain = await self.client.sign(
            csr_pem, ttl_seconds=ttl_seconds, token=token, client_cert=client_cert
        )
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        serial = format_serial(leaf.serial_number)
        self.received.append(Received(SystemClock().now(), serial, leaf.not_valid_after_utc))
        return chain


class Load:
    """Concurrent CreateCertificate calls to every replica (grpcio, as another client
    would); every serial received. A worker whose replica died stops."""

    def __init__(self, ca_dir: Path, port: int) -> None:
        self.root = (ca_dir / "root-cert.pem").read_bytes()
        self.port = port
        self.token = workload_token(ca_dir, "load")
        self.csr = build_csr(generate_key(), SpiffeId.for_workload(TD, "default", "load"))
        self.received: list[str] = []

    async def _replica(self, host: str, concurrency: int, stop: asyncio.Event) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=self.root)
        options = [("grpc.ssl_target_name_override", NAME)]
        async with grpc.aio.secure_channel(f"{host}:{self.port}", creds, options) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        resp = await stub.CreateCertificate(
                            ca_pb2.IstioCertificateRequest(csr=self.csr),
                            metadata=[("authorization", f"Bearer {self.token}")],
                            timeout=20,
                        )
                    except grpc.aio.AioRpcError:
                        return
                    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
                    self.received.append(format_serial(leaf.serial_number))

            await asyncio.gather(*[worker() for _ in range(concurrency)])

    async def run(self, concurrency: int, stop: asyncio.Event) -> None:
        await asyncio.gather(*[self._replica(h, concurrency, stop) for h in HOSTS])


class AgentProcess:
    """``meshtrust agent`` with ``--ca-address`` repeated, one per replica (``hosts``)."""

    def __init__(
        self,
        ca_dir: Path,
        work: Path,
        port: int,
        hosts: list[str] = HOSTS,
        ttl: dt.timedelta = TTL,
    ) -> None:
        work.mkdir()
        (work / "token").write_text(workload_token(ca_dir, "proc"))
        self.status_port = free_port()
        self.log_path = work / "agent.log"
        self._log = self.log_path.open("w")
        addresses = [arg for h in hosts for arg in ("--ca-address", f"{h}:{port}")]
        self.proc = subprocess.Popen(
            [
                *MESHTRUST,
                "agent",
                *addresses,
                "--ca-server-name",
                NAME,
                "--ca-root",
                str(ca_dir / "root-cert.pem"),
                "--token-file",
                str(work / "token"),
                "--output-dir",
                str(work / "certs"),
                "--cert-ttl",
                f"{int(ttl.total_seconds())}s",
                "--status-listen",
                f"127.0.0.1:{self.status_port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.token = (work / "token").read_text()

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.status_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log()}")
        return self.get("/healthz/ready")[0] == 200

    def metric(self, sample: str) -> float:
        status, text = self.get("/metrics")
        assert status == 200
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        assert match, f"{sample} not in /metrics:\n{text}"
        return float(match.group(1))

    def serials(self) -> list[str]:
        return re.findall(r"serial ([0-9a-f]+) valid until", self.log())

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _agents(ca_dir: Path, tmp_path: Path, port: int) -> list[tuple[Agent, RecordingCa]]:
    """Three agents listing the replicas' addresses, three using one name that resolves to
    all of them (an injected resolver: a headless Service's record)."""
    out = []
    root = ca_dir / "root-cert.pem"
    for i in range(6):
        work = tmp_path / f"agent{i}"
        work.mkdir()
        (work / "token").write_text(workload_token(ca_dir, f"w{i}"))
        by_name = i >= 3
        config = AgentConfig(
            ca_root=root,
            ca_address=f"{NAME}:{port}" if by_name else tuple(f"{h}:{port}" for h in HOSTS),
            ca_server_name=None if by_name else NAME,
            token_file=work / "token",
            output_dir=work / "certs",
            status_listen=None,
            cert_ttl=TTL,
        )
        client = CaClient(
            config.ca_addresses,
            root.read_bytes(),
            server_name=config.ca_server_name,
            resolver=FakeDns({NAME: list(HOSTS)}),
        )
        source = RecordingCa(client)
        out.append((build_agent(config, source=source), source))
    return out


def _ledger_serials(url: str) -> tuple[int, set[str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [r[0] for r in conn.execute(sa.text("SELECT serial FROM certificates"))]
    finally:
        engine.dispose()
    return len(rows), set(rows)


@pytest.mark.asyncio
async def test_one_replica_killed_mid_burst_agents_fail_over_with_no_failed_renewal(
    pg: PostgresServer, ca_dir: Path, tmp_path: Path
) -> None:
    url = pg.create_database("failover")
    port = free_port()
    replicas = [
        CaProcess(
            ca_dir,
            *("--ledger", url, "--workers", "1", "--listen", f"{host}:{port}"),
            *("--server-name", NAME),
        )
        for host in HOSTS
    ]
    agents: list[tuple[Agent, RecordingCa]] = []
    proc: AgentProcess | None = None
    load = Load(ca_dir, port)
    stop_load = asyncio.Event()
    try:
        for ca in replicas:
            ca.wait_ready(timeout=60)
        agents = _agents(ca_dir, tmp_path, port)
        for agent, _ in agents:
            await agent.start()
        proc = AgentProcess(ca_dir, tmp_path / "proc", port)
        await async_until(lambda: all(a.ready() for a, _ in agents), 60, "agents ready")
        await async_until(proc.ready, 60, "agent process ready")
        load_task = asyncio.create_task(load.run(4, stop_load))

        def rotations() -> int:
            return min(len(r.received) for _, r in agents)

        await async_until(lambda: rotations() >= 3, 60, "two rotations each")
        await async_until(lambda: len(proc.serials()) >= 3, 60, "process: two rotations")
        # Every agent is on 127.0.0.2 (first in order, and sticky): kill it under load.
        assert len(load.received) > 0
        replicas[0].signal(signal.SIGKILL)
        killed_at = {id(r): len(r.received) for _, r in agents}
        proc_at = len(proc.serials())
        await async_until(
            lambda: all(len(r.received) >= killed_at[id(r)] + 3 for _, r in agents),
            90,
            "three rotations each after the kill",
        )
        await async_until(lambda: len(proc.serials()) >= proc_at + 3, 90, "process: 3 more")
        stop_load.set()
        await asyncio.wait_for(load_task, 60)
        proc_failures = proc.metric('meshtrust_agent_rotations_total{result="failure"}')
        proc_failed_csrs = proc.metric(
            'istio_agent_num_failed_outgoing_requests{request_type="csr"}'
        )
        proc_failovers = proc.metric("meshtrust_agent_ca_failovers_total")
    finally:
        stop_load.set()
        for agent, _ in agents:
            await agent.stop()
        if proc is not None:
            proc.stop()
        for ca in replicas:
            ca.stop()

    rows, in_ledger = _ledger_serials(url)
    assert rows == len(in_ledger)
    for agent, recording in agents:
        assert agent.metrics.rotations_failed == 0, agent.rotator.last_error
        assert agent.metrics.failed == 0
        assert recording.client.failovers >= 1  # it was on the replica that died
        got = recording.received
        # Each rotation landed before the certificate it replaced expired.
        late = [(a.serial, b.at) for a, b in zip(got, got[1:], strict=False) if b.at >= a.not_after]
        assert late == []
        assert {r.serial for r in got} <= in_ledger
    assert (proc_failures, proc_failed_csrs) == (0, 0)
    assert proc_failovers >= 1
    proc_log = proc.log()
    assert f"CA {HOSTS[0]}:{port} unavailable (" in proc_log
    assert f"trying {HOSTS[1]}:{port}" in proc_log
    assert proc.token.strip() not in proc_log
    assert "Traceback" not in proc_log
    assert set(proc.serials()) <= in_ledger
    assert set(load.received) <= in_ledger
