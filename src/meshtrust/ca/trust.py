"""The mesh's trust bundle: versioned in the ledger, pushed to every agent with the CRL.

Theory of operation. The roots the mesh trusts are a *bundle* with a version, kept in the
ledger (schema migration 4, tables ``trust_bundles`` and ``trust_served``) so that every CA
replica serves the same one. A CA that finds no bundle at start writes version 1 from its
CA directory's roots (:meth:`TrustLedger.initialise`; replicas racing to do it agree, the
primary key decides). Each change adds a row with the next version: the version only grows
and survives restarts. Every CA process follows the current version (:class:`BundleWatch`,
one small ``SELECT`` every :data:`POLL_INTERVAL`).

Distribution. Agents keep one bidirectional stream open on the CA port,
``meshtrust.trust.v1.TrustService/WatchTrust`` (:class:`TrustService`, proto in
``proto/meshtrust/caapi/trust/trust.proto``), authenticated by the workload's certificate
(mTLS; a caller without a valid, unrevoked SVID is refused ``UNAUTHENTICATED``). Each
``TrustUpdate`` is whole: bundle version, root DERs, the CRLs (:mod:`meshtrust.ca.crl`: one
per live issuing CA, with those CAs' certificates) and the ``federated`` map (every
federated trust domain's last good bundle from the ledger,
:mod:`meshtrust.ca.federated_push`). The CA sends one at once and
another on every bundle or CRL change. The agent sends a ``TrustReport`` first and after it
has handed each change on: the bundle version it *serves*. The CA records it per identity
with the time (:class:`ServedRecorder`, batched: one transaction per flush whatever the
fleet size), and ``meshtrust ca rotation status`` shows who is behind.

The internal API to change the bundle, which the root-rotation orchestrator calls (and
``meshtrust ca bundle add-root`` / ``remove-root``): :func:`add_root` and
:func:`remove_root` (pure, they check the change) and :meth:`TrustLedger.set_roots` (writes
it, with an audit line, refusing a concurrent change). The older
``CrlService/WatchCrl`` stream stays for agents of earlier releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Stream
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from meshtrust.ca.authn import ClientCertAuthenticator
from meshtrust.ca.crl import CrlPublisher, CrlService
from meshtrust.ca.federated_push import EMPTY as EMPTY_FEDERATED
from meshtrust.ca.federated_push import FederatedWatch, federated_field
from meshtrust.ca.schema import audit, trust_bundles, trust_served
from meshtrust.caapi.trust import trust_pb2
from meshtrust.clock import Clock
from meshtrust.errors import (
    AuthenticationError,
    InvalidCertificate,
    InvalidInput,
    LedgerError,
    MeshTrustError,
)
from meshtrust.grpclib_compat import peer_cert_der
from meshtrust.pki import certs_pem, load_certs_pem

__all__ = [
    "POLL_INTERVAL",
    "WATCH_TRUST",
    "BundleWatch",
    "MeshBundle",
    "ServedRecorder",
    "ServedReport",
    "TrustLedger",
    "TrustService",
    "add_root",
    "behind",
    "chains_to",
    "fingerprint",
    "remove_root",
]

log = logging.getLogger("meshtrust.ca")

#: How often a CA process looks for a new bundle version in the ledger.
POLL_INTERVAL = 1.0
#: How often reported versions are written (one transaction for all reports since the last).
FLUSH_INTERVAL = 0.5
TRUST_SERVICE = "meshtrust.trust.v1.TrustService"
WATCH_TRUST = f"/{TRUST_SERVICE}/WatchTrust"
_DER = serialization.Encoding.DER


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, lower-case hex (as ``openssl x509 -fingerprint -sha256``, no colons)."""
    return hashlib.sha256(cert.public_bytes(_DER)).hexdigest()


