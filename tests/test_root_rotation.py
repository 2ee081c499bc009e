"""Root rotation's phases on a real CA directory and SQLite ledger (no processes): each step
is idempotent and recorded, who is behind each phase, the lease that refuses a second driver
and lets a re-run resume, --force naming whom it leaves out, and bad input refused plainly."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from cryptography import x509

from meshtrust.ca import SqlLedger, init_ca_dir, load_ca_dir
from meshtrust.ca.cadir import load_root_signer
from meshtrust.ca.rootrotation import (
    LEASE,
    Phase,
    RootRotation,
    RotationWaiting,
    chains_to_root,
    generate_root,
    run_rotation,
)
from meshtrust.ca.schema import certificates
from meshtrust.ca.signing import SigningWatch, SlotLedger, load_slot_key
from meshtrust.ca.trust import ServedReport, TrustLedger
from meshtrust.cli import cli
from meshtrust.clock import SystemClock
from meshtrust.errors import InvalidInput
from meshtrust.pki import (
    KeyType,
    Signer,
    certs_pem,
    format_serial,
    generate_key,
    load_certs_pem,
)
from meshtrust.pki.profile import LeafIssuer
from meshtrust.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "shop", "web")
API = SpiffeId.for_workload(TD, "shop", "api")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "250"})


class Rig:
    """A CA directory, its ledger (SQLite, or ``url``) with bundle version 1 and the signing
    slots bootstrapped, as `ca serve` leaves them; and a rotation driver."""

    def __init__(self, tmp_path: Path, url: str | None = None) -> None:
        self.now = SystemClock().now()
        self.ca_dir = tmp_path / "ca"
        init_ca_dir(self.ca_dir, TD, self.now)
        self.sql = SqlLedger(url or f"sqlite:///{self.ca_dir / 'ledger.db'}")
        material = load_ca_dir(self.ca_dir, self.now)
        self.root_a = material.roots[0]
        self.watch = SigningWatch(
            SlotLedger(self.sql.engine),
            self.ca_dir,
            SystemClock(),
            trust_domain=TD.name,
            root=load_root_signer(self.ca_dir, material.roots),
        )
        self.watch.load(material)
        self.trust = TrustLedger(self.sql.engine)
        self.trust.initialise(material.roots, self.now)
        self.said: list[str] = []
        self.rotation = self.driver("test driver")

    def driver(self, name: str) -> RootRotation:
        return RootRotation(
            self.sql.engine,
            self.ca_dir,
            SystemClock(),
            trust_domain=TD.name,
            driver=name,
            say=self.said.append,
        )

    def serve(self, version: int, *ids: SpiffeId) -> None:
        self.trust.record_served([ServedReport(str(i), version, "01", self.now) for i in ids])

    def keep_up(self, spiffe_id: SpiffeId, new_root: x509.Certificate) -> None:
        """What a live agent of ``spiffe_id`` does during a rotation to ``new_root``: report
        the phase's bundle version, and once the CA signs under the new root, re-issue."""
        current = self.rotation.rotations.current()
        if current is not None and current.target_version is not None:
            self.serve(current.target_version, spiffe_id)
        if current is not None and current.phase is Phase.SIGN:
            slots = SlotLedger(self.sql.engine).slots()
            if slots.active is not None and slots.active.roots == (new_root,):
                key = load_slot_key(self.ca_dir, slots.active)
                self.issue(spiffe_id, Signer(slots.active.cert, key), SystemClock().now())

    def issue(self, spiffe_id: SpiffeId, signer: Signer, at: dt.datetime) -> None:
        key = generate_key(KeyType.EC_P256)
        cert = LeafIssuer(signer).issue(key.public_key(), spiffe_id, at, dt.timedelta(hours=1))
        with self.sql.engine.begin() as conn:
            conn.execute(
                certificates.insert(),
                [
                    {
                        "serial": format_serial(cert.serial_number),
                        "spiffe_id": str(spiffe_id),
                        "not_before": cert.not_valid_before_utc,
                        "not_after": cert.not_valid_after_utc,
                        "key_type": "ec-p256",
                        "requester": "test",
                        "authenticator": "test",
                        "issued_at": at,
                        "cert_pem": certs_pem([cert]).decode(),
                    }
                ],
            )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.sql.close()


