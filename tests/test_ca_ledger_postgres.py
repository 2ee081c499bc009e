"""The ledger on a real PostgreSQL server (tests/postgres.py), and its versioned schema on
both engines: replicas that start together all come up, a newer schema is refused, a ledger
from before versioning is adopted."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa
from cryptography import x509

from meshtrust.ca.ledger import IssuedRecord, SqlLedger
from meshtrust.ca.schema import MIGRATIONS, SCHEMA_VERSION
from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
from meshtrust.errors import LedgerError
from meshtrust.pki import build_csr, format_serial, generate_key
from meshtrust.spiffe import SpiffeId
from tests.conftest import TD, workload_token
from tests.postgres import PostgresServer, postgres_server
from tests.processes import CaProcess, run_cli
from tests.waiting import async_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

T = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
ALL_MIGRATIONS = [(m.version, m.description) for m in MIGRATIONS]
WEB = SpiffeId.for_workload(TD, "default", "web")


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(pg: PostgresServer) -> str:
    """A fresh, empty database of its own for each test."""
    return pg.create_database(f"t{uuid.uuid4().hex[:12]}")


def _record(i: int) -> IssuedRecord:
    return IssuedRecord(
        serial=f"{0x80 << 120 | i:032x}",
        spiffe_id=f"spiffe://example.org/ns/default/sa/w{i % 3}",
        not_before=T,
        not_after=T + dt.timedelta(hours=i + 1),
        key_type="ec-p256",
        requester="127.0.0.1:5000",
        authenticator="jwt",
        issued_at=T,
        cert_pem="-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
    )


def test_records_round_trip_on_postgresql_with_their_time_zone(pg_url: str) -> None:
    ledger = SqlLedger(pg_url)
    try:
        ledger.record_batch([_record(i) for i in range(5)])
        got = ledger.certificates()
        assert [r.serial for r in got] == [_record(i).serial for i in range(5)]
        assert got[0] == _record(0)  # aware datetimes, UTC, as written
        assert len(ledger.certificates(spiffe_id="spiffe://example.org/ns/default/sa/w1")) == 2
        with pytest.raises(LedgerError, match="ledger write failed: IntegrityError"):
            ledger.record_batch([_record(1)])  # a serial is recorded once, ever
    finally:
        ledger.close()


OPEN_AT_ONCE = textwrap.dedent(
    """
    import sys, time
    from meshtrust.ca.ledger import SqlLedger
    start = float(sys.argv[2])
    while time.time() < start:
        pass
    try:
        SqlLedger(sys.argv[1]).close()
    except Exception as exc:
        print(f"{exc.__class__.__name__}: {exc}")
        sys.exit(1)
    """
)


def _open_all_at_once(url: str, count: int) -> list[subprocess.CompletedProcess[str]]:
    start = time.time() + 3.0  # every process imported and spinning by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_ONCE, url, repr(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, ""))
    return out


def _schema_rows(url: str) -> list[tuple[int, str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT version, description FROM meshtrust_schema ORDER BY version")
            )
            return [(int(v), str(d)) for v, d in rows]
    finally:
        engine.dispose()


def test_replicas_opening_a_fresh_postgresql_ledger_at_the_same_moment_all_come_up(
    pg_url: str,
) -> None:
    # Before the advisory lock, CREATE TABLE raced: IntegrityError on pg_type_typname_nsp_index.
    results = _open_all_at_once(pg_url, 6)
    assert [(r.returncode, r.stdout) for r in results] == [(0, "")] * 6
    assert _schema_rows(pg_url) == ALL_MIGRATIONS


def test_processes_opening_a_fresh_sqlite_ledger_at_the_same_moment_all_come_up(
    tmp_path: Path,
) -> None:
    # Switching a fresh file to WAL raced: "database is locked" at once (SQLite's deadlock
    # avoidance skips the busy handler), in about one round of five before the retry.
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'ledger{round_}.db'}"
        results = _open_all_at_once(url, 6)
        assert [(r.returncode, r.stdout) for r in results] == [(0, "")] * 6
        assert _schema_rows(url) == ALL_MIGRATIONS


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_ledger_newer_than_this_meshtrust_is_refused_and_left_alone(
    engine: str, pg_url: str, tmp_path: Path
) -> None:
    url = pg_url if engine == "postgresql" else f"sqlite:///{tmp_path / 'ledger.db'}"
    SqlLedger(url).close()
    e = sa.create_engine(url)
    with e.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO meshtrust_schema (version, description, applied_at) "
                "VALUES (:v, 'from the future', :at)"
            ),
            {"v": SCHEMA_VERSION + 1, "at": T},
        )
    e.dispose()
    with pytest.raises(LedgerError) as info:
        SqlLedger(url)
    message = str(info.value)
    assert f"has schema version {SCHEMA_VERSION + 1}, newer than this meshtrust knows" in message
    assert f"(up to {SCHEMA_VERSION})" in message
    assert [v for v, _ in _schema_rows(url)] == [
        *(m.version for m in MIGRATIONS),
        SCHEMA_VERSION + 1,
    ]


def test_ca_serve_refuses_a_newer_ledger_with_a_message_not_a_traceback(
    pg_url: str, ca_dir: Path
) -> None:
    SqlLedger(pg_url).close()
    e = sa.create_engine(pg_url)
    with e.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO meshtrust_schema (version, description, applied_at) "
                "VALUES (99, 'from the future', now())"
            )
        )
    e.dispose()
    ca = CaProcess(ca_dir, "--ledger", pg_url)
    try:
        assert ca.wait(timeout=60) != 0
        log = ca.log()
    finally:
        ca.stop()
    assert "schema version 99, newer than this meshtrust knows" in log
    assert "Traceback" not in log
    assert "postgres@127.0.0.1" in log  # where, with no password to hide here


def test_a_ledger_from_before_versioning_is_adopted_with_its_records(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path)
    # The schema `ca serve` created before ledgers were versioned (create_all).
    db.executescript(
        """
        CREATE TABLE certificates (serial VARCHAR(40) NOT NULL, spiffe_id VARCHAR(2048) NOT NULL,
          not_before DATETIME NOT NULL, not_after DATETIME NOT NULL, key_type VARCHAR(32) NOT NULL,
          requester VARCHAR(512) NOT NULL, authenticator VARCHAR(32) NOT NULL,
          issued_at DATETIME NOT NULL, cert_pem TEXT NOT NULL, PRIMARY KEY (serial));
        CREATE INDEX ix_certificates_spiffe_id ON certificates (spiffe_id);
        CREATE INDEX ix_certificates_not_after ON certificates (not_after);
        CREATE TABLE audit (id INTEGER NOT NULL, at DATETIME NOT NULL, actor VARCHAR(512) NOT NULL,
          action VARCHAR(64) NOT NULL, detail TEXT NOT NULL, PRIMARY KEY (id));
        INSERT INTO certificates VALUES ('8000000000000000000000000000002a',
          'spiffe://example.org/ns/default/sa/old', '2030-01-01 00:00:00.000000',
          '2030-01-02 00:00:00.000000', 'ec-p256', 'x', 'jwt', '2030-01-01 00:00:00.000000', 'pem');
        """
    )
    db.close()
    ledger = SqlLedger(f"sqlite:///{path}")
    try:
        assert ledger.schema_found == 0
        assert [r.spiffe_id for r in ledger.certificates()] == [
            "spiffe://example.org/ns/default/sa/old"
        ]
    finally:
        ledger.close()
    assert _schema_rows(f"sqlite:///{path}") == ALL_MIGRATIONS


def test_three_ca_replicas_started_together_on_a_fresh_postgresql_ledger_all_serve(
    pg_url: str, ca_dir: Path
) -> None:
    replicas = [CaProcess(ca_dir, "--ledger", pg_url, "--workers", "1") for _ in range(3)]
    try:
        for ca in replicas:
            ca.wait_ready(timeout=60)
        for ca in replicas:
            assert "Traceback" not in ca.log()
    finally:
        for ca in replicas:
            ca.stop()
    listed = run_cli("ca", "certs", "list", "--ledger", pg_url)
    assert listed.returncode == 0, listed.stderr


# --------------------------------------------------------------------------- under load


class Client:
    """Concurrent CreateCertificate calls to one replica; every serial received, every
    failure's status code."""

    def __init__(self, ca: CaProcess, token: str, csr: str) -> None:
        self.ca, self.token, self.csr = ca, token, csr
        self.received: list[str] = []
        self.failures: list[tuple[grpc.StatusCode, str]] = []

    async def call(self, stub: ca_pb2_grpc.IstioCertificateServiceStub) -> None:
        try:
            resp = await stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=self.csr),
                metadata=[("authorization", f"Bearer {self.token}")],
                timeout=20,
            )
        except grpc.aio.AioRpcError as exc:
            self.failures.append((exc.code(), exc.details() or ""))
            raise
        leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
        self.received.append(format_serial(leaf.serial_number))

    async def run(self, concurrency: int, stop: asyncio.Event) -> None:
        root = (self.ca.ca_dir / "root-cert.pem").read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        async with grpc.aio.secure_channel(self.ca.address, creds) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        await self.call(stub)
                    except grpc.aio.AioRpcError:
                        return  # this replica is gone; an agent would fail over

            await asyncio.gather(*[worker() for _ in range(concurrency)])


