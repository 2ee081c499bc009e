"""The CA as a real process: crash safety, shutdown, port ownership, worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509

from meshtrust.ca import SqlLedger, default_ledger_url, load_token_signing_key, mint_token
from meshtrust.ca.cadir import token_issuer_for
from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
from meshtrust.clock import SystemClock
from meshtrust.pki import build_csr, format_serial, generate_key
from meshtrust.spiffe import SpiffeId
from tests.conftest import TD
from tests.processes import CaProcess, run_cli
from tests.waiting import async_until

pytestmark = pytest.mark.slow

WEB = SpiffeId.for_workload(TD, "default", "web")


def _token(ca_dir: Path) -> str:
    key = load_token_signing_key(ca_dir)
    assert key is not None
    import datetime as dt

    return mint_token(
        key, token_issuer_for(TD), "default", "web", SystemClock().now(), dt.timedelta(hours=1)
    )


class Load:
    """Concurrent CreateCertificate calls; remembers every serial a client received."""

    def __init__(self, ca: CaProcess) -> None:
        self.ca = ca
        self.received: set[str] = set()
        self.failures: list[grpc.StatusCode] = []
        self.token = _token(ca.ca_dir)
        self.csr = build_csr(generate_key(), WEB)

    async def run(self, concurrency: int, stop: asyncio.Event, limit: int | None = None) -> None:
        root = (self.ca.ca_dir / "root-cert.pem").read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        async with grpc.aio.secure_channel(self.ca.address, creds) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]

            async def worker() -> None:
                while not stop.is_set() and (limit is None or len(self.received) < limit):
                    try:
                        resp = await stub.CreateCertificate(
                            ca_pb2.IstioCertificateRequest(csr=self.csr),
                            metadata=[("authorization", f"Bearer {self.token}")],
                            timeout=10,
                        )
                    except grpc.aio.AioRpcError as exc:
                        self.failures.append(exc.code())
                        return
                    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
                    self.received.add(format_serial(leaf.serial_number))

            await asyncio.gather(*[worker() for _ in range(concurrency)])


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_sigkill_loses_no_certificate_a_client_received(ca_dir: Path, workers: int) -> None:
    ca = CaProcess(ca_dir, "--workers", str(workers))
    try:
        ca.wait_ready()
        load = Load(ca)
        stop = asyncio.Event()
        task = asyncio.create_task(load.run(32, stop))
        await async_until(lambda: len(load.received) >= 150 or task.done(), timeout=60)
        ca.signal(signal.SIGKILL)  # mid-load, with requests in flight
        await asyncio.wait_for(task, 30)
    finally:
        ca.stop()
    assert ca.proc.returncode == -signal.SIGKILL

    restarted = CaProcess(ca_dir, "--workers", str(workers), port=ca.port)
    try:
        restarted.wait_ready()  # the port and the ledger are usable again
    finally:
        restarted.stop()
    db = ca_dir / "ledger.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    ledger = SqlLedger(default_ledger_url(ca_dir))
    try:
        missing = load.received - ledger.serials()
    finally:
        ledger.close()
    assert len(load.received) >= 150
    assert missing == set()


@pytest.mark.asyncio
async def test_sigterm_drains_in_flight_requests_and_exits_cleanly(ca_dir: Path) -> None:
    ca = CaProcess(ca_dir, "--workers", "2")
    try:
        ca.wait_ready()
        load = Load(ca)
        stop = asyncio.Event()
        task = asyncio.create_task(load.run(32, stop))
        await async_until(lambda: len(load.received) >= 100 or task.done(), timeout=60)
        assert not task.done() and len(load.received) >= 100, load.failures  # really in flight
        ca.signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, ca.wait, 30)
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        ca.stop()
    assert code == 0, ca.log()
    # Requests in flight finished; later ones were told to go elsewhere or found no server —
    # nothing half-done: every certificate a client received is recorded.
    assert set(load.failures) <= {grpc.StatusCode.UNAVAILABLE}
    ledger = SqlLedger(default_ledger_url(ca_dir))
    try:
        assert load.received <= ledger.serials()
    finally:
        ledger.close()
    assert "CA stopped" in ca.log()
    assert "Traceback" not in ca.log()


def test_second_ca_on_a_taken_port_fails_at_once(ca_dir: Path) -> None:
    first = CaProcess(ca_dir, "--workers", "2")
    try:
        first.wait_ready()
        second = run_cli(
            "ca",
            "serve",
            "--ca-dir",
            str(ca_dir),
            "--listen",
            first.address,
            "--metrics-listen",
            "off",
            timeout=20,
        )
    finally:
        first.stop()
    assert second.returncode == 1
    assert f"{first.address} is already in use" in second.stderr
    assert "Traceback" not in second.stderr


@pytest.mark.asyncio
async def test_workers_share_one_ledger_and_one_metrics_endpoint(ca_dir: Path) -> None:
    ca = CaProcess(ca_dir, "--workers", "2")
    try:
        ca.wait_ready()
        load = Load(ca)
        await load.run(16, asyncio.Event(), limit=200)
        issued = len(load.received)

        def counted() -> float:
            # Workers send their counts to the supervisor every 0.2 s.
            return next(
                float(line.split()[1])
                for line in ca.metrics().splitlines()
                if line.startswith("citadel_server_success_cert_issuance_count ")
            )

        await async_until(lambda: counted() >= issued, timeout=10)
    finally:
        ca.stop()
    assert load.failures == []
    assert issued >= 200
    ledger = SqlLedger(default_ledger_url(ca_dir))
    try:
        assert load.received <= ledger.serials()
        (start,) = [e for e in ledger.audit_events() if e.action == "ca-start"]
        assert "workers=2" in start.detail and start.actor == "meshtrust ca serve"
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing-key", "is incomplete: has ca-cert.pem, cert-chain.pem, root-cert.pem"),
        ("no-dir", "does not exist"),
        ("garbage-cert", "no PEM certificate found"),
    ],
)
def test_broken_ca_directory_stops_startup_with_a_message(
    ca_dir: Path, tmp_path: Path, breakage: str, message: str
) -> None:
    target = ca_dir
    if breakage == "missing-key":
        (ca_dir / "ca-key.pem").unlink()
    elif breakage == "no-dir":
        target = tmp_path / "nowhere"
    elif breakage == "garbage-cert":
        (ca_dir / "ca-cert.pem").write_text("garbage\n")
    out = run_cli(
        "ca", "serve", "--ca-dir", str(target), "--listen", "127.0.0.1:0", "--metrics-listen", "off"
    )
    assert out.returncode == 1
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_default_worker_count_is_one_per_cpu_capped(ca_dir: Path) -> None:
    """`ca serve` without --workers uses the machine's CPUs (at most 8), as a server should."""
    import os

    expected = min(os.cpu_count() or 1, 8)
    ca = CaProcess(ca_dir)
    try:
        ca.wait_ready()
    finally:
        ca.stop()
    ledger = SqlLedger(default_ledger_url(ca_dir))
    try:
        (start,) = [e for e in ledger.audit_events() if e.action == "ca-start"]
    finally:
        ledger.close()
    assert f"workers={expected}" in start.detail


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's zombie is PID 1's to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.asyncio
async def test_workers_that_lose_their_supervisor_answer_unavailable_and_exit(
    ca_dir: Path,
) -> None:
    """kill -9 of the supervisor mid-burst: every answer is a certificate (recorded) or
    UNAVAILABLE -- never UNKNOWN -- and no orphaned worker keeps serving the port."""
    ca = CaProcess(ca_dir, "--workers", "2")
    try:
        ca.wait_ready()
        workers = _children(ca.proc.pid)
        assert len(workers) == 2
        token, csr = _token(ca_dir), build_csr(generate_key(), WEB)
        root = (ca_dir / "root-cert.pem").read_bytes()
        received: set[str] = set()
        codes: list[grpc.StatusCode] = []
        stop = asyncio.Event()

        async def client() -> None:
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            async with grpc.aio.secure_channel(ca.address, creds) as channel:
                stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
                while not stop.is_set():
                    try:
                        resp = await stub.CreateCertificate(
                            ca_pb2.IstioCertificateRequest(csr=csr),
                            metadata=[("authorization", f"Bearer {token}")],
                            timeout=10,
                        )
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                        continue
                    codes.append(grpc.StatusCode.OK)
                    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
                    received.add(format_serial(leaf.serial_number))

        # One channel per client: each is its own connection, spread over both workers.
        clients = [asyncio.create_task(client()) for _ in range(32)]
        await async_until(lambda: len(received) >= 200, timeout=60, what="a burst under way")
        ca.signal(signal.SIGKILL)  # the supervisor only: its workers are left to themselves
        await async_until(
            lambda: not any(_alive(pid) for pid in workers), timeout=30, what="workers gone"
        )
        with pytest.raises(ConnectionRefusedError):  # nobody serves the port any more
            socket.create_connection(("127.0.0.1", ca.port), timeout=5).close()
        answered = len(codes)
        await async_until(lambda: len(codes) >= answered + 32, timeout=30, what="retries")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    finally:
        ca.stop()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    log = ca.log()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, (
        {c for c in codes if c != grpc.StatusCode.OK},
        log[-3000:],
    )
    assert "Traceback" not in log
    ledger = SqlLedger(default_ledger_url(ca_dir))
    try:
        assert received <= ledger.serials()
    finally:
        ledger.close()
