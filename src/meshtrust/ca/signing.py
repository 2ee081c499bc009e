"""Signing-CA (intermediate) rotation: prepared, active and old slots, as in SPIRE.

Theory of operation. Every intermediate the CA has signed with, or will, is one row of the
ledger's ``signing_slots`` table (migration 3), numbered by a *generation* (1 is the CA
directory's own ``ca-cert.pem``), and sits in one slot::

    PREPARED --(activate_at of the ACTIVE one)--> ACTIVE --(a successor activates)--> OLD
    OLD --(its NotAfter)--> RETIRED

* :func:`decide_slots` is the whole policy, a pure function of (:class:`Slots`, now): SPIRE's
  ``preparationThreshold``/``keyActivationThreshold`` (``pkg/server/ca/manager``): with
  lifetime = NotAfter - issued-at, prepare a successor at ``NotAfter - min(lifetime/2, 30d)``
  and activate it at ``NotAfter - min(lifetime/6, 7d)``. The old one stays in OLD until it
  expires: the certificates it issued stay valid (the trust bundle is the root, so peers
  verify either chain) and workloads move to the new chain at their next renewal.
* Only a CA that holds the root key (``ca init`` mode: ``root-key.pem`` in the CA directory)
  can prepare. A plugged-in CA (Istio ``cacerts`` without the root key) gets no successor;
  it warns as its chain nears expiry instead (:func:`chain_expiry_warning`).
* Replicas share nothing but the ledger. Each CA process runs a :class:`SigningWatch`: every
  :data:`POLL_INTERVAL` it reads the slots' revision (one small ``SELECT``), applies what
  :func:`decide_slots` says through :class:`SlotLedger` (each step in one transaction under
  an advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite, and idempotent: the row of
  a generation is the arbiter, so two replicas preparing at once make one intermediate), and
  switches the signer it hands to the authority when the ACTIVE generation changed.
* Each successor's key is its own 0600 file in the CA directory
  (``signing-key-<generation>-<random>.pem``, written atomically under the slot lock
  *before* its row is committed, removed if the commit fails; a replica that finds the
  generation made already writes nothing). A slot whose key file or row is
  corrupt is reported (logged once, named by generation, file and field) and never
  activated: the CA keeps signing with the active one, and a prepared slot that cannot be
  loaded is retired so a fresh one is prepared.

Why each successor has a new key, and one CRL per slot. Revocation is a CRL signed by the
issuing CA, and Envoy (like ``openssl verify -crl_check``) looks a peer leaf's CRL up by its
issuer's name *and* key: a leaf whose issuer has no CRL in the sidecar's list is refused
("unable to get certificate CRL"). So the CA publishes one CRL per live slot (active,
prepared, old), each signed by that slot's key (:meth:`SigningWatch.issuers`,
:class:`~meshtrust.ca.crl.CrlPublisher`), and agents hand all of them to Envoy: a prepared
successor's CRL reaches every sidecar from the moment the slot exists, long before its
activation (a sixth of the lifetime before it at least), and the old one's stays while its
leaves live. Each successor therefore gets a fresh key, as in SPIRE (``fresh_keys=False``
re-certifies the active key instead, as releases before per-slot CRLs did).

:func:`switch_to_root` is the entry point for root rotation: it makes an intermediate under a
new root (or a given plugged-in intermediate) ACTIVE for every replica at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from meshtrust.ca.cadir import CaMaterial
from meshtrust.ca.schema import audit, signing_slots
from meshtrust.clock import Clock
from meshtrust.errors import InvalidCertificate, LedgerError, MeshTrustError
from meshtrust.fileio import write_private_file
from meshtrust.pki import (
    KeyType,
    PrivateKey,
    Signer,
    certs_pem,
    generate_key,
    load_certs_pem,
    load_private_key_pem,
    make_intermediate,
    private_key_pem,
)
from meshtrust.pki.profile import CLOCK_SKEW

__all__ = [
    "ACTIVATION_CAP",
    "POLL_INTERVAL",
    "PREPARATION_CAP",
    "ChainWarning",
    "SigningMaterial",
    "SigningWatch",
    "Slot",
    "SlotError",
    "SlotLedger",
    "SlotRecord",
    "SlotStep",
    "Slots",
    "activation_time",
    "chain_expiry_warning",
    "decide_slots",
    "load_signing_material",
    "preparation_time",
    "switch_to_root",
    "trusted_roots",
]

log = logging.getLogger("meshtrust.ca")

#: SPIRE's caps: never prepare more than 30 days, or activate more than 7 days, before NotAfter.
PREPARATION_CAP = dt.timedelta(days=30)
ACTIVATION_CAP = dt.timedelta(days=7)
#: How often a CA process reads the slots: the bound on how long an activation made by
#: another replica takes to reach this one.
POLL_INTERVAL = 1.0
# "meshslot" in ASCII: the advisory lock of slot changes (schema.py's is "meshtrst").
SLOT_LOCK_KEY = 0x6D657368736C6F74 - (1 << 63)


class SlotError(LedgerError):
    """A slot row or a slot's key file that cannot be used (names generation, field, file)."""


