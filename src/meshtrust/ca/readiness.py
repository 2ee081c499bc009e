"""Is the CA ready? Whether it can do its job: serve, and record what it issues.

Theory of operation. :func:`decide_readiness` is the decision, a pure function of what the
process that owns the ledger knows: is it stopping, are its workers up, and did the last
ledger commit fail. :class:`LedgerHealth` remembers the last commit's outcome; it is fed
where commits are awaited, by :class:`WatchedLedger` around the group-committing ledger
(every certificate, in one process or from every worker through the supervisor).

A failed commit (disk full, I/O error, a read-only file) makes the CA not ready at once,
with the database's own reason. It is ready again only once a commit succeeds again: the
next real certificate, or -- because a CA that is not ready gets no traffic from a load
balancer that honours readiness -- a probe: while unready, :func:`probe_ledger` tries a
small audit write (``ledger-writable``) every :data:`PROBE_INTERVAL` seconds. Failed
probes write nothing; the one that succeeds leaves one audit row saying the ledger took
writes again, which is worth having in the audit trail anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshtrust.ca.ledger import AuditEvent, GroupCommitLedger, IssuedRecord, SqlLedger
from meshtrust.clock import Clock
from meshtrust.errors import LedgerError

__all__ = [
    "PROBE_INTERVAL",
    "LedgerHealth",
    "Readiness",
    "WatchedLedger",
    "decide_readiness",
    "ledger_failure_reason",
    "probe_ledger",
]

log = logging.getLogger("meshtrust.ca")

#: Seconds between probe writes while the ledger is failing.
PROBE_INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str  # why not; "" when ready


def decide_readiness(
    *, stopping: bool, workers_down: int = 0, ledger_failure: str | None = None
) -> Readiness:
    """Ready unless the CA is stopping, a worker is not (yet) serving, or the ledger's last
    commit failed (``ledger_failure`` says how). The first of these is the reason given."""
    if stopping:
        return Readiness(False, "the CA is stopping")
    if workers_down:
        return Readiness(False, f"{workers_down} worker(s) not serving")
    if ledger_failure is not None:
        return Readiness(False, f"the ledger cannot record certificates: {ledger_failure}")
    return Readiness(True, "")


def ledger_failure_reason(exc: LedgerError) -> str:
    """What the database said, for people: ``database or disk is full`` rather than the
    SQLAlchemy class name. The driver's message carries no statement or parameters."""
    cause = exc.__cause__
    orig = getattr(cause, "orig", None)
    detail = str(orig) if orig is not None else ""
    if not detail:
        return str(exc)
    # "ledger write failed: OperationalError" -> "ledger write failed: database or disk is full"
    return f"{str(exc).partition(': ')[0]}: {detail}"


class LedgerHealth:
    """The outcome of the last ledger commit: ``failure`` is None after a success."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self._failed = asyncio.Event()

    def succeeded(self) -> None:
        if self.failure is not None:
            log.warning("ledger: commits succeed again; ready")
        self.failure = None
        self._failed.clear()

    def failed(self, reason: str) -> None:
        if self.failure is None:
            log.error("ledger: commit failed (%s); not ready until one succeeds", reason)
        self.failure = reason
        self._failed.set()

    async def wait_failed(self) -> None:
        await self._failed.wait()


class WatchedLedger:
    """A :class:`GroupCommitLedger` whose every awaited commit reports to ``health``."""

    def __init__(self, inner: GroupCommitLedger, health: LedgerHealth) -> None:
        self._inner = inner
        self.health = health

    async def record(self, rec: IssuedRecord) -> None:
        await self.record_many((rec,))

    async def record_many(self, recs: Sequence[IssuedRecord]) -> None:
        try:
            await self._inner.record_many(recs)
        except LedgerError as exc:
            self.health.failed(ledger_failure_reason(exc))
            raise
        self.health.succeeded()

    async def aclose(self) -> None:
        await self._inner.aclose()


async def probe_ledger(
    health: LedgerHealth,
    sql: SqlLedger,
    clock: Clock,
    interval: float = PROBE_INTERVAL,
    write: Callable[[SqlLedger, AuditEvent], None] = SqlLedger.add_audit,
) -> None:
    """Forever: once the ledger failed, try a small audit write every ``interval`` seconds
    until one succeeds (see the module docs). Cancel to stop."""
    loop = asyncio.get_running_loop()
    while True:
        await health.wait_failed()
        while health.failure is not None:
            await clock.sleep(interval)
            if health.failure is None:  # a real commit succeeded meanwhile
                break
            event = AuditEvent(clock.now(), "meshtrust ca serve", "ledger-writable", "probe")
            try:
                await loop.run_in_executor(None, write, sql, event)
            except LedgerError as exc:
                health.failed(ledger_failure_reason(exc))
            else:
                health.succeeded()
