"""The ledger's batching: a group of records is durable together or fails together, on the
supervisor's side (GroupCommitLedger) and on a worker's side of the socketpair (RemoteLedger).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import pickle
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshtrust.ca import GroupCommitLedger, IssuedRecord, SqlLedger
from meshtrust.ca.readiness import LedgerHealth, WatchedLedger
from meshtrust.ca.workers import RemoteLedger
from meshtrust.errors import LedgerError

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def record(serial: str) -> IssuedRecord:
    return IssuedRecord(
        serial=serial,
        spiffe_id="spiffe://example.org/ns/shop/sa/web",
        not_before=NOW - dt.timedelta(minutes=2),
        not_after=NOW + dt.timedelta(hours=24),
        key_type="ec-p256",
        requester="system:serviceaccount:shop:web",
        authenticator="jwt",
        issued_at=NOW,
        cert_pem="-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
    )


class BrokenLedger(SqlLedger):
    def record_batch(self, records: Sequence[IssuedRecord]) -> None:
        raise LedgerError("disk full")


@pytest.mark.asyncio
async def test_a_group_and_single_records_are_all_committed(tmp_path: Path) -> None:
    sql = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = GroupCommitLedger(sql)
    try:
        await asyncio.gather(
            ledger.record_many([record("01"), record("02"), record("03")]),
            ledger.record(record("04")),
        )
        assert sql.serials() == {"01", "02", "03", "04"}
        assert sql.certificates(spiffe_id="spiffe://example.org/ns/shop/sa/web")[0] == record("01")
    finally:
        await ledger.aclose()
        sql.close()


@pytest.mark.asyncio
async def test_a_failed_commit_fails_every_waiter(tmp_path: Path) -> None:
    sql = BrokenLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = GroupCommitLedger(sql)
    try:
        results = await asyncio.gather(
            ledger.record_many([record("01"), record("02")]),
            ledger.record(record("03")),
            return_exceptions=True,
        )
        assert [type(r) for r in results] == [LedgerError, LedgerError]
        assert "disk full" in str(results[0])
    finally:
        await ledger.aclose()
        sql.close()


async def _read_message(reader: asyncio.StreamReader) -> object:
    (length,) = struct.unpack("!I", await reader.readexactly(4))
    return pickle.loads(await reader.readexactly(length))


@pytest.mark.asyncio
async def test_records_of_one_step_travel_together_and_wait_for_their_ack() -> None:
    worker_end, supervisor_end = socket.socketpair()
    _, worker_writer = await asyncio.open_connection(sock=worker_end)
    sup_reader, sup_writer = await asyncio.open_connection(sock=supervisor_end)
    remote = RemoteLedger(worker_writer)
    try:
        first = asyncio.create_task(remote.record(record("01")))
        second = asyncio.create_task(remote.record(record("02")))
        message = await _read_message(sup_reader)
        assert isinstance(message, tuple) and message[0] == "recs"
        _, ids, rows = message
        assert len(ids) == 2
        assert [IssuedRecord(*row) for row in rows] == [record("01"), record("02")]
        assert not first.done() and not second.done()  # nothing is answered before the ack

        remote.resolve([ids[0]], None)
        await first
        remote.resolve([ids[1]], "ledger write failed: OperationalError")
        with pytest.raises(LedgerError, match="OperationalError"):
            await second
    finally:
        worker_writer.close()
        sup_writer.close()


def test_the_ledger_and_its_wal_and_shm_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    """It names every identity and requester (issue 9, point 6): 0600 from the first byte,
    SQLite's side files taking the main file's mode."""
    import os
    import stat

    old = os.umask(0)
    try:
        ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
        ledger.record_batch([record("01")])
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()}
        ledger.close()
    finally:
        os.umask(old)
    assert modes == {"ledger.db": 0o600, "ledger.db-wal": 0o600, "ledger.db-shm": 0o600}


@pytest.mark.asyncio
async def test_records_fail_at_once_once_the_supervisor_is_gone() -> None:
    """A worker that lost its supervisor answers UNAVAILABLE (a LedgerError) at once: it
    neither writes to the closed socket (RuntimeError, which answered UNKNOWN) nor waits
    for an acknowledgement that cannot come."""
    ours, supervisor = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=ours)
    ledger = RemoteLedger(writer)
    waiting = asyncio.create_task(ledger.record(record("05")))
    await asyncio.sleep(0)  # the record is sent and waits for its acknowledgement
    supervisor.close()
    ledger.fail_all("the CA supervisor is gone")
    with pytest.raises(LedgerError, match="supervisor is gone"):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(LedgerError, match="supervisor is gone"):
        await asyncio.wait_for(ledger.record(record("05")), 5)
    writer.close()


@pytest.mark.asyncio
async def test_a_record_on_a_closed_link_fails_instead_of_waiting() -> None:
    ours, supervisor = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=ours)
    ledger = RemoteLedger(writer)
    writer.close()
    supervisor.close()
    with pytest.raises(LedgerError, match="closed"):
        await asyncio.wait_for(ledger.record(record("05")), 5)


@pytest.mark.asyncio
async def test_a_watched_ledger_reports_each_commit_to_its_health(tmp_path: Path) -> None:
    """Where readiness learns of a full disk: the awaited commit (see ca.readiness)."""
    broken = BrokenLedger(f"sqlite:///{tmp_path / 'broken.db'}")
    good = SqlLedger(f"sqlite:///{tmp_path / 'good.db'}")
    health = LedgerHealth()
    failing, working = (WatchedLedger(GroupCommitLedger(s), health) for s in (broken, good))
    try:
        with pytest.raises(LedgerError):
            await failing.record(record("01"))
        assert health.failure == "disk full"
        await working.record_many([record("02")])
        assert health.failure is None
    finally:
        for ledger, sql in ((failing, broken), (working, good)):
            await ledger.aclose()
            sql.close()