def _ledger_serials(url: str) -> tuple[int, set[str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [r[0] for r in conn.execute(sa.text("SELECT serial FROM certificates"))]
    finally:
        engine.dispose()
    return len(rows), set(rows)


@pytest.mark.asyncio
async def test_three_replicas_under_load_one_killed_lose_and_duplicate_nothing(
    pg_url: str, ca_dir: Path
) -> None:
    replicas = [CaProcess(ca_dir, "--ledger", pg_url, "--workers", "1") for _ in range(3)]
    token = workload_token(ca_dir)
    csr = build_csr(generate_key(), SpiffeId.for_workload(TD, "default", "web"))
    try:
        for ca in replicas:
            ca.wait_ready(timeout=60)
        clients = [Client(ca, token, csr) for ca in replicas]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(c.run(8, stop)) for c in clients]

        def total() -> int:
            return sum(len(c.received) for c in clients)

        await async_until(lambda: total() >= 300, timeout=120, what="300 certificates")
        replicas[1].signal(signal.SIGKILL)  # mid-burst, with requests in flight
        killed_at = total()
        await async_until(lambda: total() >= killed_at + 300, timeout=120, what="300 more")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for ca in replicas:
            ca.stop()
    received = [s for c in clients for s in c.received]
    rows, in_ledger = _ledger_serials(pg_url)
    assert len(received) == len(set(received))  # no serial handed out twice
    assert set(received) - in_ledger == set()  # every certificate received is recorded
    assert rows == len(in_ledger)  # and recorded once
    # Only the killed replica's clients saw failures, and only UNAVAILABLE/connection loss.
    assert clients[0].failures == [] and clients[2].failures == []
    assert {code for code, _ in clients[1].failures} <= {grpc.StatusCode.UNAVAILABLE}


@pytest.mark.asyncio
async def test_postgresql_stopped_is_unavailable_with_a_reason_and_recovers(
    ca_dir: Path,
) -> None:
    with postgres_server() as own:  # a server of its own: this test stops it
        url = own.create_database("ledger")
        ca = CaProcess(ca_dir, "--ledger", url, "--workers", "1")
        try:
            ca.wait_ready(timeout=60)
            client = Client(ca, workload_token(ca_dir), build_csr(generate_key(), WEB))
            root = (ca_dir / "root-cert.pem").read_bytes()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            async with grpc.aio.secure_channel(ca.address, creds) as channel:
                stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
                await client.call(stub)
                own.stop("immediate")
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.call(stub)
                code, details = client.failures[-1]
                assert code == grpc.StatusCode.UNAVAILABLE
                assert "ledger" in details, details
                assert "password" not in details.lower()
                own.start()
                for _ in range(3):  # the first call after may meet a dead pooled connection
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await client.call(stub)
                assert len(client.received) >= 2
            log = ca.log()
        finally:
            ca.stop()
        assert "Traceback" not in log
        _, in_ledger = _ledger_serials(url)
        assert set(client.received) <= in_ledger