def test_each_phase_is_one_idempotent_step_and_knows_who_is_behind(rig: Rig) -> None:
    root_b = generate_root(rig.ca_dir, TD.name, rig.now, KeyType.EC_P256)
    key_files = list(rig.ca_dir.glob("root-key-*.pem"))
    assert len(key_files) == 1 and stat.S_IMODE(key_files[0].stat().st_mode) == 0o600
    assert root_b.cert.subject != rig.root_a.subject
    rotations = rig.rotation.rotations
    rec = rotations.start([rig.root_a], root_b.cert, (), key_files[0].name, rig.now, "t")
    rig.serve(1, WEB, API)

    # Phase 1: bundle A+B, once.
    rec = rig.rotation.enter(rec)
    bundle = rig.trust.current()
    assert bundle is not None and bundle.roots == (rig.root_a, root_b.cert)
    assert rec.target_version == bundle.version == 2
    assert rig.rotation.enter(rec).target_version == 2 and rig.trust.current_version() == 2
    assert [b.spiffe_id for b in rig.rotation.behind(rec)] == [str(API), str(WEB)]
    rig.serve(2, WEB)
    assert [b.spiffe_id for b in rig.rotation.behind(rec)] == [str(API)]
    assert "serves bundle version 1 (wanted 2)" in rig.rotation.behind(rec)[0].why
    rig.serve(2, API)
    assert rig.rotation.behind(rec) == []

    # Phase 2: the slot under B is PREPARED (its CRL published by every CA process) and
    # the bundle version bumped with the same roots: agents reporting it hold that CRL.
    rotations.update(rec.id, rig.now, "t", phase=int(Phase.PREPARE), target_version=None)
    rec = rotations.current()  # type: ignore[assignment]
    assert rec is not None and rec.phase is Phase.PREPARE
    rec = rig.rotation.enter(rec)
    slots = SlotLedger(rig.sql.engine).slots()
    assert slots.prepared is not None and slots.prepared.generation == rec.generation
    assert slots.prepared.roots == (root_b.cert,)
    assert rec.target_version == 3 and rig.trust.current().roots == (rig.root_a, root_b.cert)  # type: ignore[union-attr]
    assert rig.rotation.enter(rec).generation == rec.generation  # not made twice
    asyncio.run(rig.watch.poll_once())
    issuers = rig.watch.issuers()
    assert [s.cert for s, _ in issuers] == [slots.active.cert, slots.prepared.cert]  # type: ignore[union-attr]
    rig.serve(3, WEB, API)
    assert rig.rotation.behind(rec) == []

    # Phase 3: active under B; behind until each identity's latest certificate chains to B.
    rotations.update(rec.id, rig.now, "t", phase=int(Phase.SIGN), target_version=None)
    rec = rig.rotation.enter(rotations.current())  # type: ignore[arg-type]
    active = SlotLedger(rig.sql.engine).slots().active
    assert active is not None and active.generation == rec.generation
    # Agents that start later verify the CA (now under B) from the root file: it holds B too.
    assert load_certs_pem((rig.ca_dir / "root-cert.pem").read_bytes()) == [rig.root_a, root_b.cert]
    assert load_ca_dir(rig.ca_dir, rig.now).roots == (rig.root_a, root_b.cert)
    old_signer = Signer(
        load_ca_dir(rig.ca_dir, rig.now).signer.cert, load_ca_dir(rig.ca_dir, rig.now).signer.key
    )
    rig.issue(WEB, old_signer, rig.now)
    assert [b.spiffe_id for b in rig.rotation.behind(rec)] == [str(API), str(WEB)]
    asyncio.run(rig.watch.poll_once())
    new_signer = rig.watch.current().signer
    assert chains_to_root(new_signer.cert, (), root_b.cert)
    later = rig.now + dt.timedelta(seconds=1)
    rig.issue(WEB, new_signer, later)
    rig.issue(API, new_signer, later)
    assert rig.rotation.behind(rec) == []
    # The CA rotates its intermediates under B from now on (B's key is in the CA dir).
    assert rig.watch.can_prepare

    # Phase 4: A dropped, once.
    rotations.update(rec.id, rig.now, "t", phase=int(Phase.DROP), target_version=None)
    rec = rig.rotation.enter(rotations.current())  # type: ignore[arg-type]
    assert rig.trust.current().roots == (root_b.cert,)  # type: ignore[union-attr]
    assert rig.rotation.enter(rec).target_version == rec.target_version == 4
    with rig.sql.engine.connect() as conn:
        actions = conn.execute(sa.text("SELECT action FROM audit")).scalars().all()
    assert "root-rotation-start" in actions and "trust-bundle" in actions