def _match_fingerprint(text: str) -> str:
    wanted = text.strip().lower().replace(":", "").removeprefix("sha256:")
    if len(wanted) < 8 or any(c not in "0123456789abcdef" for c in wanted):
        raise InvalidInput(
            f"{text!r} is not a certificate fingerprint (SHA-256 hex, at least 8 digits; "
            "`meshtrust ca rotation status` lists them)"
        )
    return wanted


@dataclass(frozen=True)
class MeshBundle:
    """One version of the mesh's trust bundle."""

    version: int
    roots: tuple[x509.Certificate, ...]
    changed_at: dt.datetime
    actor: str = ""
    why: str = ""

    @functools.cached_property
    def roots_der(self) -> tuple[bytes, ...]:
        return tuple(r.public_bytes(_DER) for r in self.roots)


@dataclass(frozen=True)
class ServedReport:
    """What one identity's agent last reported: the bundle version it serves."""

    spiffe_id: str
    version: int
    serial: str
    last_seen: dt.datetime


def chains_to(chain: Sequence[x509.Certificate], root: x509.Certificate) -> bool:
    """Whether the top of ``chain`` (signing CA first, up to the root) is issued by ``root``."""
    top = chain[-1] if chain else None
    if top is None:
        return False
    if top == root:
        return True
    if top.issuer != root.subject:
        return False
    try:
        top.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def add_root(
    roots: Sequence[x509.Certificate], new: x509.Certificate
) -> tuple[x509.Certificate, ...]:
    """``roots`` plus ``new``. Raises :class:`InvalidInput` when ``new`` is in already or is
    not a CA certificate."""
    try:
        ca = new.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise InvalidInput(
            f"certificate {fingerprint(new)[:16]}… ({new.subject.rfc4514_string()}) is not a "
            "CA certificate (BasicConstraints CA=true): it cannot be a root"
        )
    if new in roots:
        raise InvalidInput(f"root {fingerprint(new)[:16]}… is in the bundle already")
    return (*roots, new)


def remove_root(
    roots: Sequence[x509.Certificate],
    wanted: str,
    signer_chain: Sequence[x509.Certificate] = (),
) -> tuple[tuple[x509.Certificate, ...], x509.Certificate]:
    """``roots`` without the one whose fingerprint starts with ``wanted``, and that root.
    Raises :class:`InvalidInput` when none or several match, when it is the last root, or when
    the active signing CA (``signer_chain``, signing certificate first) chains to it."""
    prefix = _match_fingerprint(wanted)
    found = [r for r in roots if fingerprint(r).startswith(prefix)]
    if not found:
        raise InvalidInput(f"no root in the bundle has fingerprint {wanted}")
    if len(found) > 1:
        raise InvalidInput(f"fingerprint {wanted} matches {len(found)} roots: give more digits")
    (root,) = found
    if len(roots) == 1:
        raise InvalidInput("refusing to remove the only root: the bundle would be empty")
    if chains_to(signer_chain, root):
        raise InvalidInput(
            f"refusing to remove root {fingerprint(root)[:16]}…: the active signing CA chains "
            "to it (sign under the new root first)"
        )
    return tuple(r for r in roots if r is not root), root


def behind(version: int, served: Iterable[ServedReport]) -> list[ServedReport]:
    """The reports of identities serving an older bundle than ``version``."""
    return sorted((s for s in served if s.version < version), key=lambda s: s.spiffe_id)


