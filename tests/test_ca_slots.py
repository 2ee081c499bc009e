"""Signing-CA rotation (meshtrust.ca.signing): the pure slot decisions over days of fake
time, the ledger's slot table on SQLite (two replicas racing), bad slots, switch_to_root."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import stat
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.ca import SqlLedger, init_ca_dir, load_ca_dir
from meshtrust.ca.cadir import load_root_signer
from meshtrust.ca.crl import build_crl
from meshtrust.ca.revocation import RevocationState
from meshtrust.ca.schema import signing_slots
from meshtrust.ca.signing import (
    Decision,
    SigningMaterial,
    SigningWatch,
    Slot,
    SlotError,
    SlotLedger,
    SlotRecord,
    Slots,
    SlotStep,
    activation_time,
    chain_expiry_warning,
    decide_slots,
    preparation_time,
    switch_to_root,
    trusted_roots,
)
from meshtrust.clock import FakeClock
from meshtrust.pki import (
    KeyType,
    Signer,
    certs_pem,
    generate_key,
    load_private_key_pem,
    make_intermediate,
    make_root,
)
from meshtrust.pki.profile import LeafIssuer
from meshtrust.spiffe import SpiffeId, TrustDomain

TD = TrustDomain.parse("example.org")
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)

_ROOT_KEY = generate_key(KeyType.EC_P256)
_ROOT = make_root(_ROOT_KEY, TD.name, T0 - DAY, dt.timedelta(days=3650))


def _record(gen: int, slot: Slot, issued: dt.datetime, life: dt.timedelta) -> SlotRecord:
    key = generate_key(KeyType.EC_P256)
    cert = make_intermediate(key, Signer(_ROOT, _ROOT_KEY), TD.name, issued, life)
    return SlotRecord(gen, slot, (cert,), (_ROOT,), f"k{gen}", issued)


# -- the thresholds (SPIRE's, capped at 30 and 7 days) --------------------------------------


@pytest.mark.parametrize(
    ("life", "prepare_after", "activate_after"),
    [
        (dt.timedelta(days=30), dt.timedelta(days=15), dt.timedelta(days=25)),
        (dt.timedelta(minutes=2), dt.timedelta(minutes=1), dt.timedelta(seconds=100)),
        # a year: prepare 30 days before the end, activate 7 days before (the caps)
        (dt.timedelta(days=365), dt.timedelta(days=335), dt.timedelta(days=358)),
    ],
)
def test_thresholds(
    life: dt.timedelta, prepare_after: dt.timedelta, activate_after: dt.timedelta
) -> None:
    assert preparation_time(T0, T0 + life) == T0 + prepare_after
    assert activation_time(T0, T0 + life) == T0 + activate_after


def test_decisions_table() -> None:
    life = dt.timedelta(days=30)
    active = _record(1, Slot.ACTIVE, T0, life)
    prepared = _record(2, Slot.PREPARED, T0 + 15 * DAY, life)
    old = _record(0, Slot.OLD, T0 - 20 * DAY, life)  # expires at T0 + 10 days
    cases: list[tuple[Slots, dt.datetime, bool, list[Decision]]] = [
        (Slots(active=active), T0 + 14 * DAY, True, []),
        (Slots(active=active), T0 + 15 * DAY, True, [Decision(SlotStep.PREPARE, 2)]),
        (Slots(active=active), T0 + 15 * DAY, False, []),  # no root key: no successor
        (Slots(active=active, prepared=prepared), T0 + 20 * DAY, True, []),
        (
            Slots(active=active, prepared=prepared),
            T0 + 25 * DAY,
            True,
            [Decision(SlotStep.ACTIVATE, 2)],
        ),
        (Slots(active=active, old=(old,)), T0 + 9 * DAY, True, []),
        (Slots(active=active, old=(old,)), T0 + 10 * DAY, True, [Decision(SlotStep.RETIRE, 0)]),
        (Slots(), T0, True, []),
    ]
    for slots, now, can_prepare, expected in cases:
        assert decide_slots(slots, now, can_prepare=can_prepare) == expected


def test_slot_decisions_over_ninety_days_of_fake_time() -> None:
    """Apply the decisions hour by hour, as the watch does: one successor per lifetime,
    always exactly one ACTIVE, an OLD one only until it expires, and the signer in use is
    never expired."""
    life = dt.timedelta(days=30)
    slots = Slots(active=_record(1, Slot.ACTIVE, T0, life))
    events: list[tuple[float, str, int]] = []
    now = T0
    while now < T0 + 90 * DAY:
        for d in decide_slots(slots, now, can_prepare=True):
            days = (now - T0) / DAY
            events.append((days, d.step.value, d.generation))
            if d.step is SlotStep.PREPARE:
                slots = Slots(
                    active=slots.active,
                    prepared=_record(d.generation, Slot.PREPARED, now, life),
                    old=slots.old,
                )
            elif d.step is SlotStep.ACTIVATE:
                assert slots.active is not None and slots.prepared is not None
                slots = Slots(active=slots.prepared, old=(*slots.old, slots.active))
            else:
                slots = Slots(
                    active=slots.active,
                    prepared=slots.prepared,
                    old=tuple(o for o in slots.old if o.generation != d.generation),
                )
        assert slots.active is not None and now < slots.active.not_after
        assert len(slots.old) <= 1
        now += dt.timedelta(hours=1)
    assert events[:7] == [
        (15.0, "prepare", 2),
        (25.0, "activate", 2),
        (30.0, "retire", 1),  # the old one expires
        (30.0, "prepare", 3),  # the new active (issued day 15) at half its life
        (40.0, "activate", 3),
        (45.0, "retire", 2),
        (45.0, "prepare", 4),
    ]
    assert sum(step == "activate" for _, step, _ in events) == 5  # every 15 days from day 25


def test_plugged_in_chain_warnings() -> None:
    life = dt.timedelta(days=90)
    end = T0 + life
    assert chain_expiry_warning(T0, end, T0 + 44 * DAY) is None
    levels = [
        chain_expiry_warning(T0, end, T0 + d * DAY) for d in (60, 84, 89.5)
    ]  # 30 days, 6 days (activation: 7 days before), half a day left
    assert [w.level for w in levels if w is not None] == [1, 2, 3]
    assert levels[0] is not None and "30.0 days left" in levels[0].message
    assert "no root key" in levels[0].message


# -- the ledger's slots and the watch, on SQLite and a real CA directory ----------------


def _ca(tmp_path: Path, life: dt.timedelta = 30 * DAY) -> tuple[Path, SqlLedger]:
    directory = tmp_path / "ca"
    init_ca_dir(directory, TD, T0, intermediate_lifetime=life)
    return directory, SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")


def _watch(
    ca_dir: Path, sql: SqlLedger, clock: FakeClock, *, root: bool = True, fresh_keys: bool = False
) -> SigningWatch:
    material = load_ca_dir(ca_dir, clock.now(), signer_may_expire=True)
    watch = SigningWatch(
        SlotLedger(sql.engine),
        ca_dir,
        clock,
        trust_domain=TD.name,
        root=load_root_signer(ca_dir, material.roots) if root else None,
        fresh_keys=fresh_keys,
    )
    watch.load(material)
    return watch


@pytest.mark.asyncio
async def test_watch_rotates_over_days_and_replicas_agree(tmp_path: Path) -> None:
    ca_dir, sql = _ca(tmp_path)
    other_sql = SqlLedger(sql.url)
    clock = FakeClock(T0)
    first, second = _watch(ca_dir, sql, clock), _watch(ca_dir, other_sql, clock)
    assert first.current().generation == second.current().generation == 1
    original = first.current().signer.cert
    assert original == load_ca_dir(ca_dir, T0).signer.cert
    seen: list[tuple[int, int, int]] = []
    for day in range(1, 61):
        await clock.advance(((T0 + day * DAY) - clock.now()).total_seconds())
        await first.poll_once()
        await second.poll_once()
        assert first.current().generation == second.current().generation
        assert first.current().signer.cert.not_valid_after_utc > clock.now()
        seen.append((day, first.current().generation, len(list(ca_dir.glob("signing-key-*")))))
    # generation 2 prepared at day 15 (one key file), active from day 25; generation 3
    # prepared at day 30, when generation 1 (the CA directory's) expired.
    assert seen[14] == (15, 1, 1) and seen[24] == (25, 2, 1) and seen[29] == (30, 2, 2)
    assert seen[39] == (40, 3, 2)  # generation 2 old until day 45; 4 prepared at day 45
    new = first.current()
    assert new.signer.cert != original and new.roots == load_ca_dir(ca_dir, T0).roots
    # The chain handed out: the new intermediate, then the root bundle.
    assert len(new.chain_tail) == 2
    assert x509.load_pem_x509_certificate(new.chain_tail[0].encode()) == new.signer.cert
    for path in ca_dir.glob("signing-key-*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    actions = [e.action for e in sql.audit_events() if e.action.startswith("signing-")]
    assert actions[:5] == [
        "signing-bootstrap",
        "signing-prepare",
        "signing-activate",
        "signing-retire",
        "signing-prepare",
    ]
    sql.close()
    other_sql.close()


@pytest.mark.asyncio
async def test_four_replicas_preparing_at_once_make_one_intermediate(tmp_path: Path) -> None:
    ca_dir, sql = _ca(tmp_path)
    ledgers = [SqlLedger(sql.url) for _ in range(4)]
    clock = FakeClock(T0)
    watches = [_watch(ca_dir, lg, clock) for lg in ledgers]
    await clock.advance(16 * 86400)  # past the preparation time, for all at the same moment
    await asyncio.gather(*(w.poll_once() for w in watches))  # each in its own thread
    with sql.engine.connect() as conn:
        rows = conn.execute(sa.select(signing_slots.c.generation, signing_slots.c.state)).all()
    assert sorted(rows) == [(1, int(Slot.ACTIVE)), (2, int(Slot.PREPARED))]
    assert len(list(ca_dir.glob("signing-key-*"))) == 1  # the losers made no key at all
    prepares = [e for e in sql.audit_events() if e.action == "signing-prepare"]
    assert len(prepares) == 1
    for w in watches:
        await w.poll_once()
        assert w.slots.prepared is not None and w.slots.prepared.generation == 2
    for lg in [sql, *ledgers]:
        lg.close()


@pytest.mark.asyncio
async def test_corrupt_prepared_key_is_refused_and_the_active_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0 + 16 * DAY)
    watch = _watch(ca_dir, sql, clock)
    (key_file,) = ca_dir.glob("signing-key-2-*")
    key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    await clock.advance(((T0 + 26 * DAY) - clock.now()).total_seconds())
    await watch.poll_once()
    # Generation 2 was never used: retired, a fresh generation 3 prepared and activated
    # (the CA signed with generation 1 until then).
    assert watch.current().generation == 3
    assert (
        f"signing CA generation 2: {key_file}: not an unencrypted PEM private key; "
        "not activated: still signing with generation 1" in caplog.text
    )
    assert "Traceback" not in caplog.text
    sql.close()


@pytest.mark.asyncio
async def test_corrupt_slot_row_is_named_and_the_active_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0 + 16 * DAY)
    watch = _watch(ca_dir, sql, clock)
    with sql.engine.begin() as conn:
        conn.execute(
            signing_slots.update()
            .where(signing_slots.c.generation == 2)
            .values(cert_pem="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        )
    await clock.advance(((T0 + 26 * DAY) - clock.now()).total_seconds())
    await watch.poll_once()
    assert "signing_slots, generation 2: field cert_pem" in caplog.text
    assert "Traceback" not in caplog.text
    # The broken row was retired and a fresh generation made and used, never the broken one.
    assert watch.current().generation == 3
    with sql.engine.connect() as conn:
        state = conn.execute(
            sa.select(signing_slots.c.state).where(signing_slots.c.generation == 2)
        ).scalar()
    assert state == int(Slot.RETIRED)
    sql.close()


def test_unreadable_active_slot_at_start_is_a_clear_error(tmp_path: Path) -> None:
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0 + 26 * DAY)
    assert _watch(ca_dir, sql, clock).current().generation == 2
    (key_file,) = ca_dir.glob("signing-key-2-*")
    key_file.write_bytes(b"not a key\n")
    with pytest.raises(SlotError, match=rf"signing CA generation 2: {key_file}: not an"):
        _watch(ca_dir, sql, clock)
    sql.close()


@pytest.mark.asyncio
async def test_plugged_in_ca_warns_once_per_level_and_never_prepares(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0)
    watch = _watch(ca_dir, sql, clock, root=False)
    assert watch.warning is None
    for day in (16, 17, 26, 27, 29.5):
        await clock.advance(((T0 + day * DAY) - clock.now()).total_seconds())
        await watch.poll_once()
    assert watch.current().generation == 1 and not list(ca_dir.glob("signing-key-*"))
    assert watch.warning is not None and watch.warning.level == 3
    assert caplog.text.count("signing CA chain expires at") == 3
    sql.close()


@pytest.mark.asyncio
async def test_switch_to_root_makes_a_new_root_active_everywhere(tmp_path: Path) -> None:
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0 + DAY)
    first, second = _watch(ca_dir, sql, clock), _watch(ca_dir, SqlLedger(sql.url), clock)
    old_root = first.current().roots[0]
    new_key = generate_key(KeyType.EC_P256)
    new_root = make_root(new_key, TD.name, clock.now(), dt.timedelta(days=3650))
    store = SlotLedger(sql.engine)
    generation = await switch_to_root(
        store, ca_dir, clock.now(), trust_domain=TD.name, root=Signer(new_root, new_key)
    )
    assert generation == 2
    for w in (first, second):
        assert await w.poll_once()
        # The response's root bundle: the directory's, plus each root a live slot needs.
        assert set(w.current().roots) == {old_root, new_root}
        w.current().signer.cert.verify_directly_issued_by(new_root)
    slots = store.slots()
    assert [o.generation for o in slots.old] == [1]
    assert set(trusted_roots(slots)) == {old_root, new_root}
    # A plugged-in intermediate under yet another root, with its key.
    third_key = generate_key(KeyType.EC_P256)
    third_root = make_root(third_key, TD.name, clock.now(), dt.timedelta(days=3650))
    inter_key = generate_key(KeyType.EC_P256)
    inter = make_intermediate(
        inter_key, Signer(third_root, third_key), TD.name, clock.now(), 30 * DAY
    )
    with pytest.raises(SlotError, match="does not match"):
        await switch_to_root(
            store,
            ca_dir,
            clock.now(),
            trust_domain=TD.name,
            chain=[inter],
            key=third_key,
            roots=[third_root],
        )
    with pytest.raises(SlotError, match="does not end at one of the given roots"):
        await switch_to_root(
            store,
            ca_dir,
            clock.now(),
            trust_domain=TD.name,
            chain=[inter],
            key=inter_key,
            roots=[new_root],
        )
    still = store.slots().active
    assert still is not None and still.generation == 2  # the refused switches changed nothing
    generation = await switch_to_root(
        store,
        ca_dir,
        clock.now(),
        trust_domain=TD.name,
        chain=[inter],
        key=inter_key,
        roots=[third_root],
    )
    assert generation == 3 and await first.poll_once()
    assert first.current().signer.cert == inter
    assert set(trusted_roots(store.slots())) == {old_root, new_root, third_root}
    keys = sorted(p.name for p in ca_dir.glob("signing-key-*"))
    assert len(keys) == 2  # one per switch; the refused ones left nothing behind
    (third_file,) = ca_dir.glob("signing-key-3-*")
    assert load_private_key_pem(third_file.read_bytes()).public_key() == inter_key.public_key()
    sql.close()


class _FailsOnce(SlotLedger):
    """The slots' ledger, whose next revision() raises ``error`` once (then works)."""

    def __init__(self, engine: sa.Engine, error: Exception) -> None:
        super().__init__(engine)
        self.error: Exception | None = error

    def revision(self) -> int:
        error, self.error = self.error, None
        if error is not None:
            raise error
        return super().revision()


