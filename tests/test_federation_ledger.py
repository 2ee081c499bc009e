"""Migration 5 (federated bundles) applies on its own terms: each missing migration is
applied, whatever its number, so migrations numbered by separate pieces of work compose."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import sqlalchemy as sa

from meshtrust.ca.ledger import SqlLedger
from meshtrust.ca.schema import MIGRATIONS, Migration, migrate

T = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _versions(url: str) -> list[int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT version FROM meshtrust_schema ORDER BY version"))
        versions = [int(v) for (v,) in rows]
    engine.dispose()
    return versions


def test_a_fresh_ledger_gets_every_migration_including_5(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    SqlLedger(url).close()
    assert 5 in _versions(url)
    engine = sa.create_engine(url)
    assert {"federated_bundles", "published_bundle"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


def test_a_migration_numbered_below_the_highest_applied_still_runs(tmp_path: Path) -> None:
    """A ledger at 5 made by a release without migration 3 gets 3 when it arrives."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = sa.create_engine(url)
    try:
        migrate(engine, T, url, tuple(m for m in MIGRATIONS if m.version != 3))
        assert 3 not in _versions(url) and 5 in _versions(url)
        made: list[int] = []
        late = Migration(3, "arrived later", lambda conn: made.append(3))
        with_late = tuple(sorted((*(m for m in MIGRATIONS if m.version != 3), late),
                                 key=lambda m: m.version))  # fmt: skip
        migrate(engine, T, url, with_late)
        migrate(engine, T, url, with_late)  # once only
    finally:
        engine.dispose()
    assert made == [3]
    assert 3 in _versions(url)
