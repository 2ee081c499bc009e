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
import contextlib
import datetime as dt
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.engine import Engine, RowMapping
from sqlalchemy.exc import SQLAlchemyError

from meshtrust.ca.revocation import Block, Revocation, RevocationState
from meshtrust.ca.schema import audit, blocks, certificates, migrate, revocations
from meshtrust.clock import Clock, SystemClock
from meshtrust.errors import InvalidInput, LedgerError
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

    @property
    def engine(self) -> Engine:
        """The engine, for modules that keep their own tables (:mod:`meshtrust.ca.signing`,
        :mod:`meshtrust.ca.trust`)."""
        return self._engine

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
        return [_record(r) for r in rows]

    def certificate(self, serial: str) -> IssuedRecord | None:
        """The certificate with ``serial`` (the ledger's hex form), or None."""
        try:
            with self._engine.connect() as conn:
                row = (
                    conn.execute(sa.select(certificates).where(certificates.c.serial == serial))
                    .mappings()
                    .first()
                )
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger read failed: {exc.__class__.__name__}") from exc
        return None if row is None else _record(row)

    # Revocations and blocks (:mod:`meshtrust.ca.revocation`). Each change is one transaction
    # holding its audit line and its rows: recorded before any replica can act on it.

    def revoke_serial(
        self, serial: str, reason: x509.ReasonFlags, actor: str, why: str, now: dt.datetime
    ) -> Revocation:
        """Revoke the certificate ``serial``. Raises :class:`InvalidInput` when the ledger
        has no such certificate or it is revoked already (nothing is written then)."""
        with self._writing() as conn:
            cert = conn.execute(
                sa.select(certificates.c.spiffe_id).where(certificates.c.serial == serial)
            ).first()
            if cert is None:
                raise InvalidInput(
                    f"no certificate with serial {serial} in the ledger "
                    "(see `meshtrust ca certs list`)"
                )
            _refuse_revoked_again(conn, serial)
            revocation = Revocation(serial, cert[0], reason, now, actor, why)
            conn.execute(revocations.insert(), [_revocation_row(revocation)])
            _audit(
                conn,
                now,
                actor,
                "revoke",
                f"serial={serial} spiffe_id={cert[0]} reason={reason.value} why={why!r}",
            )
        return revocation

    def revoke_identity(
        self, spiffe_id: str, reason: x509.ReasonFlags, actor: str, why: str, now: dt.datetime
    ) -> tuple[Block, list[Revocation]]:
        """Block issuance for ``spiffe_id`` and revoke its unexpired certificates not yet
        revoked. Raises :class:`InvalidInput` when it is blocked already."""
        with self._writing() as conn:
            active = _active_block(conn, spiffe_id)
            if active is not None:
                since = f"{_utc(active['blocked_at']):%Y-%m-%d %H:%M:%SZ}"
                raise InvalidInput(
                    f"{spiffe_id} is blocked already (since {since} by {active['actor']}); "
                    "`meshtrust ca unblock` lifts it"
                )
            block = Block(spiffe_id, now, actor, why)
            conn.execute(
                blocks.insert(),
                [{"spiffe_id": spiffe_id, "actor": actor, "why": why, "blocked_at": now}],
            )
            already = sa.select(revocations.c.serial)
            serials = conn.execute(
                sa.select(certificates.c.serial).where(
                    certificates.c.spiffe_id == spiffe_id,
                    certificates.c.not_after > now,
                    certificates.c.serial.not_in(already),
                )
            ).scalars()
            revoked = [Revocation(s, spiffe_id, reason, now, actor, why) for s in serials]
            if revoked:
                conn.execute(revocations.insert(), [_revocation_row(r) for r in revoked])
            _audit(
                conn,
                now,
                actor,
                "block",
                f"spiffe_id={spiffe_id} revoked={len(revoked)} reason={reason.value} why={why!r}",
            )
        return block, revoked

    def unblock(self, spiffe_id: str, actor: str, why: str, now: dt.datetime) -> Block:
        """Lift the block on ``spiffe_id`` (its revoked certificates stay revoked). Raises
        :class:`InvalidInput` when it is not blocked."""
        with self._writing() as conn:
            active = _active_block(conn, spiffe_id)
            if active is None:
                raise InvalidInput(f"{spiffe_id} is not blocked")
            conn.execute(
                blocks.update()
                .where(blocks.c.id == active["id"])
                .values(lifted_at=now, lifted_by=actor)
            )
            _audit(conn, now, actor, "unblock", f"spiffe_id={spiffe_id} why={why!r}")
        return Block(spiffe_id, _utc(active["blocked_at"]), active["actor"], active["why"])

    def revoke_late(self, now: dt.datetime) -> list[Revocation]:
        """Revoke every unexpired certificate of a blocked identity that has no revocation
        row yet, and return those revocations (usually none).

        A replica that had not yet read a block may sign for the identity, or may have
        signed before the block and committed after ``revoke_identity`` looked: such a
        certificate would otherwise stay out of every CRL, since nothing changes the
        revision after it lands. Every replica calls this while a block is in force; a
        second replica inserting the same row at the same moment is not an error."""
        late = (
            sa.select(certificates.c.serial, certificates.c.spiffe_id)
            .join(
                blocks,
                sa.and_(
                    blocks.c.spiffe_id == certificates.c.spiffe_id, blocks.c.lifted_at.is_(None)
                ),
            )
            .where(
                certificates.c.not_after > now,
                certificates.c.serial.not_in(sa.select(revocations.c.serial)),
            )
        )
        try:
            with self._engine.begin() as conn:
                rows = conn.execute(late).all()
                if not rows:
                    return []
                revoked = [
                    Revocation(
                        serial,
                        spiffe_id,
                        x509.ReasonFlags.privilege_withdrawn,
                        now,
                        "meshtrust-ca",
                        "issued while its identity was blocked",
                    )
                    for serial, spiffe_id in rows
                ]
                conn.execute(revocations.insert(), [_revocation_row(r) for r in revoked])
                for r in revoked:
                    _audit(
                        conn,
                        now,
                        r.actor,
                        "revoke",
                        f"serial={r.serial} spiffe_id={r.spiffe_id} "
                        f"reason={r.reason.value} why={r.why!r}",
                    )
        except sa.exc.IntegrityError:
            return []  # another replica wrote them first: the revision moves all the same
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger write failed: {exc.__class__.__name__}") from exc
        return revoked

    def revocation_revision(self) -> int:
        """A number that grows with every revocation, block and unblock."""
        q = sa.select(
            sa.select(sa.func.count()).select_from(revocations).scalar_subquery()
            + sa.select(sa.func.count()).select_from(blocks).scalar_subquery()
            + sa.select(sa.func.count())
            .select_from(blocks)
            .where(blocks.c.lifted_at.is_not(None))
            .scalar_subquery()
        )
        try:
            with self._engine.connect() as conn:
                return int(conn.execute(q).scalar() or 0)
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger read failed: {exc.__class__.__name__}") from exc

    def revocation_state(self, now: dt.datetime) -> RevocationState:
        """Revocations of unexpired certificates and the active blocks, at one revision
        (read in one transaction). Every unexpired certificate of a blocked identity counts
        as revoked (see :mod:`meshtrust.ca.revocation`)."""
        try:
            with self._engine.begin() as conn:
                return self._read_state(conn, now)
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger read failed: {exc.__class__.__name__}") from exc

    def _read_state(self, conn: sa.Connection, now: dt.datetime) -> RevocationState:
        revision = conn.execute(sa.select(sa.func.count()).select_from(revocations)).scalar_one()
        block_rows = conn.execute(sa.select(blocks)).mappings().all()
        revision += len(block_rows) + sum(r["lifted_at"] is not None for r in block_rows)
        blocked = {
            r["spiffe_id"]: Block(r["spiffe_id"], _utc(r["blocked_at"]), r["actor"], r["why"])
            for r in block_rows
            if r["lifted_at"] is None
        }
        rows = conn.execute(
            sa.select(revocations)
            .join(certificates, certificates.c.serial == revocations.c.serial)
            .where(certificates.c.not_after > now)
        ).mappings()
        revoked = {
            r["serial"]: Revocation(
                r["serial"],
                r["spiffe_id"],
                x509.ReasonFlags(r["reason"]),
                _utc(r["revoked_at"]),
                r["actor"],
                r["why"],
            )
            for r in rows
        }
        for block in blocked.values():
            late = conn.execute(
                sa.select(certificates.c.serial, certificates.c.issued_at).where(
                    certificates.c.spiffe_id == block.spiffe_id,
                    certificates.c.not_after > now,
                )
            )
            for serial, issued_at in late:
                revoked.setdefault(
                    serial,
                    Revocation(
                        serial,
                        block.spiffe_id,
                        x509.ReasonFlags.privilege_withdrawn,
                        _utc(issued_at),
                        block.actor,
                        "issued after its identity was blocked",
                    ),
                )
        return RevocationState(revision, revoked, blocked)

    def revocations(self) -> dict[str, Revocation]:
        """Every revocation recorded, by serial (expired certificates' too)."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(revocations)).mappings().all()
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger read failed: {exc.__class__.__name__}") from exc
        return {
            r["serial"]: Revocation(
                r["serial"],
                r["spiffe_id"],
                x509.ReasonFlags(r["reason"]),
                _utc(r["revoked_at"]),
                r["actor"],
                r["why"],
            )
            for r in rows
        }

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sa.Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger write failed: {exc.__class__.__name__}") from exc

    def serials(self) -> set[str]:
        with self._engine.connect() as conn:
            return {row[0] for row in conn.execute(sa.select(certificates.c.serial))}

    def audit_events(self) -> list[AuditEvent]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(audit).order_by(audit.c.id)).mappings().all()
        return [AuditEvent(_utc(r["at"]), r["actor"], r["action"], r["detail"]) for r in rows]

    def close(self) -> None:
        self._engine.dispose()


def _record(r: RowMapping) -> IssuedRecord:
    return IssuedRecord(
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


def _revocation_row(r: Revocation) -> dict[str, Any]:
    return {
        "serial": r.serial,
        "spiffe_id": r.spiffe_id,
        "reason": r.reason.value,
        "actor": r.actor,
        "why": r.why,
        "revoked_at": r.revoked_at,
    }


def _refuse_revoked_again(conn: sa.Connection, serial: str) -> None:
    row = conn.execute(
        sa.select(revocations.c.revoked_at, revocations.c.actor).where(
            revocations.c.serial == serial
        )
    ).first()
    if row is not None:
        raise InvalidInput(
            f"certificate {serial} was revoked already at {_utc(row[0]):%Y-%m-%d %H:%M:%SZ} "
            f"by {row[1]}"
        )


def _active_block(conn: sa.Connection, spiffe_id: str) -> RowMapping | None:
    return (
        conn.execute(
            sa.select(blocks).where(blocks.c.spiffe_id == spiffe_id, blocks.c.lifted_at.is_(None))
        )
        .mappings()
        .first()
    )


def _audit(conn: sa.Connection, now: dt.datetime, actor: str, action: str, detail: str) -> None:
    conn.execute(audit.insert(), [{"at": now, "actor": actor, "action": action, "detail": detail}])


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


_WAL_SWITCH_SECONDS = 10.0


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Connection setup: the busy timeout first, so that what follows waits for a lock
    instead of failing; then WAL mode. Switching a fresh database to WAL needs its
    exclusive lock, and SQLite answers SQLITE_BUSY at once, without calling the busy
    handler, when two connections want it together (its deadlock avoidance: the CA's
    workers starting at the same moment hit this), so the switch is retried for a while."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=10000")
        deadline = time.monotonic() + _WAL_SWITCH_SECONDS
        delay = 0.005
        while True:
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        cur.execute("PRAGMA synchronous=FULL")  # every commit reaches the disk
    finally:
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