@pytest.mark.asyncio
async def test_a_workload_behind_holds_the_phase_then_force_goes_on_naming_it(rig: Rig) -> None:
    rig.serve(1, WEB, API)
    root_b = generate_root(rig.ca_dir, TD.name, rig.now, KeyType.EC_P256)
    with pytest.raises(RotationWaiting) as held:
        await run_rotation(rig.rotation, new_root=root_b, timeout=1.0)
    assert str(API) in str(held.value) and "--force" in str(held.value)
    rec = rig.rotation.rotations.current()
    assert rec is not None and rec.phase is Phase.PUBLISH and not rec.lease_live(rig.now)

    # A second driver while one holds a live lease is refused; a new --root-dir too.
    holder = rig.driver("holder")
    assert holder.rotations.take_lease(rec.id, "holder", SystemClock().now())
    with pytest.raises(InvalidInput, match="already running"):
        await run_rotation(rig.driver("intruder"))
    holder.rotations.release(rec.id, "holder")
    with pytest.raises(InvalidInput, match="without --root-dir to resume"):
        await run_rotation(rig.driver("again"), new_root=root_b)

    # --force: the workloads behind now are left out (named), and the rotation completes
    # (WEB keeps up: it reports each version and re-issues under B).
    async def web_keeps_up() -> None:
        while True:
            rig.keep_up(WEB, root_b.cert)
            await asyncio.sleep(0.1)

    helper = asyncio.create_task(web_keeps_up())
    try:
        done = await run_rotation(rig.driver("forcing"), force=True, timeout=30)
    finally:
        helper.cancel()
    assert done.phase is Phase.DONE and done.excluded == (str(API),)
    assert any(f"--force: going on without {API}" in s for s in rig.said)
    assert rig.trust.current().roots == (root_b.cert,)  # type: ignore[union-attr]
    rec = rig.rotation.rotations.current()
    assert rec is not None and rec.phase is Phase.DONE


def test_a_stale_lease_lets_a_rerun_resume(rig: Rig) -> None:
    root_b = generate_root(rig.ca_dir, TD.name, rig.now, KeyType.EC_P256)
    rec = rig.rotation.rotations.start([rig.root_a], root_b.cert, (), "x.pem", rig.now, "dead")
    later = rig.now + LEASE + dt.timedelta(seconds=1)
    assert rec.lease_live(rig.now) and not rec.lease_live(later)
    assert not rig.rotation.rotations.take_lease(rec.id, "new", rig.now)
    assert rig.rotation.rotations.take_lease(rec.id, "new", later)