class Slot(enum.IntEnum):
    """A row's slot; the values only grow (see the module docstring)."""

    PREPARED = 1
    ACTIVE = 2
    OLD = 3
    RETIRED = 4


def preparation_time(issued_at: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When a successor of an intermediate is prepared (SPIRE ``preparationThreshold``)."""
    return not_after - min((not_after - issued_at) / 2, PREPARATION_CAP)


def activation_time(issued_at: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When the successor becomes the signer (SPIRE ``keyActivationThreshold``)."""
    return not_after - min((not_after - issued_at) / 6, ACTIVATION_CAP)


@dataclass(frozen=True, slots=True)
class SlotRecord:
    """One row of ``signing_slots``, parsed (no key: that is read only to sign)."""

    generation: int
    slot: Slot
    chain: tuple[x509.Certificate, ...]  # the signing CA first, up to (not incl.) the roots
    roots: tuple[x509.Certificate, ...]
    key_file: str
    issued_at: dt.datetime
    activated_at: dt.datetime | None = None

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def prepare_at(self) -> dt.datetime:
        return preparation_time(self.issued_at, self.not_after)

    @property
    def activate_at(self) -> dt.datetime:
        return activation_time(self.issued_at, self.not_after)

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.issued_at

    @property
    def chain_not_after(self) -> dt.datetime:
        """When the chain stops verifying: the earliest NotAfter of its certificates (an
        intermediate above the signing CA may expire first). What the chain-expiry warning
        (:func:`chain_expiry_warning`) is about."""
        return min(c.not_valid_after_utc for c in self.chain)


@dataclass(frozen=True, slots=True)
class Slots:
    """Every intermediate not yet retired, by slot, at one ledger revision. Pure."""

    revision: int = 0
    active: SlotRecord | None = None
    prepared: SlotRecord | None = None
    old: tuple[SlotRecord, ...] = ()
    #: Rows that could not be parsed: (generation, state, message). Never activated.
    problems: tuple[tuple[int, int, str], ...] = ()
    #: The highest generation ever recorded (retired ones included).
    last_generation: int = 0

    @property
    def records(self) -> tuple[SlotRecord, ...]:
        found = [s for s in (self.active, self.prepared) if s is not None]
        return (*found, *self.old)

    @property
    def next_generation(self) -> int:
        gens = [r.generation for r in self.records] + [g for g, _, _ in self.problems]
        return max([self.last_generation, *gens]) + 1


class SlotStep(enum.StrEnum):
    PREPARE = "prepare"
    ACTIVATE = "activate"
    RETIRE = "retire"


@dataclass(frozen=True, slots=True)
class Decision:
    step: SlotStep
    generation: int


def decide_slots(slots: Slots, now: dt.datetime, *, can_prepare: bool) -> list[Decision]:
    """What to do with the slots at ``now`` (pure; see the module docstring).

    * RETIRE every OLD slot past its NotAfter (and a PREPARED one whose row is broken is
      retired by the caller, which alone can tell: it needs the key file);
    * ACTIVATE the PREPARED slot once ``now`` reaches the ACTIVE one's activation time (or
      the ACTIVE one has expired);
    * PREPARE generation ``next_generation`` once ``now`` reaches the ACTIVE one's preparation
      time, if there is no PREPARED slot and ``can_prepare`` (the CA holds the root key).
    """
    out = [Decision(SlotStep.RETIRE, o.generation) for o in slots.old if now >= o.not_after]
    active = slots.active
    if active is None:
        return out
    if slots.prepared is not None:
        if now >= active.activate_at or now >= active.not_after:
            out.append(Decision(SlotStep.ACTIVATE, slots.prepared.generation))
    elif can_prepare and now >= active.prepare_at:
        out.append(Decision(SlotStep.PREPARE, slots.next_generation))
    return out


@dataclass(frozen=True, slots=True)
class ChainWarning:
    """A plugged-in CA's chain nearing expiry: which threshold it crossed."""

    level: int  # 1: successor would be prepared by now; 2: would be active; 3: last day
    not_after: dt.datetime
    left: dt.timedelta

    @property
    def summary(self) -> str:
        """When the chain expires, how soon, and the level's name."""
        days = self.left.total_seconds() / 86400
        what = ("", "notice", "warning", "critical")[self.level]
        return (
            f"signing CA chain expires at {self.not_after:%Y-%m-%d %H:%M:%SZ} "
            f"({days:.1f} days left, {what})"
        )

    @property
    def advice(self) -> str:
        """What to do about it."""
        return (
            "this CA has no root key and cannot rotate its intermediate itself; put a renewed "
            "plugged-in CA in the CA directory (or run `meshtrust ca rotate-root`) before then"
        )

    @property
    def message(self) -> str:
        """The whole warning, as the CA logs it and `meshtrust ca slots` shows it."""
        return f"{self.summary}: {self.advice}"


def chain_expiry_warning(
    issued_at: dt.datetime, not_after: dt.datetime, now: dt.datetime
) -> ChainWarning | None:
    """The warning a CA without the root key gives about its chain at ``now`` (pure).

    Level 1 from the moment a CA with the root key would prepare a successor
    (:func:`preparation_time`), 2 from its activation time, 3 in the last
    ``min(lifetime/30, 1 day)``; None before.
    """
    left = not_after - now
    last = min((not_after - issued_at) / 30, dt.timedelta(days=1))
    if now >= not_after - last:
        level = 3
    elif now >= activation_time(issued_at, not_after):
        level = 2
    elif now >= preparation_time(issued_at, not_after):
        level = 1
    else:
        return None
    return ChainWarning(level, not_after, left)


@dataclass(frozen=True, slots=True)
class SigningMaterial:
    """What the authority signs with: one generation's signer and the chain it returns."""

    generation: int
    signer: Signer
    intermediates: tuple[x509.Certificate, ...]  # signing cert first
    roots: tuple[x509.Certificate, ...]
    #: Every CA certificate a client certificate of this trust domain may chain through now
    #: (active, old and prepared intermediates): renewal by client certificate needs them.
    known_intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def chain_tail(self) -> list[str]:
        """The tail of every response: intermediates one per element, the roots last."""
        return [c.public_bytes(serialization.Encoding.PEM).decode() for c in self.intermediates] + [
            certs_pem(self.roots).decode()
        ]


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _parse_row(row: sa.RowMapping) -> SlotRecord:
    gen = int(row["generation"])
    where = f"ledger table signing_slots, generation {gen}"
    try:
        slot = Slot(int(row["state"]))
    except ValueError:
        raise SlotError(f"{where}: field state: unknown slot {row['state']!r}") from None
    parsed: dict[str, tuple[x509.Certificate, ...]] = {}
    for name in ("cert_pem", "roots_pem"):
        try:
            parsed[name] = tuple(load_certs_pem(str(row[name]).encode(), source=f"field {name}"))
        except InvalidCertificate as exc:
            raise SlotError(f"{where}: {exc}") from None
    key_file = str(row["key_file"])
    if not key_file or "/" in key_file or key_file.startswith("."):
        raise SlotError(f"{where}: field key_file: {key_file!r} is not a file name")
    return SlotRecord(
        generation=gen,
        slot=slot,
        chain=parsed["cert_pem"],
        roots=parsed["roots_pem"],
        key_file=key_file,
        issued_at=_utc(row["issued_at"]),
        activated_at=_utc(row["activated_at"]) if row["activated_at"] is not None else None,
    )


def _slots_from_rows(
    rows: Sequence[sa.RowMapping], revision: int, last_generation: int = 0
) -> Slots:
    active: SlotRecord | None = None
    prepared: SlotRecord | None = None
    old: list[SlotRecord] = []
    problems: list[tuple[int, int, str]] = []
    for row in rows:
        try:
            record = _parse_row(row)
        except SlotError as exc:
            problems.append((int(row["generation"]), int(row["state"]), str(exc)))
            continue
        if record.slot is Slot.ACTIVE:
            # Several ACTIVE rows cannot be made by this module; if a hand edit made them,
            # the newest wins and the others count as OLD.
            if active is not None:
                old.append(active)
            active = record
        elif record.slot is Slot.PREPARED:
            prepared = record if prepared is None else max(prepared, record, key=_gen)
        elif record.slot is Slot.OLD:
            old.append(record)
    return Slots(
        revision,
        active,
        prepared,
        tuple(sorted(old, key=_gen)),
        tuple(problems),
        last_generation,
    )


def _gen(record: SlotRecord) -> int:
    return record.generation


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _fp(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def load_slot_key(ca_dir: Path, record: SlotRecord) -> PrivateKey:
    """The private key of ``record`` from its file in ``ca_dir``, checked against its
    certificate. Raises :class:`SlotError` naming the file."""
    path = ca_dir / record.key_file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SlotError(
            f"signing CA generation {record.generation}: cannot read {path}: {exc.strerror}"
        ) from exc
    try:
        key = load_private_key_pem(data, source=str(path))
    except InvalidCertificate as exc:
        raise SlotError(f"signing CA generation {record.generation}: {exc}") from exc
    if key.public_key() != record.cert.public_key():
        raise SlotError(
            f"signing CA generation {record.generation}: {path} does not match its certificate"
        )
    return key


def load_signing_material(
    ca_dir: Path, slots: Slots, bundle: Sequence[x509.Certificate] = ()
) -> SigningMaterial:
    """The signer of the ACTIVE slot (key read from ``ca_dir``); its roots are ``bundle``
    (the CA directory's root bundle) plus every root a live slot chains to. Raises
    :class:`SlotError`."""
    active = slots.active
    if active is None:
        raise SlotError("the ledger has no active signing CA")
    key = load_slot_key(ca_dir, active)
    known = {_fp(c): c for r in slots.records for c in r.chain}
    roots = {_fp(c): c for c in (*bundle, *trusted_roots(slots))}
    # A CA whose signing certificate is the root itself (the article's self-signed CA) has no
    # intermediates: the root goes in the response's last element only, never in the chain.
    return SigningMaterial(
        generation=active.generation,
        signer=Signer(active.cert, key),
        intermediates=tuple(c for c in active.chain if _fp(c) not in roots),
        roots=tuple(roots.values()),
        known_intermediates=tuple(known.values()),
    )


def trusted_roots(slots: Slots) -> tuple[x509.Certificate, ...]:
    """The roots the ACTIVE and OLD slots chain to (the read side root rotation uses: a root
    may leave the bundle only when no live slot chains to it)."""
    seen: dict[bytes, x509.Certificate] = {}
    live = [s for s in (slots.active, *slots.old) if s is not None]
    for record in live:
        for root in record.roots:
            seen.setdefault(_fp(root), root)
    return tuple(seen.values())


def key_type_of(cert: x509.Certificate) -> KeyType:
    """The :class:`KeyType` to give a successor of ``cert`` (the same algorithm and size)."""
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return KeyType.EC_P384 if public.curve.name == "secp384r1" else KeyType.EC_P256
    if isinstance(public, rsa.RSAPublicKey):
        return {3072: KeyType.RSA_3072, 4096: KeyType.RSA_4096}.get(
            public.key_size, KeyType.RSA_2048
        )
    return KeyType.EC_P256


@dataclass(frozen=True, slots=True)
class NewSlot:
    """A new intermediate, made (and its key file written) by a :class:`SlotLedger` caller."""

    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    key_file: str
    issued_at: dt.datetime


def write_slot_key(ca_dir: Path, generation: int, key: PrivateKey) -> str:
    """Write ``key`` to a new 0600 file of its own in ``ca_dir`` (atomically); its name.
    The random part keeps two replicas preparing the same generation from sharing a file."""
    name = f"signing-key-{generation}-{secrets.token_hex(4)}.pem"
    write_private_file(ca_dir / name, private_key_pem(key))
    return name


def remove_slot_key(ca_dir: Path, key_file: str) -> None:
    """Remove a key file this module made (never the CA directory's own ``ca-key.pem``)."""
    if key_file.startswith("signing-key-"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ca_dir / key_file)


class SlotLedger:
    """The ``signing_slots`` table: reads, and each slot change as one locked transaction.

    Every change is idempotent and checked against the rows it finds under the lock, so
    replicas that decide the same step at the same moment apply it once; the others find it
    done. Raises :class:`LedgerError` (password-free message) when the ledger fails.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def revision(self) -> int:
        """Rows + sum of their states: grows with every change (see :mod:`schema`)."""
        query = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(signing_slots.c.state), 0))
        try:
            with self._engine.connect() as conn:
                count, total = conn.execute(query).one()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read signing slots: {exc.__class__.__name__}") from exc
        return int(count) + int(total)

    def slots(self) -> Slots:
        """The slots now. Unparsable rows are in :attr:`Slots.problems`, never raised."""
        try:
            with self._engine.connect() as conn:
                return self._read(conn)
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read signing slots: {exc.__class__.__name__}") from exc

    def _read(self, conn: Connection) -> Slots:
        rows = (
            conn.execute(
                sa.select(signing_slots)
                .where(signing_slots.c.state < int(Slot.RETIRED))
                .order_by(signing_slots.c.generation)
            )
            .mappings()
            .all()
        )
        count, total, last = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(signing_slots.c.state), 0),
                sa.func.coalesce(sa.func.max(signing_slots.c.generation), 0),
            )
        ).one()
        return _slots_from_rows(rows, int(count) + int(total), int(last))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Connection]:
        """One transaction holding the slot lock (PostgreSQL advisory lock; SQLite's write
        lock, taken at BEGIN)."""
        try:
            with self._engine.connect() as conn:
                if conn.dialect.name == "sqlite":
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    try:
                        yield conn
                    except BaseException:
                        conn.exec_driver_sql("ROLLBACK")
                        raise
                    conn.exec_driver_sql("COMMIT")
                    return
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        conn.execute(
                            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SLOT_LOCK_KEY}
                        )
                    yield conn
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise LedgerError(
                f"cannot change signing slots: {exc.__class__.__name__}: {reason}"
            ) from exc

    def bootstrap(self, material: CaMaterial, key_file: str, now: dt.datetime, actor: str) -> bool:
        """Record the CA directory's signing CA as generation 1, ACTIVE, if the table is
        empty. True when this call recorded it."""
        cert = material.signer.cert
        issued = min(cert.not_valid_before_utc + CLOCK_SKEW, cert.not_valid_after_utc)
        chain = material.intermediates or (cert,)
        with self._locked() as conn:
            if conn.execute(sa.select(sa.func.count()).select_from(signing_slots)).scalar():
                return False
            self._insert(
                conn,
                1,
                Slot.ACTIVE,
                NewSlot(chain, material.roots, key_file, issued),
                now,
                actor,
                activated=now,
            )
            _audit(conn, now, actor, "signing-bootstrap", f"generation 1 {_describe(cert)}")
        return True

    def prepare(
        self,
        generation: int,
        make: Callable[[int], NewSlot],
        undo: Callable[[NewSlot], None],
        now: dt.datetime,
        actor: str,
    ) -> bool:
        """Add generation ``generation`` as PREPARED, made by ``make`` (which writes its key
        file), unless another replica got there first or the slots moved on: then nothing
        is made. A slot made but not committed is handed to ``undo`` (remove its key file).
        True when this call prepared it."""
        made: NewSlot | None = None
        try:
            with self._locked() as conn:
                current = self._read(conn)
                if current.prepared is not None or current.next_generation != generation:
                    return False
                made = make(generation)
                self._insert(conn, generation, Slot.PREPARED, made, now, actor)
                _audit(
                    conn,
                    now,
                    actor,
                    "signing-prepare",
                    f"generation {generation} {_describe(made.chain[0])}",
                )
        except BaseException:
            if made is not None:
                undo(made)
            raise
        return True

    def activate(self, generation: int, now: dt.datetime, actor: str) -> bool:
        """Make PREPARED ``generation`` ACTIVE and the ACTIVE one OLD. True when done here."""
        t = signing_slots
        with self._locked() as conn:
            found = conn.execute(sa.select(t.c.state).where(t.c.generation == generation)).scalar()
            if found != int(Slot.PREPARED):
                return False
            conn.execute(
                t.update().where(t.c.state == int(Slot.ACTIVE)).values(state=int(Slot.OLD))
            )
            conn.execute(
                t.update()
                .where(t.c.generation == generation)
                .values(state=int(Slot.ACTIVE), activated_at=now)
            )
            _audit(conn, now, actor, "signing-activate", f"generation {generation}")
        return True

    def retire(self, generation: int, now: dt.datetime, actor: str, why: str) -> bool:
        """Retire an OLD or PREPARED ``generation`` (never the ACTIVE one)."""
        t = signing_slots
        with self._locked() as conn:
            done = conn.execute(
                t.update()
                .where(t.c.generation == generation)
                .where(t.c.state.in_([int(Slot.PREPARED), int(Slot.OLD)]))
                .values(state=int(Slot.RETIRED))
            ).rowcount
            if done:
                _audit(conn, now, actor, "signing-retire", f"generation {generation}: {why}")
        return bool(done)

    def switch(self, new: NewSlot, now: dt.datetime, actor: str) -> int:
        """Record ``new`` as ACTIVE at once (the ACTIVE one becomes OLD, a PREPARED one is
        retired: it chains to the previous root). Returns its generation."""
        t = signing_slots
        with self._locked() as conn:
            current = self._read(conn)
            generation = current.next_generation
            conn.execute(
                t.update().where(t.c.state == int(Slot.PREPARED)).values(state=int(Slot.RETIRED))
            )
            conn.execute(
                t.update().where(t.c.state == int(Slot.ACTIVE)).values(state=int(Slot.OLD))
            )
            self._insert(conn, generation, Slot.ACTIVE, new, now, actor, activated=now)
            _audit(
                conn,
                now,
                actor,
                "signing-switch",
                f"generation {generation} {_describe(new.chain[0])}",
            )
        return generation

    @staticmethod
    def _insert(
        conn: Connection,
        generation: int,
        slot: Slot,
        new: NewSlot,
        now: dt.datetime,
        actor: str,
        activated: dt.datetime | None = None,
    ) -> None:
        conn.execute(
            signing_slots.insert(),
            [
                {
                    "generation": generation,
                    "state": int(slot),
                    "cert_pem": certs_pem(new.chain).decode(),
                    "roots_pem": certs_pem(new.roots).decode(),
                    "key_file": new.key_file,
                    "issued_at": new.issued_at,
                    "not_after": new.chain[0].not_valid_after_utc,
                    "activated_at": activated,
                    "created_by": actor,
                }
            ],
        )


def _describe(cert: x509.Certificate) -> str:
    return f"serial {cert.serial_number:x} not_after {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"


def _audit(conn: Connection, now: dt.datetime, actor: str, action: str, detail: str) -> None:
    conn.execute(audit.insert(), [{"at": now, "actor": actor, "action": action, "detail": detail}])


class SigningWatch:
    """One CA process's signer, following the slots in the ledger; run :meth:`run` as a task.

    :attr:`material` is what the authority signs with now. Each poll applies what
    :func:`decide_slots` says (every replica may; the ledger makes each step happen once)
    and switches :attr:`material` when the ACTIVE generation changed. A ledger that cannot
    be read, or a slot that cannot be loaded, leaves the current signer in force (logged
    once per streak / per generation).
    """

    def __init__(
        self,
        store: SlotLedger,
        ca_dir: Path,
        clock: Clock,
        *,
        trust_domain: str,
        root: Signer | None,
        bundle: Sequence[x509.Certificate] = (),
        interval: float = POLL_INTERVAL,
        actor: str = "meshtrust ca serve",
        fresh_keys: bool = True,
    ) -> None:
        """``fresh_keys``: give each successor a new key (SPIRE; the default, see "Why each
        successor has a new key" in the module docstring); False re-certifies the active key
        under the same name."""
        self._store = store
        self._fresh_keys = fresh_keys
        self._bundle = tuple(bundle)
        self._ca_dir = ca_dir
        self._clock = clock
        self._trust_domain = trust_domain
        self._root = root
        self._interval = interval
        self._actor = actor
        self.slots = Slots()
        self.material: SigningMaterial | None = None
        self.warning: ChainWarning | None = None
        self._warned_level = 0
        self._failing = False
        #: Polls of :meth:`run` that raised (and were retried at the next one).
        self.failed_polls = 0
        self._reported: set[str] = set()
        self._changed = asyncio.Event()
        self._keys: dict[int, PrivateKey] = {}
        self._rotated_roots: dict[bytes, Signer] = {}
        self._listeners: list[Callable[[], None]] = []

    @property
    def can_prepare(self) -> bool:
        return self._root_for_active() is not None

    def _root_for_active(self) -> Signer | None:
        """The root signer the ACTIVE slot chains to, if this CA holds its key: the CA
        directory's ``root-key.pem``, or after a root rotation to a generated root its
        ``root-key-<fingerprint>.pem`` (:mod:`meshtrust.ca.rootrotation`)."""
        active = self.slots.active
        if self._root is None:
            return None  # a plugged-in CA never prepares
        if active is None or self._root.cert in active.roots:
            return self._root
        for root in active.roots:
            found = self._rotated_roots.get(_fp(root))
            if found is None:
                path = self._ca_dir / f"root-key-{hashlib.sha256(_der(root)).hexdigest()[:16]}.pem"
                try:
                    key = load_private_key_pem(path.read_bytes(), source=str(path))
                except (OSError, InvalidCertificate):
                    continue
                if key.public_key() != root.public_key():
                    continue
                found = Signer(root, key)
                self._rotated_roots[_fp(root)] = found
            return found
        return None

    def load(self, initial: CaMaterial) -> SigningMaterial:
        """At start (synchronously, before serving): record the CA directory's signer as
        generation 1 if the ledger has none, apply what is due, and load the ACTIVE signer.
        Raises :class:`SlotError` / :class:`LedgerError` with a message naming the problem."""
        key_file = "tls.key" if initial.layout == "tls" else "ca-key.pem"
        self._store.bootstrap(initial, key_file, self._clock.now(), self._actor)
        self.slots = self._store.slots()
        self._settle(self._clock.now())
        self._report_problems()
        self.material = load_signing_material(self._ca_dir, self.slots, self._bundle)
        self._check_chain(self._clock.now())
        return self.material

    def current(self) -> SigningMaterial:
        assert self.material is not None, "SigningWatch.load() first"
        return self.material

    def on_slots_changed(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (in the event loop) after each poll that found the slots
        changed: a slot prepared, activated or retired, here or by another replica."""
        self._listeners.append(listener)

    def issuers(self) -> tuple[tuple[Signer, tuple[x509.Certificate, ...]], ...]:
        """Every live issuing CA (ACTIVE first, then PREPARED, then OLD): its signer (key
        read from the CA directory once per generation) and its chain. The CRL publisher
        signs one CRL with each. A slot whose key cannot be read is left out (logged once)."""
        out: list[tuple[Signer, tuple[x509.Certificate, ...]]] = []
        for record in (self.slots.active, self.slots.prepared, *self.slots.old):
            if record is None:
                continue
            key = self._keys.get(record.generation)
            if key is None:
                try:
                    key = load_slot_key(self._ca_dir, record)
                except SlotError as exc:
                    self._report_once(f"crl-{record.generation}", f"{exc}; no CRL for it")
                    continue
                self._keys[record.generation] = key
            out.append((Signer(record.cert, key), record.chain))
        live = {r.generation for r in self.slots.records}
        for generation in [g for g in self._keys if g not in live]:
            del self._keys[generation]
        return tuple(out)

    async def wait_changed(self) -> None:
        """Return at the next change of :attr:`material`."""
        self._changed.clear()
        await self._changed.wait()

    async def poll_once(self) -> bool:
        """Read the slots, apply what is due, follow the ACTIVE one. True when the signer
        changed."""
        now = self._clock.now()
        before = self.slots.revision
        try:
            revision = await asyncio.to_thread(self._store.revision)
            if revision != self.slots.revision:
                self.slots = await asyncio.to_thread(self._store.slots)
            await asyncio.to_thread(self._settle, now)
        except LedgerError as exc:
            if not self._failing:
                log.error("cannot read signing slots from the ledger (keeping the signer): %s", exc)
            self._failing = True
            return False
        self._failing = False
        self._report_problems()
        self._check_chain(now)
        switched = self._follow()
        if self.slots.revision != before:
            for listener in self._listeners:
                listener()
        return switched

    def _follow(self) -> bool:
        active = self.slots.active
        if active is None or self.material is None:
            return False
        known = {_fp(c) for r in self.slots.records for c in r.chain}
        have = {_fp(c) for c in self.material.known_intermediates}
        if active.generation == self.material.generation and known == have:
            return False
        try:
            material = load_signing_material(self._ca_dir, self.slots, self._bundle)
        except SlotError as exc:
            self._report_once(
                f"load-{active.generation}",
                f"{exc}; still signing with generation {self.material.generation}",
            )
            return False
        switched = material.generation != self.material.generation
        self.material = material
        if switched:
            log.info(
                "signing with intermediate generation %d (%s); workloads move to it at "
                "their next renewal",
                material.generation,
                _describe(material.signer.cert),
            )
            self._changed.set()
        return switched

    def _settle(self, now: dt.datetime) -> None:
        """Apply decisions until none is due (at most a few rounds: a CA started late, or a
        broken successor, may need retire, prepare and activate at one moment)."""
        for _ in range(4):
            due = decide_slots(self.slots, now, can_prepare=self.can_prepare)
            if not due and not self.slots.problems:
                return
            self.slots = self._store.slots()  # act on what the ledger says now
            if not self._apply(now):
                return
            self.slots = self._store.slots()

    def _apply(self, now: dt.datetime) -> bool:
        """Carry out :func:`decide_slots` (in a thread: ledger and files). True if anything
        changed."""
        changed = False
        for generation, state, message in self.slots.problems:
            if state == int(Slot.PREPARED):  # unusable: retire it, so a fresh one is made
                if self._store.retire(generation, now, self._actor, message):
                    log.error("%s; retired: a fresh successor will be prepared", message)
                    changed = True
        for decision in decide_slots(self.slots, now, can_prepare=self.can_prepare):
            if decision.step is SlotStep.PREPARE:
                try:
                    prepared = self._store.prepare(
                        decision.generation, self._make, self._undo, now, self._actor
                    )
                except SlotError as exc:  # nothing was made; the active one keeps signing
                    self._report_once(f"prepare-{decision.generation}", str(exc))
                    continue
                if prepared:
                    active = self.slots.active
                    log.info(
                        "prepared signing CA generation %d; it becomes active at %s",
                        decision.generation,
                        f"{active.activate_at:%Y-%m-%d %H:%M:%SZ}" if active else "?",
                    )
                    changed = True
            elif decision.step is SlotStep.ACTIVATE:
                changed |= self._activate(decision.generation, now)
            else:
                changed |= self._store.retire(decision.generation, now, self._actor, "expired")
                old = next((o for o in self.slots.old if o.generation == decision.generation), None)
                if old is not None:
                    remove_slot_key(self._ca_dir, old.key_file)
        return changed

    def _activate(self, generation: int, now: dt.datetime) -> bool:
        prepared = self.slots.prepared
        assert prepared is not None and prepared.generation == generation
        try:  # never activate what cannot sign: keep the active one and make a fresh one
            load_slot_key(self._ca_dir, prepared)
            return self._store.activate(generation, now, self._actor)
        except SlotError as exc:
            log.error(
                "%s; not activated: still signing with generation %d, a fresh successor "
                "will be prepared",
                exc,
                self.slots.active.generation if self.slots.active else 0,
            )
            return self._store.retire(generation, now, self._actor, str(exc))

    def _make(self, generation: int) -> NewSlot:
        root = self._root_for_active()
        assert root is not None and self.slots.active is not None
        active = self.slots.active
        now = self._clock.now()
        if self._fresh_keys:
            key = generate_key(key_type_of(active.cert))
        else:
            key = load_slot_key(self._ca_dir, active)  # SlotError: nothing is prepared
        cert = make_intermediate(key, root, self._trust_domain, now, active.lifetime)
        try:
            key_file = write_slot_key(self._ca_dir, generation, key)
        except OSError as exc:  # a read-only CA directory (a Kubernetes secret mount)
            raise SlotError(
                f"cannot prepare signing CA generation {generation}: cannot write its key "
                f"in {self._ca_dir}: {exc.strerror}; the intermediate will not be rotated"
            ) from exc
        return NewSlot((cert,), (root.cert,), key_file, now)

    def _undo(self, new: NewSlot) -> None:
        remove_slot_key(self._ca_dir, new.key_file)

    def _report_problems(self) -> None:
        for generation, _, message in self.slots.problems:
            self._report_once(f"row-{generation}", message)

    def _report_once(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.error("%s", message)

    def _check_chain(self, now: dt.datetime) -> None:
        """A CA without the root key warns (once per level) as its chain nears expiry."""
        active = self.slots.active
        if self.can_prepare or active is None:
            self.warning = None
            return
        self.warning = chain_expiry_warning(active.issued_at, active.chain_not_after, now)
        level = self.warning.level if self.warning is not None else 0
        if self.warning is not None and level > self._warned_level:
            log.warning("%s", self.warning.message)
        self._warned_level = level

    async def run(self) -> None:
        """Poll every ``interval`` until cancelled. A poll that fails in any way is logged
        (once per distinct error), counted in :attr:`failed_polls` and retried at the next
        poll, the current signer kept meanwhile."""
        while True:
            await self._clock.sleep(self._interval)
            try:
                await self.poll_once()
            except (MeshTrustError, OSError) as exc:
                # As SPIRE's rotator: a failed step is logged and retried at the next poll;
                # it must not end the task that keeps this process's signer current.
                self.failed_polls += 1
                self._report_once(f"poll-{exc}", f"signing slots: {exc}")
            except Exception as exc:  # a bug, or a library error not mapped to ours
                # Not ours, so not known to be free of detail: the type and message only (no
                # locals, no key material), the traceback at DEBUG for whoever debugs it.
                self.failed_polls += 1
                log.debug("signing slots: unexpected error in a poll", exc_info=exc)
                self._report_once(
                    f"poll-{type(exc).__name__}-{exc}",
                    f"signing slots: unexpected {type(exc).__name__}: {exc}; keeping generation "
                    f"{self.material.generation if self.material else 0}, retrying every "
                    f"{self._interval:g}s",
                )


async def switch_to_root(
    store: SlotLedger,
    ca_dir: Path,
    now: dt.datetime,
    *,
    trust_domain: str,
    root: Signer | None = None,
    chain: Sequence[x509.Certificate] = (),
    key: PrivateKey | None = None,
    roots: Sequence[x509.Certificate] = (),
    lifetime: dt.timedelta | None = None,
    actor: str = "meshtrust ca rotate-root",
) -> int:
    """Make a new intermediate the ACTIVE signer of every replica; the ACTIVE one becomes
    OLD (it stays until it expires), a PREPARED one is retired. Returns its generation.

    Either ``root`` (root certificate + key): an intermediate is generated under it, with
    ``lifetime`` (default: the ACTIVE one's, else a year) and the ACTIVE one's key type; or
    a plugged-in intermediate: ``chain`` (signing CA first, then any intermediates above it),
    its ``key`` and the ``roots`` it chains to. Its key is written to a new 0600 file in
    ``ca_dir``. Every replica's :class:`SigningWatch` signs with it within
    :data:`POLL_INTERVAL`; workloads move to it at their next renewal (root rotation's
    phase 2 makes agents renew at once on the bundle change).

    The new intermediate is a new CRL issuer: its CRL reaches agents once CA processes see
    the slot (:meth:`SigningWatch.issuers`); leaves it signs before a sidecar holds that CRL
    are refused there, so root rotation first records the slot as PREPARED
    (:func:`prepare_under_root`) and activates it once every agent serves its CRL.

    Raises :class:`SlotError` when the arguments do not make a usable signer (key not
    matching, chain not ending at one of ``roots``, expired) and :class:`LedgerError` when
    the ledger fails; nothing is changed then.
    """
    current = await asyncio.to_thread(store.slots)
    if root is not None:
        base = current.active
        life = lifetime or (base.lifetime if base is not None else dt.timedelta(days=365))
        key = generate_key(key_type_of(base.cert) if base is not None else KeyType.EC_P256)
        chain = (make_intermediate(key, root, trust_domain, now, life),)
        roots = (root.cert,)
    if not chain or key is None or not roots:
        raise SlotError("switch_to_root needs a root (cert and key) or a chain, its key and roots")
    _check_signer(tuple(chain), key, tuple(roots), now)
    key_file = write_slot_key(ca_dir, current.next_generation, key)
    new = NewSlot(tuple(chain), tuple(roots), key_file, now)
    try:
        return await asyncio.to_thread(store.switch, new, now, actor)
    except BaseException:
        remove_slot_key(ca_dir, key_file)
        raise


def _check_signer(
    chain: tuple[x509.Certificate, ...],
    key: PrivateKey,
    roots: tuple[x509.Certificate, ...],
    now: dt.datetime,
) -> None:
    if key.public_key() != chain[0].public_key():
        raise SlotError("the given key does not match the signing CA certificate")
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SlotError(
                f"certificate {cert.subject.rfc4514_string()} is not valid now "
                f"({cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
            )
    top = chain[-1]
    for root in roots:
        if top.issuer == root.subject:
            try:
                top.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return
    raise SlotError("the signing CA chain does not end at one of the given roots")
