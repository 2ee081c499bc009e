"""Root rotation as phases, each advancing only when the whole mesh completed the previous one.

Theory of operation. A rotation from root A (the mesh's roots now) to root B is one row of
the ledger's ``root_rotations`` table (migration 6) whose ``phase`` only grows::

    PUBLISH  bundle A+B written; wait until every workload serves it
    PREPARE  an intermediate under B recorded as a PREPARED signing slot: every CA process
             publishes its CRL from then on (Envoy needs the CRL of each issuer, looked up
             by name and key, before it sees that issuer's first leaf); the bundle version
             is bumped (same roots) so that an agent's report of the new version proves it
             holds that CRL; wait until every workload serves it
    SIGN     the slot under B made ACTIVE: every replica signs under B, and every agent,
             seeing on its trust stream that the CA's active issuer chains to another root
             than its own certificate, re-issues at once; wait until every workload's latest
             certificate in the ledger chains to B
    DROP     bundle B alone written; wait until every workload serves it
    DONE

Each phase's step is idempotent and checked against the ledger (the bundle holds B already,
the slot exists, is active, A is gone), so whoever resumes a phase after a crash redoes
nothing twice. "Every workload" is every identity whose agent has reported on the trust
stream (``trust_served``): one that is down stays behind and holds the phase until it
returns, or until ``--force`` leaves the workloads behind at that moment out of the rest of
this rotation (named in the row, the audit and the output).

Who drives. The command (``meshtrust ca rotate-root``) drives the phases, holding the row's
*lease* (``driver``, ``heartbeat_at``, renewed every poll): a second command finds a live
lease and is refused; a command killed (or its host lost) leaves a lease that goes stale
after :data:`LEASE` and a re-run resumes the phase the ledger says. The CA processes do not
drive: they only follow the ledger (bundle, slots), which is all a phase changes, so a CA
killed mid-phase loses nothing, and the phase completes once it is back and agents report
again. Why not a CA replica under an advisory lock: it would make every replica carry the
rotation logic and its waits for a once-a-year operation the operator watches anyway; the
lease gives the same exclusion and resumption with the state in the same place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from meshtrust.ca.schema import audit, certificates, root_rotations
from meshtrust.ca.signing import (
    NewSlot,
    SlotError,
    SlotLedger,
    key_type_of,
    remove_slot_key,
    write_slot_key,
)
from meshtrust.ca.trust import (
    MeshBundle,
    ServedReport,
    TrustLedger,
    add_root,
    behind,
    chains_to,
    fingerprint,
    remove_root,
)
from meshtrust.clock import Clock
from meshtrust.errors import InvalidCertificate, InvalidInput, LedgerError, MeshTrustError
from meshtrust.fileio import write_file_atomic, write_private_file
from meshtrust.pki import (
    KeyType,
    PrivateKey,
    Signer,
    certs_pem,
    generate_key,
    load_certs_pem,
    make_intermediate,
    make_root,
    private_key_pem,
)

__all__ = [
    "LEASE",
    "Behind",
    "Phase",
    "RootRotation",
    "RotationLedger",
    "RotationRecord",
    "RotationWaiting",
    "default_driver",
    "generate_root",
    "run_rotation",
]

log = logging.getLogger("meshtrust.ca")

#: A lease not renewed for this long is stale: a new command may take the rotation over.
LEASE = dt.timedelta(seconds=15)
#: How often the driver looks at the ledger (and renews its lease).
POLL = 0.5
ROOT_LIFETIME = dt.timedelta(days=3650)


class RotationWaiting(MeshTrustError):
    """A phase waited its time and some workloads are still behind (named)."""


class Phase(enum.IntEnum):
    PUBLISH = 1
    PREPARE = 2
    SIGN = 3
    DROP = 4
    DONE = 5

    @property
    def label(self) -> str:
        return {
            1: "1/3 publish bundle A+B",
            2: "2/3 prepare the signing CA under B",
            3: "2/3 sign under B (every workload re-issues)",
            4: "3/3 drop A from the bundle",
            5: "done",
        }[int(self)]


@dataclass(frozen=True)
class RotationRecord:
    """One row of ``root_rotations``."""

    id: int
    phase: Phase
    old_roots: tuple[x509.Certificate, ...]
    new_root: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # the signing CA under B (given), or () to generate
    key_file: str  # the signing CA's key (given) or B's key (generated), in the CA dir
    generation: int | None
    target_version: int | None
    excluded: tuple[str, ...]
    driver: str
    heartbeat_at: dt.datetime
    started_at: dt.datetime
    updated_at: dt.datetime

    def lease_live(self, now: dt.datetime) -> bool:
        return self.phase is not Phase.DONE and now - self.heartbeat_at < LEASE


@dataclass(frozen=True)
class Behind:
    """A workload that has not completed the current phase."""

    spiffe_id: str
    why: str


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class RotationLedger:
    """The ``root_rotations`` table. Every method raises :class:`LedgerError`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def current(self) -> RotationRecord | None:
        """The newest rotation (running or done), or None."""
        query = sa.select(root_rotations).order_by(root_rotations.c.id.desc()).limit(1)
        try:
            with self._engine.connect() as conn:
                row = conn.execute(query).mappings().first()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read root rotations: {exc.__class__.__name__}") from exc
        if row is None:
            return None
        where = f"ledger table root_rotations, id {row['id']}"
        try:
            old = tuple(load_certs_pem(row["old_roots_pem"].encode(), source=where))
            (new,) = load_certs_pem(row["new_root_pem"].encode(), source=where)
            chain = (
                tuple(load_certs_pem(row["chain_pem"].encode(), source=where))
                if row["chain_pem"]
                else ()
            )
        except (InvalidCertificate, ValueError) as exc:
            raise LedgerError(f"{where}: {exc}") from None
        return RotationRecord(
            id=int(row["id"]),
            phase=Phase(int(row["phase"])),
            old_roots=old,
            new_root=new,
            chain=chain,
            key_file=str(row["key_file"]),
            generation=row["generation"],
            target_version=row["target_version"],
            excluded=tuple(x for x in str(row["excluded"] or "").split("\n") if x),
            driver=str(row["driver"]),
            heartbeat_at=_utc(row["heartbeat_at"]),
            started_at=_utc(row["started_at"]),
            updated_at=_utc(row["updated_at"]),
        )

    def start(
        self,
        old_roots: Sequence[x509.Certificate],
        new_root: x509.Certificate,
        chain: Sequence[x509.Certificate],
        key_file: str,
        now: dt.datetime,
        driver: str,
    ) -> RotationRecord:
        """Record a new rotation in phase PUBLISH, held by ``driver``. Raises
        :class:`InvalidInput` when one is running already (its lease live or not: resume it)."""
        try:
            with self._engine.begin() as conn:
                last = conn.execute(
                    sa.select(root_rotations.c.phase).order_by(root_rotations.c.id.desc()).limit(1)
                ).scalar()
                if last is not None and int(last) != int(Phase.DONE):
                    raise InvalidInput("a root rotation is already recorded and not done")
                conn.execute(
                    root_rotations.insert(),
                    [
                        {
                            "phase": int(Phase.PUBLISH),
                            "old_roots_pem": certs_pem(old_roots).decode(),
                            "new_root_pem": certs_pem([new_root]).decode(),
                            "chain_pem": certs_pem(chain).decode() if chain else "",
                            "key_file": key_file,
                            "excluded": "",
                            "driver": driver,
                            "heartbeat_at": now,
                            "started_at": now,
                            "updated_at": now,
                        }
                    ],
                )
                conn.execute(
                    audit.insert(),
                    [
                        {
                            "at": now,
                            "actor": driver,
                            "action": "root-rotation-start",
                            "detail": f"to root {fingerprint(new_root)[:16]}",
                        }
                    ],
                )
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot record the root rotation: {exc.__class__.__name__}") from exc
        found = self.current()
        assert found is not None
        return found

    def take_lease(self, rotation_id: int, driver: str, now: dt.datetime) -> bool:
        """Take (or renew) the lease of ``rotation_id`` for ``driver``: True unless another
        driver's lease is live."""
        t = root_rotations
        stale = now - LEASE
        try:
            with self._engine.begin() as conn:
                done = conn.execute(
                    t.update()
                    .where(t.c.id == rotation_id)
                    .where(sa.or_(t.c.driver == driver, t.c.heartbeat_at < stale))
                    .values(driver=driver, heartbeat_at=now)
                ).rowcount
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot take the rotation lease: {exc.__class__.__name__}") from exc
        return bool(done)

    def release(self, rotation_id: int, driver: str) -> None:
        t = root_rotations
        with self._engine.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.id == rotation_id)
                .where(t.c.driver == driver)
                .values(heartbeat_at=dt.datetime(1970, 1, 1, tzinfo=dt.UTC))
            )

    def update(self, rotation_id: int, now: dt.datetime, actor: str, **values: object) -> None:
        """Set ``values`` on the row (with an audit line when the phase changes)."""
        t = root_rotations
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    t.update().where(t.c.id == rotation_id).values(updated_at=now, **values)
                )
                if "phase" in values:
                    phase = Phase(int(values["phase"]))  # type: ignore[call-overload]
                    conn.execute(
                        audit.insert(),
                        [
                            {
                                "at": now,
                                "actor": actor,
                                "action": "root-rotation-phase",
                                "detail": f"rotation {rotation_id}: {phase.label}",
                            }
                        ],
                    )
                if "excluded" in values:
                    conn.execute(
                        audit.insert(),
                        [
                            {
                                "at": now,
                                "actor": actor,
                                "action": "root-rotation-force",
                                "detail": f"rotation {rotation_id}: going on without "
                                + str(values["excluded"]).replace("\n", ", "),
                            }
                        ],
                    )
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot update the root rotation: {exc.__class__.__name__}") from exc

    def latest_certificates(self) -> dict[str, x509.Certificate]:
        """Each identity's most recently issued certificate."""
        c = certificates
        newest = (
            sa.select(c.c.spiffe_id, sa.func.max(c.c.issued_at).label("at"))
            .group_by(c.c.spiffe_id)
            .subquery()
        )
        query = sa.select(c.c.spiffe_id, c.c.cert_pem).join(
            newest, sa.and_(c.c.spiffe_id == newest.c.spiffe_id, c.c.issued_at == newest.c.at)
        )
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(query).all()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read certificates: {exc.__class__.__name__}") from exc
        out: dict[str, x509.Certificate] = {}
        for spiffe_id, pem in rows:
            try:
                out[str(spiffe_id)] = x509.load_pem_x509_certificate(str(pem).encode())
            except ValueError:
                continue
        return out


