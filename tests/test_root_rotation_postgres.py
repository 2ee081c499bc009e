"""Root rotation on a PostgreSQL ledger (tests/postgres.py): migration 6, every phase's step
and wait, the lease refusing a second driver, --force, and the latest-certificate query."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrust.ca.rootrotation import Phase, RotationWaiting, generate_root, run_rotation
from meshtrust.ca.signing import SlotLedger
from meshtrust.errors import InvalidInput
from meshtrust.pki import KeyType
from tests.postgres import PostgresServer, postgres_server
from tests.test_root_rotation import API, TD, WEB, Rig

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def test_a_rotation_on_postgres_holds_refuses_a_second_driver_and_runs_to_done(
    pg: PostgresServer, tmp_path: Path
) -> None:
    rig = Rig(tmp_path, pg.create_database(f"r{uuid.uuid4().hex[:12]}"))
    try:
        rig.serve(1, WEB, API)
        root_b = generate_root(rig.ca_dir, TD.name, rig.now, KeyType.EC_P256)
        with pytest.raises(RotationWaiting, match=str(API)):
            asyncio.run(run_rotation(rig.driver("one"), new_root=root_b, timeout=0.5))
        rec = rig.rotation.rotations.current()
        assert rec is not None and rec.phase is Phase.PUBLISH and rec.target_version == 2
        holder = rig.driver("holder")
        assert holder.rotations.take_lease(rec.id, "holder", rig.now)
        with pytest.raises(InvalidInput, match="already running"):
            asyncio.run(run_rotation(rig.driver("two")))
        holder.rotations.release(rec.id, "holder")
        done = asyncio.run(run_rotation(rig.driver("three"), force=True, timeout=30))
        assert done.phase is Phase.DONE and set(done.excluded) == {str(WEB), str(API)}
        bundle = rig.trust.current()
        assert bundle is not None and bundle.roots == (root_b.cert,)
        slots = SlotLedger(rig.sql.engine).slots()
        assert slots.active is not None and slots.active.roots == (root_b.cert,)
    finally:
        rig.sql.close()