@pytest.mark.asyncio
async def test_an_unexpected_error_in_a_poll_is_logged_and_the_watch_follows_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0 + DAY)
    material = load_ca_dir(ca_dir, clock.now())
    watch = SigningWatch(
        _FailsOnce(sql.engine, RuntimeError("injected fault")),
        ca_dir,
        clock,
        trust_domain=TD.name,
        root=load_root_signer(ca_dir, material.roots),
        interval=1.0,
    )
    watch.load(material)
    task = asyncio.create_task(watch.run())
    try:
        await clock.wait_for_sleepers()
        await clock.advance(1.0)  # the first poll raises RuntimeError
        await clock.wait_for_sleepers()  # asleep again: the poll (in threads) is over
        assert not task.done(), task
        assert watch.failed_polls == 1
        assert "signing slots: unexpected RuntimeError: injected fault" in caplog.text
        assert "keeping generation 1" in caplog.text
        # Another replica switches the signer; the next poll of this one follows.
        new_key = generate_key(KeyType.EC_P256)
        new_root = make_root(new_key, TD.name, clock.now(), dt.timedelta(days=3650))
        generation = await switch_to_root(
            SlotLedger(sql.engine),
            ca_dir,
            clock.now(),
            trust_domain=TD.name,
            root=Signer(new_root, new_key),
        )
        await clock.advance(1.0)
        await clock.wait_for_sleepers()
        assert watch.current().generation == generation == 2
        watch.current().signer.cert.verify_directly_issued_by(new_root)
        assert watch.failed_polls == 1 and not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sql.close()


