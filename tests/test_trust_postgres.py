"""The trust bundle on a PostgreSQL ledger shared by two replicas: both initialise it to one
version 1, a change by one is read by the other, a racing change is refused, and the served
versions are upserted (PostgreSQL's ``ON CONFLICT``)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest

from meshtrust.ca import SqlLedger
from meshtrust.ca.trust import ServedReport, TrustLedger
from meshtrust.errors import LedgerError
from meshtrust.spiffe import TrustDomain
from tests import badcerts
from tests.postgres import PostgresServer, postgres_server

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
TD = TrustDomain("example.org")
WEB = "spiffe://example.org/ns/shop/sa/web"


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def test_two_replicas_share_one_versioned_bundle(pg: PostgresServer) -> None:
    url = pg.create_database(f"t{uuid.uuid4().hex[:12]}")
    a, b = badcerts.make_ca(TD).root, badcerts.make_ca(TD).root
    one, two = SqlLedger(url), SqlLedger(url)
    try:
        first, second = TrustLedger(one.engine), TrustLedger(two.engine)
        assert first.initialise((a,), NOW).version == 1
        assert second.initialise((b,), NOW).roots == (a,)  # the first replica's
        first.set_roots((a, b), NOW, actor="ops", why="add B", expect_version=1)
        assert second.current_version() == 2
        with pytest.raises(LedgerError, match="changed meanwhile"):
            second.set_roots((b,), NOW, actor="ops", why="", expect_version=1)
        first.record_served([ServedReport(WEB, 1, "01", NOW)])
        later = NOW + dt.timedelta(seconds=3)
        second.record_served([ServedReport(WEB, 2, "02", later)])
        assert first.served() == [ServedReport(WEB, 2, "02", later)]
    finally:
        one.close()
        two.close()