class TrustLedger:
    """The bundle and the served versions in the ledger (``engine``: a :class:`SqlLedger`'s,
    whose migrations made the tables). Every method raises :class:`LedgerError`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def current_version(self) -> int:
        try:
            with self._engine.connect() as conn:
                found = conn.execute(sa.select(sa.func.max(trust_bundles.c.version))).scalar()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the trust bundle: {exc.__class__.__name__}") from exc
        return int(found or 0)

    def current(self) -> MeshBundle | None:
        """The newest bundle, or None before :meth:`initialise`."""
        query = sa.select(trust_bundles).order_by(trust_bundles.c.version.desc()).limit(1)
        try:
            with self._engine.connect() as conn:
                row = conn.execute(query).mappings().first()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the trust bundle: {exc.__class__.__name__}") from exc
        if row is None:
            return None
        changed = row["changed_at"]
        if changed.tzinfo is None:  # SQLite hands back naive UTC
            changed = changed.replace(tzinfo=dt.UTC)
        try:
            roots = tuple(load_certs_pem(row["roots_pem"].encode(), source="the bundle"))
        except InvalidCertificate as exc:  # written by hand? keep serving the last good one
            raise LedgerError(
                f"trust bundle version {row['version']} in the ledger: {exc}"
            ) from None
        return MeshBundle(
            version=int(row["version"]),
            roots=roots,
            changed_at=changed,
            actor=row["actor"],
            why=row["why"],
        )

    def initialise(self, roots: Sequence[x509.Certificate], now: dt.datetime) -> MeshBundle:
        """The current bundle; when there is none, version 1 made of ``roots`` (the CA
        directory's). Replicas racing here agree: the first insert wins."""
        found = self.current()
        if found is not None:
            return found
        with contextlib.suppress(LedgerError):  # another replica was first: read its row
            self._insert(1, roots, now, "meshtrust ca serve", "the CA directory's roots")
        found = self.current()
        if found is None:
            raise LedgerError("cannot initialise the trust bundle in the ledger")
        return found

    def set_roots(
        self,
        roots: Sequence[x509.Certificate],
        now: dt.datetime,
        *,
        actor: str,
        why: str,
        expect_version: int,
    ) -> MeshBundle:
        """Write ``roots`` as the next version after ``expect_version`` (the version the
        change was computed from) with an audit line, in one transaction. Raises
        :class:`InvalidInput` for an empty bundle and :class:`LedgerError` when the bundle
        changed meanwhile (another change won: compute again from the new one)."""
        if not roots:
            raise InvalidInput("a trust bundle needs at least one root")
        try:
            self._insert(expect_version + 1, roots, now, actor, why)
        except LedgerError as exc:
            if self.current_version() != expect_version:
                raise LedgerError(
                    f"the trust bundle changed meanwhile (now version {self.current_version()},"
                    f" expected {expect_version}); nothing written"
                ) from exc
            raise
        found = self.current()
        assert found is not None
        return found

    def _insert(
        self,
        version: int,
        roots: Sequence[x509.Certificate],
        now: dt.datetime,
        actor: str,
        why: str,
    ) -> None:
        prints = ", ".join(fingerprint(r)[:16] for r in roots)
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    trust_bundles.insert(),
                    [
                        {
                            "version": version,
                            "roots_pem": certs_pem(roots).decode(),
                            "changed_at": now,
                            "actor": actor,
                            "why": why,
                        }
                    ],
                )
                conn.execute(
                    audit.insert(),
                    [
                        {
                            "at": now,
                            "actor": actor,
                            "action": "trust-bundle",
                            "detail": f"version {version}: roots {prints}; {why}",
                        }
                    ],
                )
        except IntegrityError as exc:
            raise LedgerError(f"trust bundle version {version} exists already") from exc
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot write the trust bundle: {exc.__class__.__name__}") from exc

    def record_served(self, reports: Sequence[ServedReport]) -> None:
        """Upsert ``reports`` (one row per identity) in one transaction."""
        if not reports:
            return
        dialect = self._engine.dialect.name
        insert: Any = (postgresql if dialect == "postgresql" else sqlite).insert(trust_served)
        statement = insert.on_conflict_do_update(
            index_elements=[trust_served.c.spiffe_id],
            set_={
                "version": insert.excluded.version,
                "serial": insert.excluded.serial,
                "last_seen": insert.excluded.last_seen,
            },
        )
        rows = [
            {
                "spiffe_id": r.spiffe_id,
                "version": r.version,
                "serial": r.serial,
                "last_seen": r.last_seen,
            }
            for r in reports
        ]
        try:
            with self._engine.begin() as conn:
                conn.execute(statement, rows)
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot record served versions: {exc.__class__.__name__}") from exc

    def served(self) -> list[ServedReport]:
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(trust_served)).mappings().all()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read served versions: {exc.__class__.__name__}") from exc
        out = []
        for row in rows:
            seen = row["last_seen"]
            if seen.tzinfo is None:
                seen = seen.replace(tzinfo=dt.UTC)
            out.append(ServedReport(row["spiffe_id"], int(row["version"]), row["serial"], seen))
        return sorted(out, key=lambda r: r.spiffe_id)