def test_cli_refuses_bad_root_dirs_and_status_shows_the_phase(rig: Rig, tmp_path: Path) -> None:
    ca = str(rig.ca_dir)
    not_ca = tmp_path / "empty"
    not_ca.mkdir()
    result = invoke("ca", "rotate-root", "--ca-dir", ca, "--root-dir", str(not_ca))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert str(not_ca) in result.output
    other = tmp_path / "other-td"
    init_ca_dir(other, TrustDomain("other.org"), rig.now)
    result = invoke("ca", "rotate-root", "--ca-dir", ca, "--root-dir", str(other))
    assert result.exit_code == 2 and "trust domain other.org, not example.org" in result.output
    expired = tmp_path / "expired"
    init_ca_dir(
        expired,
        TD,
        rig.now - dt.timedelta(days=2),
        intermediate_lifetime=dt.timedelta(days=1),
    )
    result = invoke("ca", "rotate-root", "--ca-dir", ca, "--root-dir", str(expired))
    assert result.exit_code != 0 and "expired" in result.output.lower(), result.output
    assert rig.rotation.rotations.current() is None  # nothing written

    # A plugged-in root: held in phase 1 by WEB, status shows the phase and who is behind.
    rig.serve(1, WEB)
    given = tmp_path / "given"
    init_ca_dir(given, TD, rig.now)
    result = invoke(
        "ca", "rotate-root", "--ca-dir", ca, "--root-dir", str(given), "--timeout", "0.5"
    )
    assert result.exit_code == 1, result.output
    assert str(WEB) in result.output and "run the command again" in result.output
    status = invoke("ca", "rotation", "status", "--ca-dir", ca, "-o", "json")
    doc = json.loads(status.output)["root_rotation"]
    assert doc["phase"] == "publish" and not doc["driver_alive"]
    assert [b["spiffe_id"] for b in doc["behind"]] == [str(WEB)]
    text = invoke("ca", "rotation", "status", "--ca-dir", ca)
    assert "phase 1/3 publish bundle A+B" in text.output and "BEHIND THIS PHASE" in text.output
    result = invoke("ca", "rotate-root", "--ca-dir", ca, "--root-dir", str(given))
    assert result.exit_code == 2 and "without --root-dir to resume" in result.output


class _CountingClock(SystemClock):
    """The system's time; a sleep is written into ``events``, runs ``tick`` and returns."""

    def __init__(self, events: list[str], tick: Callable[[], None]) -> None:
        self.events, self.tick = events, tick

    async def sleep(self, seconds: float) -> None:
        self.events.append(f"sleep {seconds}")
        self.tick()
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_min_phase_holds_each_phase_after_every_workload_is_through(rig: Rig) -> None:
    """--min-phase: federated meshes poll this CA's bundle endpoint at its refresh hint,
    which no report of this mesh shows; each phase then lasts at least that long."""
    events: list[str] = []
    root_b = generate_root(rig.ca_dir, TD.name, rig.now, KeyType.EC_P256)

    def web_keeps_up() -> None:  # between two polls of the driver
        rig.keep_up(WEB, root_b.cert)

    rotation = RootRotation(
        rig.sql.engine,
        rig.ca_dir,
        _CountingClock(events, web_keeps_up),
        trust_domain=TD.name,
        driver="min-phase",
        say=events.append,
    )
    rig.serve(1, WEB)
    done = await run_rotation(rotation, new_root=root_b, timeout=60, min_phase=5.0)
    assert done.phase is Phase.DONE
    holds = [i for i, e in enumerate(events) if "(--min-phase)" in e]
    assert len(holds) == 4, events  # PUBLISH, PREPARE, SIGN, DROP
    for start in holds:
        end = next(i for i in range(start, len(events)) if events[i].startswith("phase "))
        polls = [e for e in events[start:end] if e.startswith("sleep ")]
        assert polls, events[start:end]
    # Each phase lasted at least 5 s of 0.5 s polls, counting its wait for workloads.
    starts = [i for i, e in enumerate(events) if e.startswith("phase ") and "waiting" in e]
    for start in starts:
        end = next(
            (i for i in range(start + 1, len(events)) if events[i].startswith("phase ")),
            len(events),
        )
        assert sum(e.startswith("sleep ") for e in events[start:end]) >= 10