def test_a_restarted_ca_signs_with_the_active_slot_not_ca_cert_pem(tmp_path: Path) -> None:
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0 + 26 * DAY)  # started late: prepare and activate at once
    watch = _watch(ca_dir, sql, clock)
    assert watch.current().generation == 2
    restarted = _watch(ca_dir, SqlLedger(sql.url), clock)
    assert restarted.current().generation == 2
    assert restarted.current().signer.cert != load_ca_dir(ca_dir, T0).signer.cert
    sql.close()


@pytest.mark.asyncio
async def test_a_successor_keeps_the_key_so_either_crl_covers_both(tmp_path: Path) -> None:
    """The default: a successor is a new certificate for the same key and name, so the CRL
    a sidecar holds (signed by either) verifies leaves of both -- `openssl verify
    -crl_check` (what Envoy does) accepts a leaf of generation 2 with generation 1's CRL."""
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0)
    watch = _watch(ca_dir, sql, clock)
    first = watch.current()
    await clock.advance(26 * 86400)
    await watch.poll_once()
    second = watch.current()
    assert second.generation == 2 and second.signer.cert != first.signer.cert
    assert second.signer.cert.public_key() == first.signer.cert.public_key()
    assert second.signer.cert.subject == first.signer.cert.subject
    (key_file,) = ca_dir.glob("signing-key-2-*")  # its own file all the same
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    done = _crl_check(tmp_path, second, first, clock.now())
    assert done.returncode == 0, done.stdout + done.stderr
    sql.close()


