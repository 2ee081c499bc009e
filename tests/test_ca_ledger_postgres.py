"""The ledger on a real PostgreSQL server (tests/postgres.py), and its versioned schema on
both engines: replicas that start together all come up, a newer schema is refused, a ledger
from before versioning is adopted."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from meshtrust.ca.ledger import IssuedRecord, SqlLedger
from meshtrust.ca.schema import SCHEMA_VERSION
from meshtrust.errors import LedgerError
from tests.postgres import PostgresServer, postgres_server
from tests.processes import CaProcess, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

T = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


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
    assert _schema_rows(pg_url) == [(1, "certificates and audit")]


def test_processes_opening_a_fresh_sqlite_ledger_at_the_same_moment_all_come_up(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    results = _open_all_at_once(url, 4)
    assert [(r.returncode, r.stdout) for r in results] == [(0, "")] * 4
    assert _schema_rows(url) == [(1, "certificates and audit")]


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
    assert [v for v, _ in _schema_rows(url)] == [1, SCHEMA_VERSION + 1]


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
    assert _schema_rows(f"sqlite:///{path}") == [(1, "certificates and audit")]


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