def generate_root(ca_dir: Path, trust_domain: str, now: dt.datetime, key_type: KeyType) -> Signer:
    """A new root for ``trust_domain``: its key written 0600 to
    ``ca_dir/root-key-<fingerprint16>.pem`` and its certificate beside it
    (``root-cert-<fingerprint16>.pem``), as ``ca init`` writes ``root-key.pem``."""
    key = generate_key(key_type)
    # Its own name (with the date): peers and tools tell the two roots apart at a glance.
    name = f"meshtrust root CA ({trust_domain}) {now:%Y-%m-%d %H:%M:%S}"
    cert = make_root(key, trust_domain, now, ROOT_LIFETIME, common_name=name)
    short = fingerprint(cert)[:16]
    write_private_file(ca_dir / f"root-key-{short}.pem", private_key_pem(key))
    write_file_atomic(ca_dir / f"root-cert-{short}.pem", certs_pem([cert]), 0o644)
    return Signer(cert, key)


def _issued_by(cert: x509.Certificate, parent: x509.Certificate) -> bool:
    if cert.issuer != parent.subject:
        return False
    try:
        cert.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chains_to_root(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], root: x509.Certificate
) -> bool:
    """Whether ``leaf`` chains to ``root`` through ``intermediates`` (any order)."""
    current = leaf
    for _ in range(len(intermediates) + 1):
        if _issued_by(current, root):
            return True
        parent = next((c for c in intermediates if _issued_by(current, c)), None)
        if parent is None:
            return False
        current = parent
    return False