class BundleWatch:
    """Keeps :attr:`bundle` at the ledger's current version; run :meth:`run` as a task.
    A ledger that cannot be read keeps the last bundle (logged once per failure streak)."""

    def __init__(
        self,
        ledger: TrustLedger,
        initial: MeshBundle,
        clock: Clock,
        interval: float = POLL_INTERVAL,
        before_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``before_change``: awaited before a new version is handed out (the CA re-reads
        its signing slots and re-signs its CRLs there, so a version written after a slot
        change reaches agents with that slot's CRL: root rotation relies on it)."""
        self._ledger = ledger
        self._clock = clock
        self._interval = interval
        self._before_change = before_change
        self.bundle = initial
        self._changed = asyncio.Condition()
        self._failing = False

    async def wait_newer(self, version: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.bundle.version != version)

    async def poll_once(self) -> bool:
        try:
            version = await asyncio.to_thread(self._ledger.current_version)
            if version == self.bundle.version:
                self._failing = False
                return False
            found = await asyncio.to_thread(self._ledger.current)
        except LedgerError as exc:
            if not self._failing:
                log.error(
                    "cannot read the trust bundle (keeping version %d): %s",
                    self.bundle.version,
                    exc,
                )
            self._failing = True
            return False
        self._failing = False
        if found is None or found.version < self.bundle.version:
            return False
        if self._before_change is not None:
            try:
                await self._before_change()
            except MeshTrustError as exc:
                log.error("before trust bundle version %d: %s", found.version, exc)
        async with self._changed:
            self.bundle = found
            self._changed.notify_all()
        log.info("trust bundle version %d: %d root(s)", found.version, len(found.roots))
        return True

    async def run(self) -> None:
        while True:
            await self._clock.sleep(self._interval)
            await self.poll_once()


class ServedRecorder:
    """Collects agents' reports and writes them in batches (latest per identity wins)."""

    def __init__(self, ledger: TrustLedger, clock: Clock, interval: float = FLUSH_INTERVAL) -> None:
        self._ledger = ledger
        self._clock = clock
        self._interval = interval
        self._pending: dict[str, ServedReport] = {}

    def report(self, spiffe_id: str, version: int, serial: str) -> None:
        self._pending[spiffe_id] = ServedReport(spiffe_id, version, serial, self._clock.now())

    async def flush(self) -> None:
        pending, self._pending = list(self._pending.values()), {}
        try:
            await asyncio.to_thread(self._ledger.record_served, pending)
        except LedgerError as exc:
            log.error("cannot record %d served-version report(s), retrying: %s", len(pending), exc)
            for r in pending:
                self._pending.setdefault(r.spiffe_id, r)

    async def run(self) -> None:
        try:
            while True:
                await self._clock.sleep(self._interval)
                if self._pending:
                    await self.flush()
        finally:
            if self._pending:
                await asyncio.to_thread(self._ledger.record_served, list(self._pending.values()))


class TrustService:
    """``TrustService/WatchTrust`` on the CA port (see the module docstring)."""

    def __init__(
        self,
        bundles: BundleWatch,
        crls: CrlPublisher,
        recorder: ServedRecorder,
        authenticator: ClientCertAuthenticator | Callable[[], ClientCertAuthenticator],
        clock: Clock,
        crl_service: CrlService | None = None,
        federated: FederatedWatch | None = None,
    ) -> None:
        """``authenticator``: or a function giving the current one (the signing CAs, and so
        the chains a workload certificate may have, change with rotations)."""
        self._federated = federated  # federated bundles (ca/federated_push.py), or none
        self._crl_service = crl_service  # served beside, for agents of earlier releases
        self._bundles = bundles
        self._crls = crls
        self._recorder = recorder
        self._authenticator = authenticator
        self._clock = clock
        # The update for (bundle version, CRL number, federated digest), built once.
        self._update: tuple[tuple[int, int, str], trust_pb2.TrustUpdate] | None = None

    def __mapping__(self) -> dict[str, Handler]:
        older = self._crl_service.__mapping__() if self._crl_service is not None else {}
        return {
            **older,
            WATCH_TRUST: Handler(
                self.watch_trust,
                Cardinality.STREAM_STREAM,
                trust_pb2.TrustReport,
                trust_pb2.TrustUpdate,
            ),
        }

    def _caller(self, stream: Stream[Any, Any]) -> tuple[str, str]:
        der = peer_cert_der(stream)
        if der is None:
            raise AuthenticationError("the trust stream needs the workload's certificate (mTLS)")
        authenticator = self._authenticator
        if not isinstance(authenticator, ClientCertAuthenticator):
            authenticator = authenticator()
        caller = authenticator.authenticate(der, self._clock.now())
        return str(caller.identity), caller.subject.removeprefix("serial ")

    async def watch_trust(self, stream: Stream[Any, Any]) -> None:
        try:
            identity, serial = self._caller(stream)
        except MeshTrustError as exc:
            raise GRPCError(Status.UNAUTHENTICATED, str(exc)) from None
        first = await stream.recv_message()
        if first is None:
            return
        self._recorder.report(identity, first.serving_version, serial)
        reader = asyncio.ensure_future(self._read_reports(stream, identity, serial))
        try:
            await self._send_updates(stream, first.held_crl.strip().lower(), reader)
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):  # the agent went away: nothing to say
                await reader

    def _update_for(self, bundle: MeshBundle, number: int, der: bytes) -> trust_pb2.TrustUpdate:
        held = self._federated.held if self._federated is not None else EMPTY_FEDERATED
        key = (bundle.version, number, held.digest)
        if self._update is None or self._update[0] != key:
            made = trust_pb2.TrustUpdate(
                bundle_version=bundle.version,
                roots=bundle.roots_der,
                crl=der,
                federated=federated_field(held),
                crls=self._crls.ders,
                crl_issuers=self._crls.issuer_ders,
            )
            self._update = (key, made)
        return self._update[1]

    async def _read_reports(self, stream: Stream[Any, Any], identity: str, serial: str) -> None:
        async for report in stream:
            self._recorder.report(identity, report.serving_version, serial)

    async def _send_updates(
        self, stream: Stream[Any, Any], held_crl: str, reader: asyncio.Future[None]
    ) -> None:
        sent: tuple[int, int, str] | None = None
        while not reader.done():
            bundle, number, der = self._bundles.bundle, self._crls.number, self._crls.der
            federated = self._federated.held if self._federated is not None else EMPTY_FEDERATED
            if sent != (bundle.version, number, federated.digest):
                if sent is None and format(number, "x") == held_crl:  # it has this CRL
                    update = trust_pb2.TrustUpdate(
                        bundle_version=bundle.version,
                        roots=bundle.roots_der,
                        federated=federated_field(federated),
                    )
                else:
                    update = self._update_for(bundle, number, der)
                await stream.send_message(update)
                sent = (bundle.version, number, federated.digest)
            changes = [
                asyncio.ensure_future(self._bundles.wait_newer(bundle.version)),
                asyncio.ensure_future(self._crls.wait_newer(number)),
            ]
            if self._federated is not None:
                changes.append(asyncio.ensure_future(self._federated.wait_newer(federated.digest)))
            try:
                await asyncio.wait([*changes, reader], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for change in changes:
                    change.cancel()
