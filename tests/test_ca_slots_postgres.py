"""Signing slots on a real PostgreSQL server: replicas racing to prepare (each its own
engine, as separate CA processes on separate machines would be) make one intermediate,
and every replica follows the activation."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from meshtrust.ca import SqlLedger, init_ca_dir, load_ca_dir
from meshtrust.ca.cadir import load_root_signer
from meshtrust.ca.schema import signing_slots
from meshtrust.ca.signing import SigningWatch, Slot, SlotLedger
from meshtrust.clock import FakeClock
from tests.postgres import PostgresServer, postgres_server
from tests.test_ca_slots import DAY, T0, TD

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.mark.asyncio
async def test_replicas_racing_on_postgresql_make_one_intermediate(
    pg: PostgresServer, tmp_path: Path
) -> None:
    url = pg.create_database(f"s{uuid.uuid4().hex[:12]}")
    ca_dir = tmp_path / "ca"
    init_ca_dir(ca_dir, TD, T0, intermediate_lifetime=30 * DAY)
    material = load_ca_dir(ca_dir, T0)
    root = load_root_signer(ca_dir, material.roots)
    clock = FakeClock(T0)
    ledgers = [SqlLedger(url) for _ in range(4)]  # four engines: four replicas
    watches = [
        SigningWatch(SlotLedger(lg.engine), ca_dir, clock, trust_domain=TD.name, root=root)
        for lg in ledgers
    ]
    # Even the first start races: one generation 1 is recorded.
    await asyncio.gather(*(asyncio.to_thread(w.load, material) for w in watches))
    try:
        for _ in range(3):  # several moments, each with all four replicas at once
            await clock.advance(16 * 86400)
            await asyncio.gather(*(w.poll_once() for w in watches))
            await asyncio.gather(*(w.poll_once() for w in watches))  # all follow
            generations = {w.current().generation for w in watches}
            assert len(generations) == 1
        with ledgers[0].engine.connect() as conn:
            rows = conn.execute(
                sa.select(signing_slots.c.generation, signing_slots.c.state).order_by(
                    signing_slots.c.generation
                )
            ).all()
        # Days 16, 32, 48: prepared gen 2 (day 16), active at day 32 with gen 3 prepared
        # (gen 2's half-life), and so on: never two rows for one generation.
        gens = [g for g, _ in rows]
        assert gens == sorted(set(gens)) == list(range(1, len(gens) + 1))
        assert sum(state == int(Slot.ACTIVE) for _, state in rows) == 1
        assert sum(state == int(Slot.PREPARED) for _, state in rows) <= 1
        prepares = [e for e in ledgers[0].audit_events() if e.action == "signing-prepare"]
        assert len(prepares) == len(gens) - 1
        # A key file per live generation after the first (whose key is ca-key.pem); the
        # retired ones' files are removed.
        live = sum(1 for g, state in rows if g > 1 and state != int(Slot.RETIRED))
        assert len(list(ca_dir.glob("signing-key-*"))) == live
        assert watches[0].current().signer.cert.not_valid_after_utc > clock.now()
        assert clock.now() - T0 == dt.timedelta(days=48)
    finally:
        for lg in ledgers:
            lg.close()
