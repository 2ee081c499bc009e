"""The ledger: a durable record of every certificate the CA issued (and, later, revocations
and admin actions), through SQLAlchemy — a SQLite file by default, PostgreSQL by URL.

Theory of operation: the CA awaits :meth:`GroupCommitLedger.record` before it answers, so a
certificate a client holds is always on disk. Commits are shared: while one transaction is
being flushed, new records queue up and go out together in the next one. One fsync then pays
for many certificates, and durability does not cost throughput.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from meshtrust.ca.schema import audit, certificates, migrate
from meshtrust.clock import Clock, SystemClock
from meshtrust.errors import LedgerError
from meshtrust.fileio import create_private_file

__all__ = [
    "AuditEvent",
    "GroupCommitLedger",
    "IssuedRecord",
    "LedgerWriter",
    "SqlLedger",
    "default_ledger_url",
    "display_url",
]


def default_ledger_url(ca_dir: Path) -> str:
    return f"sqlite:///{(ca_dir / 'ledger.db').resolve()}"


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    serial: str
    spiffe_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str
    requester: str
    authenticator: str
    issued_at: dt.datetime
    cert_pem: str

    def as_row(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "spiffe_id": self.spiffe_id,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "key_type": self.key_type,
            "requester": self.requester,
            "authenticator": self.authenticator,
            "issued_at": self.issued_at,
            "cert_pem": self.cert_pem,
        }


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: dt.datetime
    actor: str
    action: str
    detail: str


class LedgerWriter(Protocol):
    """What the CA needs from a ledger: a durable, awaitable record of an issued cert."""

    async def record(self, rec: IssuedRecord) -> None: ...


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def display_url(url: str) -> str:
    """The URL for logs and messages: the password, if any, hidden."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


class SqlLedger:
    """Synchronous ledger access. One instance per process; thread-safe via the engine pool."""

    def __init__(self, url: str, clock: Clock | None = None) -> None:
        """Open (and create or migrate: :mod:`meshtrust.ca.schema`) the ledger at ``url``.

        Raises :class:`LedgerError` when the URL is unusable, the database unreachable, or
        its schema newer than this meshtrust knows.
        """
        self.url = url
        try:
            self._engine: Engine = sa.create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise LedgerError(f"ledger URL {display_url(url)} cannot be used: {exc}") from exc
        if self._engine.dialect.name == "sqlite":
            _private_sqlite_files(self._engine.url.database)
            sa.event.listen(self._engine, "connect", _sqlite_pragmas)
        try:
            self.schema_found = migrate(
                self._engine, (clock or SystemClock()).now(), display_url(url)
            )
        except LedgerError:
            self._engine.dispose()
            raise

    def record_batch(self, records: Sequence[IssuedRecord]) -> None:
        """Insert ``records`` in one transaction, committed durably before returning."""
        if not records:
            return
        try:
            with self._engine.begin() as conn:
                conn.execute(certificates.insert(), [r.as_row() for r in records])
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger write failed: {exc.__class__.__name__}") from exc

    def add_audit(self, event: AuditEvent) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    audit.insert(),
                    [
                        {
                            "at": event.at,
                            "actor": event.actor,
                            "action": event.action,
                            "detail": event.detail,
                        }
                    ],
                )
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger write failed: {exc.__class__.__name__}") from exc

    def certificates(
        self,
        *,
        expiring_before: dt.datetime | None = None,
        not_expired_at: dt.datetime | None = None,
        spiffe_id: str | None = None,
    ) -> list[IssuedRecord]:
        """Issued certificates, soonest expiry first."""
        q = sa.select(certificates).order_by(certificates.c.not_after)
        if expiring_before is not None:
            q = q.where(certificates.c.not_after <= expiring_before)
        if not_expired_at is not None:
            q = q.where(certificates.c.not_after > not_expired_at)
        if spiffe_id is not None:
            q = q.where(certificates.c.spiffe_id == spiffe_id)
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(q).mappings().all()
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger read failed: {exc.__class__.__name__}") from exc
        return [
            IssuedRecord(
                serial=r["serial"],
                spiffe_id=r["spiffe_id"],
                not_before=_utc(r["not_before"]),
                not_after=_utc(r["not_after"]),
                key_type=r["key_type"],
                requester=r["requester"],
                authenticator=r["authenticator"],
                issued_at=_utc(r["issued_at"]),
                cert_pem=r["cert_pem"],
            )
            for r in rows
        ]

    def serials(self) -> set[str]:
        with self._engine.connect() as conn:
            return {row[0] for row in conn.execute(sa.select(certificates.c.serial))}

    def audit_events(self) -> list[AuditEvent]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(audit).order_by(audit.c.id)).mappings().all()
        return [AuditEvent(_utc(r["at"]), r["actor"], r["action"], r["detail"]) for r in rows]

    def close(self) -> None:
        self._engine.dispose()


def _private_sqlite_files(database: str | None) -> None:
    """The ledger names every identity and requester: its file is 0600 before SQLite opens
    it (SQLite gives the ``-wal`` and ``-shm`` files the main file's mode), and a ledger of
    an earlier run, or its side files, is tightened to 0600. Raises :class:`LedgerError`."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    try:
        create_private_file(path)
        for side in ("-wal", "-shm", "-journal"):
            if (side_file := path.with_name(path.name + side)).exists():
                create_private_file(side_file)
    except OSError as exc:
        raise LedgerError(f"cannot create the ledger {path}: {exc.strerror}") from exc


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # every commit reaches the disk
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class GroupCommitLedger:
    """Async, group-committing front of a :class:`SqlLedger` (see the module docstring)."""

    def __init__(self, ledger: SqlLedger) -> None:
        self._ledger = ledger
        self._pending: list[tuple[Sequence[IssuedRecord], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ledger")

    async def record(self, rec: IssuedRecord) -> None:
        """Return once ``rec`` is committed; raises :class:`LedgerError` if it could not be."""
        await self.record_many((rec,))

    async def record_many(self, recs: Sequence[IssuedRecord]) -> None:
        """Return once all of ``recs`` are committed (in one transaction); raises
        :class:`LedgerError` if they could not be. One future for the group: a worker's
        batch costs the supervisor one wait, not one per certificate."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((recs, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            records = [r for recs, _ in batch for r in recs]
            try:
                await loop.run_in_executor(self._executor, self._ledger.record_batch, records)
            except Exception as exc:  # every waiter learns its record is not durable
                err = exc if isinstance(exc, LedgerError) else LedgerError(str(exc))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def aclose(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        self._executor.shutdown(wait=True)