class RootRotation:
    """Drives one rotation (see the module docstring). ``say`` prints progress."""

    def __init__(
        self,
        engine: Engine,
        ca_dir: Path,
        clock: Clock,
        *,
        trust_domain: str,
        driver: str,
        say: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.rotations = RotationLedger(engine)
        self.trust = TrustLedger(engine)
        self.slots = SlotLedger(engine)
        self._ca_dir = ca_dir
        self._clock = clock
        self._td = trust_domain
        self.driver = driver
        self._say = say

    # --- the steps of each phase (idempotent) -------------------------------------------

    def _bundle(self) -> MeshBundle:
        found = self.trust.current()
        if found is None:
            raise LedgerError("the ledger has no trust bundle yet: start `meshtrust ca serve`")
        return found

    def enter(self, rec: RotationRecord) -> RotationRecord:
        """Carry out the step of ``rec``'s phase unless done already; the row updated."""
        now = self._clock.now()
        values: dict[str, object] = {}
        if rec.phase is Phase.PUBLISH:
            bundle = self._bundle()
            if rec.new_root not in bundle.roots:
                bundle = self.trust.set_roots(
                    add_root(bundle.roots, rec.new_root),
                    now,
                    actor=self.driver,
                    why=f"root rotation {rec.id}, phase 1: trust the new root too",
                    expect_version=bundle.version,
                )
            if rec.target_version is None:
                values["target_version"] = bundle.version
        elif rec.phase is Phase.PREPARE:
            slots = self.slots.slots()
            live = {r.generation: r for r in slots.records}
            if rec.generation is None or rec.generation not in live:
                values["generation"] = self._prepare(rec, now)
            if rec.target_version is None:
                bundle = self._bundle()
                bundle = self.trust.set_roots(
                    bundle.roots,
                    now,
                    actor=self.driver,
                    why=f"root rotation {rec.id}, phase 2: the new signing CA's CRL",
                    expect_version=bundle.version,
                )
                values["target_version"] = bundle.version
        elif rec.phase is Phase.SIGN:
            assert rec.generation is not None
            self._add_to_root_file(rec.new_root)
            slots = self.slots.slots()
            if slots.active is None or slots.active.generation != rec.generation:
                if not self.slots.activate(rec.generation, now, self.driver):
                    raise SlotError(
                        f"signing CA generation {rec.generation} (under the new root) is no "
                        "longer prepared; it cannot be activated"
                    )
        elif rec.phase is Phase.DROP:
            bundle = self._bundle()
            old = [r for r in bundle.roots if r in rec.old_roots and r != rec.new_root]
            roots = bundle.roots
            active = self.slots.slots().active
            for root in old:
                roots, _ = remove_root(
                    roots, fingerprint(root), active.chain if active is not None else ()
                )
            if old:
                bundle = self.trust.set_roots(
                    roots,
                    now,
                    actor=self.driver,
                    why=f"root rotation {rec.id}, phase 3: drop the old root",
                    expect_version=bundle.version,
                )
            if rec.target_version is None:
                values["target_version"] = bundle.version
        if values:
            self.rotations.update(rec.id, now, self.driver, **values)
            return dataclasses.replace(rec, **values)  # type: ignore[arg-type]
        return rec

    def _add_to_root_file(self, root: x509.Certificate) -> None:
        """Add the new root to the CA directory's root file (``root-cert.pem``, or ``ca.crt``
        in the TLS layout): what `meshtrust up` hands agents that start later. From phase
        2 on the CA's port certificate chains to the new root, so an agent starting from
        the old root alone could not verify it. The old root stays in the file: the CA
        directory's own ``ca-cert.pem`` chains to it."""
        path = self._ca_dir / "root-cert.pem"
        if not path.exists() and (self._ca_dir / "ca.crt").exists():
            path = self._ca_dir / "ca.crt"
        try:
            roots = load_certs_pem(path.read_bytes(), source=str(path))
            if root in roots:
                return
            write_file_atomic(path, certs_pem([*roots, root]), 0o644)
        except (OSError, InvalidCertificate) as exc:  # a read-only secret mount
            self._say(
                f"warning: cannot add the new root to {path} ({exc}); agents started from "
                "that file will not verify the CA until it holds the new root"
            )
            return
        self._say(f"added the new root to {path} (for agents that start later)")

    def _prepare(self, rec: RotationRecord, now: dt.datetime) -> int:
        """Record the signing CA under the new root as PREPARED (a PREPARED successor under
        the old root is retired). Its key gets a file of its own."""
        current = self.slots.slots()
        generation = current.next_generation
        if rec.chain:
            chain = rec.chain
            key = _load_key(self._ca_dir / rec.key_file)
        else:
            root = Signer(rec.new_root, _load_key(self._ca_dir / rec.key_file))
            base = current.active
            life = base.lifetime if base is not None else dt.timedelta(days=365)
            key = generate_key(key_type_of(base.cert) if base is not None else KeyType.EC_P256)
            chain = (make_intermediate(key, root, self._td, now, life),)
        key_file = write_slot_key(self._ca_dir, generation, key)
        new = NewSlot(tuple(chain), (rec.new_root,), key_file, now)
        try:
            if current.prepared is not None:
                self.slots.retire(current.prepared.generation, now, self.driver, "root rotation")

            def make(_: int) -> NewSlot:
                return new

            if not self.slots.prepare(generation, make, lambda _: None, now, self.driver):
                raise SlotError("the signing slots changed meanwhile; run the command again")
        except BaseException:
            remove_slot_key(self._ca_dir, key_file)
            raise
        return generation

    # --- who is behind --------------------------------------------------------------------

    def behind(self, rec: RotationRecord) -> list[Behind]:
        """The workloads that have not completed ``rec``'s phase (the excluded left out)."""
        served = [s for s in self.trust.served() if s.spiffe_id not in rec.excluded]
        if rec.phase in (Phase.PUBLISH, Phase.PREPARE, Phase.DROP):
            assert rec.target_version is not None
            return [
                Behind(
                    s.spiffe_id,
                    f"serves bundle version {s.version} (wanted "
                    f"{rec.target_version}), last seen {s.last_seen:%H:%M:%SZ}",
                )
                for s in behind(rec.target_version, served)
            ]
        if rec.phase is Phase.SIGN:
            return self._not_under_new_root(rec, served)
        return []

    def _not_under_new_root(
        self, rec: RotationRecord, served: Sequence[ServedReport]
    ) -> list[Behind]:
        latest = self.rotations.latest_certificates()
        slots = self.slots.slots()
        intermediates = [c for r in slots.records for c in r.chain]
        out = []
        for s in served:
            cert = latest.get(s.spiffe_id)
            if cert is None:
                out.append(Behind(s.spiffe_id, "no certificate in the ledger"))
            elif not chains_to_root(cert, intermediates, rec.new_root):
                out.append(
                    Behind(
                        s.spiffe_id,
                        f"latest certificate {cert.serial_number:x} (issued "
                        f"{cert.not_valid_before_utc:%H:%M:%SZ}) chains to the old root",
                    )
                )
        return out

    # --- the loop ------------------------------------------------------------------------

    async def drive(
        self,
        rec: RotationRecord,
        *,
        force: bool = False,
        timeout: float | None = None,
        min_phase: float = 0.0,
    ) -> RotationRecord:
        """Run ``rec`` from its phase to DONE. ``force``: the workloads behind the current
        phase when this call starts waiting are left out of the rest of the rotation (named,
        recorded). ``min_phase``: seconds each phase lasts at least (for federated meshes'
        pollers, which this mesh cannot see). Raises :class:`RotationWaiting` (message
        naming who is behind) when a phase waited ``timeout`` seconds: the phase stays in
        the ledger, a re-run resumes it."""
        try:
            return await self._drive(rec, force=force, timeout=timeout, min_phase=min_phase)
        except BaseException:
            # Stopped (waited too long, interrupted, the ledger failed): the lease goes at
            # once, so `rotation status` says nobody drives it and a re-run may resume.
            with contextlib.suppress(LedgerError, SQLAlchemyError):
                await asyncio.to_thread(self.rotations.release, rec.id, self.driver)
            raise

    async def _drive(
        self, rec: RotationRecord, *, force: bool, timeout: float | None, min_phase: float
    ) -> RotationRecord:
        forced = not force
        while rec.phase is not Phase.DONE:
            rec = await asyncio.to_thread(self.enter, rec)
            self._say(f"phase {rec.phase.label}: waiting for every workload")
            waited = 0.0
            last_report = ""
            holding = False
            while True:
                now = self._clock.now()
                if not await asyncio.to_thread(self.rotations.take_lease, rec.id, self.driver, now):
                    raise LedgerError("another command took this root rotation over")
                late = await asyncio.to_thread(self.behind, rec)
                if not late and waited >= min_phase:
                    break
                if late and not forced:
                    forced = True
                    names = "\n".join(sorted({*rec.excluded, *(b.spiffe_id for b in late)}))
                    await asyncio.to_thread(
                        self.rotations.update, rec.id, now, self.driver, excluded=names
                    )
                    rec = dataclasses.replace(rec, excluded=tuple(names.split("\n")))
                    for b in late:
                        self._say(f"--force: going on without {b.spiffe_id} ({b.why})")
                    late = []
                    if waited >= min_phase:
                        break
                if not late:
                    if not holding:
                        holding = True
                        self._say(
                            f"  every workload is through; holding the phase "
                            f"{min_phase - waited:.0f} s more (--min-phase)"
                        )
                    await self._clock.sleep(POLL)
                    waited += POLL
                    continue
                report = ", ".join(b.spiffe_id for b in late)
                if report != last_report:
                    self._say(f"  behind: {report}")
                    last_report = report
                if timeout is not None and waited >= timeout:
                    detail = "; ".join(f"{b.spiffe_id}: {b.why}" for b in late)
                    raise RotationWaiting(
                        f"phase {rec.phase.label} still waits after {timeout:.0f} s for "
                        f"{len(late)} workload(s): {detail}. The phase is kept in the ledger: "
                        "run the command again to keep waiting, or with --force to go on "
                        "without them"
                    )
                await self._clock.sleep(POLL)
                waited += POLL
            nxt = Phase(int(rec.phase) + 1)
            values: dict[str, object] = {"phase": int(nxt), "target_version": None}
            await asyncio.to_thread(
                self.rotations.update, rec.id, self._clock.now(), self.driver, **values
            )
            rec = dataclasses.replace(rec, phase=nxt, target_version=None)
            self._say(f"phase {nxt.label}")
        await asyncio.to_thread(self.rotations.release, rec.id, self.driver)
        return rec


def _load_key(path: Path) -> PrivateKey:
    from meshtrust.pki import load_private_key_pem

    try:
        return load_private_key_pem(path.read_bytes(), source=str(path))
    except OSError as exc:
        raise SlotError(f"cannot read {path}: {exc.strerror}") from exc


def default_driver() -> str:
    return f"meshtrust ca rotate-root (pid {os.getpid()} on {socket.gethostname()})"


async def run_rotation(
    rotation: RootRotation,
    *,
    new_root: Signer | None = None,
    chain: Sequence[x509.Certificate] = (),
    key: PrivateKey | None = None,
    root_cert: x509.Certificate | None = None,
    force: bool = False,
    timeout: float | None = None,
    min_phase: float = 0.0,
) -> RotationRecord:
    """Start a rotation (or resume the one recorded whose lease is stale) and drive it to
    DONE. A new one needs ``new_root`` (generated, its key in the CA dir) or a plugged-in
    ``chain`` + ``key`` + ``root_cert``. Raises :class:`InvalidInput` (refusals),
    :class:`LedgerError`, :class:`RotationWaiting`."""
    now = rotation._clock.now()
    rec = rotation.rotations.current()
    if rec is not None and rec.phase is not Phase.DONE:
        if rec.lease_live(now) and rec.driver != rotation.driver:
            raise InvalidInput(
                f"a root rotation is already running: phase {rec.phase.label}, driven by "
                f"{rec.driver}, last heartbeat {(now - rec.heartbeat_at).total_seconds():.0f} s"
                " ago; `meshtrust ca rotation status` shows it"
            )
        if new_root is not None or chain:
            raise InvalidInput(
                f"root rotation {rec.id} (to root {fingerprint(rec.new_root)[:16]}…) is not "
                f"done (phase {rec.phase.label}): run `meshtrust ca rotate-root` without "
                "--root-dir to resume it"
            )
        if not rotation.rotations.take_lease(rec.id, rotation.driver, now):
            raise InvalidInput("a root rotation is already running (its lease was just taken)")
        return await rotation.drive(rec, force=force, timeout=timeout, min_phase=min_phase)
    bundle = rotation._bundle()
    if new_root is not None:
        cert, key_file = new_root.cert, f"root-key-{fingerprint(new_root.cert)[:16]}.pem"
        rec_chain: tuple[x509.Certificate, ...] = ()
    else:
        if root_cert is None or not chain or key is None:
            raise InvalidInput("a plugged-in root needs its certificate, a chain and its key")
        cert = root_cert
        rec_chain = tuple(chain)
        key_file = write_slot_key(rotation._ca_dir, 0, key)
    if cert in bundle.roots:
        raise InvalidInput(f"root {fingerprint(cert)[:16]}… is in the bundle already")
    active = rotation.slots.slots().active
    if active is not None and chains_to(active.chain, cert):
        raise InvalidInput("the active signing CA chains to that root already")
    rec = rotation.rotations.start(bundle.roots, cert, rec_chain, key_file, now, rotation.driver)
    return await rotation.drive(rec, force=force, timeout=timeout, min_phase=min_phase)