@pytest.mark.asyncio
async def test_fresh_keys_give_each_successor_a_new_key(tmp_path: Path) -> None:
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0)
    watch = _watch(ca_dir, sql, clock, fresh_keys=True)
    first = watch.current()
    await clock.advance(26 * 86400)
    await watch.poll_once()
    assert watch.current().generation == 2
    assert watch.current().signer.cert.public_key() != first.signer.cert.public_key()
    # Why it is not the default: a sidecar holding the old CRL refuses the new leaves.
    done = _crl_check(tmp_path, watch.current(), first, clock.now())
    assert done.returncode != 0 and "unable to get certificate CRL" in done.stderr
    sql.close()


def _crl_check(
    tmp_path: Path, signing: SigningMaterial, crl_by: SigningMaterial, now: dt.datetime
) -> subprocess.CompletedProcess[str]:
    """`openssl verify -crl_check` of a new leaf of ``signing`` with the CRL of ``crl_by``."""
    leaf_key = generate_key(KeyType.EC_P256)
    leaf = LeafIssuer(signing.signer).issue(
        leaf_key.public_key(), SpiffeId.for_workload(TD, "default", "web"), now, DAY
    )
    crl = build_crl(crl_by.signer, RevocationState(), now, DAY)
    files = {
        "root.pem": certs_pem(signing.roots),
        "inter.pem": certs_pem([signing.signer.cert]),
        "leaf.pem": certs_pem([leaf]),
        "crl.pem": crl.public_bytes(serialization.Encoding.PEM),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    command = ["openssl", "verify", "-crl_check", "-attime", str(int(now.timestamp()))]
    command += ["-CAfile", "root.pem", "-untrusted", "inter.pem", "-CRLfile", "crl.pem"]
    return subprocess.run(
        [*command, "leaf.pem"], cwd=tmp_path, capture_output=True, text=True, check=False
    )


@pytest.mark.asyncio
async def test_a_successor_that_cannot_be_made_is_reported_and_the_ca_signs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_dir, sql = _ca(tmp_path)
    clock = FakeClock(T0)
    watch = _watch(ca_dir, sql, clock)  # holds generation 1's key in memory
    (ca_dir / "ca-key.pem").write_bytes(b"damaged\n")
    await clock.advance(16 * 86400)
    await watch.poll_once()
    await watch.poll_once()
    assert watch.current().generation == 1 and watch.slots.prepared is None
    assert caplog.text.count(f"signing CA generation 1: {ca_dir / 'ca-key.pem'}: not an") == 1
    assert "Traceback" not in caplog.text and not list(ca_dir.glob("signing-key-*"))
    sql.close()
