"""The worker side of the supervisor link (meshtrust.ca.workers), on a real socketpair."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket

import pytest

from meshtrust.ca.ledger import IssuedRecord
from meshtrust.ca.workers import RemoteLedger
from meshtrust.errors import LedgerError

T = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
RECORD = IssuedRecord("ab", "spiffe://example.org/ns/a/sa/b", T, T, "ec-p256", "x", "jwt", T, "")


@pytest.mark.asyncio
async def test_records_fail_at_once_once_the_supervisor_is_gone() -> None:
    """A worker that lost its supervisor answers UNAVAILABLE (a LedgerError) at once: it
    neither writes to the closed socket (RuntimeError, which answered UNKNOWN) nor waits
    for an acknowledgement that cannot come."""
    ours, supervisor = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=ours)
    ledger = RemoteLedger(writer)
    waiting = asyncio.create_task(ledger.record(RECORD))
    await asyncio.sleep(0)  # the record is sent and waits for its acknowledgement
    supervisor.close()
    ledger.fail_all("the CA supervisor is gone")
    with pytest.raises(LedgerError, match="supervisor is gone"):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(LedgerError, match="supervisor is gone"):
        await asyncio.wait_for(ledger.record(RECORD), 5)
    writer.close()


@pytest.mark.asyncio
async def test_a_record_on_a_closed_link_fails_instead_of_waiting() -> None:
    ours, supervisor = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=ours)
    ledger = RemoteLedger(writer)
    writer.close()
    supervisor.close()
    with pytest.raises(LedgerError, match="closed"):
        await asyncio.wait_for(ledger.record(RECORD), 5)
