"""The CA's readiness: the pure decision, the probe on a fake clock, and a real full disk.

The disk is a 2 MiB tmpfs mounted in a private mount namespace of the CA process
(``unshare --mount --propagation private``): nothing of it is visible on the host, and it
goes away with the process even if the test dies. The test fills and frees it from inside
that namespace (``nsenter --mount``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from meshtrust.ca import CaMetrics, CaServeConfig, prepare_ca
from meshtrust.ca.assembly import build_authority
from meshtrust.ca.authority import Credentials
from meshtrust.ca.ledger import AuditEvent, SqlLedger
from meshtrust.ca.readiness import (
    LedgerHealth,
    Readiness,
    decide_readiness,
    probe_ledger,
)
from meshtrust.ca.refusals import RefusalThrottle
from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
from meshtrust.clock import FakeClock, SystemClock
from meshtrust.errors import LedgerError
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import build_csr, generate_key
from tests.badcerts import NOW
from tests.jwt_issuers import WEB
from tests.processes import CaProcess
from tests.test_ca_process import _token
from tests.waiting import until

FULL = "the ledger cannot record certificates: ledger write failed: database or disk is full"


@pytest.mark.parametrize(
    ("stopping", "workers_down", "ledger_failure", "expected"),
    [
        (False, 0, None, Readiness(True, "")),
        (True, 0, None, Readiness(False, "the CA is stopping")),
        (False, 1, None, Readiness(False, "1 worker(s) not serving")),
        (
            False,
            0,
            "disk full",
            Readiness(False, "the ledger cannot record certificates: disk full"),
        ),
        (True, 2, "disk full", Readiness(False, "the CA is stopping")),
        (False, 2, "disk full", Readiness(False, "2 worker(s) not serving")),
    ],
    ids=["ready", "stopping", "worker-down", "ledger-failing", "stopping-first", "workers-first"],
)
def test_decide_readiness(
    stopping: bool, workers_down: int, ledger_failure: str | None, expected: Readiness
) -> None:
    assert (
        decide_readiness(
            stopping=stopping, workers_down=workers_down, ledger_failure=ledger_failure
        )
        == expected
    )


@pytest.mark.asyncio
async def test_the_probe_writes_until_the_ledger_takes_a_write_again() -> None:
    clock = FakeClock(NOW)
    health = LedgerHealth()
    attempts: list[AuditEvent] = []
    outcomes = [LedgerError("ledger write failed: disk full"), LedgerError("still full"), None]

    def write(_sql: SqlLedger, event: AuditEvent) -> None:
        attempts.append(event)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    probe = asyncio.create_task(probe_ledger(health, None, clock, 2.0, write))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0)
        assert attempts == []  # healthy: no probing at all
        health.failed("disk full")
        expected = ["ledger write failed: disk full", "still full", None]
        for k, want in enumerate(expected, 1):
            await clock.wait_for_sleepers(1)
            await clock.advance(2.0)

            def probed(k: int = k, want: str | None = want) -> bool:
                return len(attempts) == k and health.failure == want

            await asyncio.wait_for(_until(probed), 5)
        assert [e.action for e in attempts] == ["ledger-writable"] * 3
        # Healthy again: the probe waits for the next failure, writing nothing meanwhile.
        await asyncio.sleep(0)
        assert len(attempts) == 3
    finally:
        probe.cancel()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_a_real_commit_succeeding_makes_the_probe_stand_down() -> None:
    clock = FakeClock(NOW)
    health = LedgerHealth()
    attempts: list[AuditEvent] = []
    probe = asyncio.create_task(
        probe_ledger(health, None, clock, 2.0, lambda _s, e: attempts.append(e))  # type: ignore[arg-type]
    )
    try:
        health.failed("disk full")
        await clock.wait_for_sleepers(1)
        health.succeeded()  # the next certificate was recorded
        await clock.advance(2.0)
        await clock.wait_for_sleepers(0)
        await asyncio.sleep(0)
        assert attempts == [] and health.failure is None
    finally:
        probe.cancel()


# --- a real full disk -------------------------------------------------------------------------


def _ready(ca: CaProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ca.metrics_port}/ready", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _request(ca: CaProcess, csr: str, token: str) -> tuple[grpc.StatusCode, str, str]:
    """One CreateCertificate: (code, details, leaf PEM)."""
    root = (ca.ca_dir / "root-cert.pem").read_bytes()
    with grpc.secure_channel(ca.address, grpc.ssl_channel_credentials(root)) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            resp = stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=csr),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", ""
    return grpc.StatusCode.OK, "", resp.cert_chain[0]


def _in_namespace(ca: CaProcess, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", "--target", str(ca.proc.pid), "--mount", "--", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("workers", [(), ("--workers", "1")], ids=["default-workers", "workers-1"])
def test_ready_is_503_while_the_ledger_disk_is_full_and_200_once_it_takes_writes(
    ca_dir: Path, tmp_path: Path, workers: tuple[str, ...]
) -> None:
    if os.geteuid() != 0:
        pytest.fail("a real full disk needs root (mount, as CI runs)", pytrace=False)
    for tool in ("unshare", "nsenter", "mount"):
        assert shutil.which(tool), f"{tool} is missing (Debian: util-linux, mount)"
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = f'mount -t tmpfs -o size=2m,mode=0700 tmpfs {disk} && exec "$@"'
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh")
    ca = CaProcess(ca_dir, "--ledger", f"sqlite:///{disk}/ledger.db", *workers, prefix=prefix)
    token, csr = _token(ca_dir), build_csr(generate_key(), WEB)
    try:
        ca.wait_ready()
        assert not os.path.ismount(disk)  # the tmpfs is the CA's alone
        code, _, first = _request(ca, csr, token)
        assert code == grpc.StatusCode.OK

        filled = _in_namespace(ca, "dd", "if=/dev/zero", f"of={disk}/fill", "bs=64k")
        assert "No space left on device" in filled.stderr, filled
        refused: list[tuple[grpc.StatusCode, str, str]] = []

        def refused_for_the_ledger() -> bool:
            # The WAL may have room for a few more commits before the disk is hit.
            refused.append(_request(ca, csr, token))
            return bool(refused[-1][0] != grpc.StatusCode.OK)

        until(refused_for_the_ledger, timeout=60, what="a request refused on the full disk")
        assert refused[-1][0] == grpc.StatusCode.UNAVAILABLE, refused[-1]
        assert "CA cannot record certificates" in refused[-1][1]
        assert _ready(ca) == (503, f"not ready: {FULL}\n")
        # Still unready while full: the probe writes fail too.
        assert _request(ca, csr, token)[0] == grpc.StatusCode.UNAVAILABLE
        assert _ready(ca)[0] == 503

        freed = _in_namespace(ca, "rm", f"{disk}/fill")
        assert freed.returncode == 0, freed
        until(lambda: _ready(ca) == (200, "ready\n"), timeout=30, what="ready again")
        code, _, last = _request(ca, csr, token)
        assert code == grpc.StatusCode.OK
        issued = [first, *[leaf for c, _, leaf in refused if c == grpc.StatusCode.OK], last]
        recorded = _in_namespace(
            ca,
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
            "print('\\n'.join(r[0] for r in c.execute('select cert_pem from certificates')));"
            "print(*[r[0] for r in c.execute('select action from audit')])",
            f"{disk}/ledger.db",
        )
        assert recorded.returncode == 0, recorded
    finally:
        ca.stop()
    assert all(leaf.strip() in recorded.stdout for leaf in issued)
    assert "ledger-writable" in recorded.stdout.splitlines()[-1]
    log = ca.log()
    assert "not ready until one succeeds" in log and "commits succeed again" in log
    assert "Traceback" not in log
    assert not os.path.ismount(disk) and list(disk.iterdir()) == []  # nothing leaked


class _FullDisk:
    """A ledger whose every commit fails, as on a full disk."""

    async def record(self, rec: object) -> None:
        raise LedgerError("ledger write failed: database or disk is full")


@pytest.mark.asyncio
async def test_a_full_ledger_fails_every_request_but_logs_a_burst_per_window(
    ca_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One line per request would fill the log's disk too (often the same disk)."""
    clock = SystemClock()
    prepared = prepare_ca(CaServeConfig(ca_dir=ca_dir, metrics_listen=None), clock)
    authority = build_authority(prepared, clock, _FullDisk(), CaMetrics(TextRegistry()))
    creds = Credentials(bearer_token=_token(ca_dir), peer_cert_der=None)
    csr = build_csr(generate_key(), WEB)
    with caplog.at_level(logging.INFO):
        for _ in range(3 * RefusalThrottle().burst):
            with pytest.raises(LedgerError):
                await authority.create_certificate(csr, 0, creds)
    lines = [r for r in caplog.records if "not issuing" in r.getMessage()]
    assert 1 <= len(lines) <= 2 * RefusalThrottle().burst  # two windows at most
    assert all(r.levelno == logging.ERROR for r in lines)
