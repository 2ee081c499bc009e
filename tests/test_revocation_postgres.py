"""The ledger's revocations and blocks on PostgreSQL: the same operations as on SQLite
(tests/test_revocation.py), seen by a second reader, as another CA replica would."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from cryptography import x509

from meshtrust.ca import SqlLedger
from meshtrust.errors import InvalidInput
from tests.postgres import PostgresServer, postgres_server
from tests.test_revocation import NOW, S1, S2, S3, WEB, record

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def test_revoke_block_unblock_on_postgresql(pg: PostgresServer) -> None:
    url = pg.create_database(f"r{uuid.uuid4().hex[:12]}")
    writer, reader = SqlLedger(url), SqlLedger(url)
    try:
        writer.record_batch([record(S1), record(S2), record(S3, "spiffe://example.org/x")])
        writer.revoke_serial(S1, x509.ReasonFlags.key_compromise, "ops", "leaked", NOW)
        with pytest.raises(InvalidInput, match="revoked already"):
            writer.revoke_serial(S1, x509.ReasonFlags.key_compromise, "ops", "", NOW)
        first = reader.revocation_state(NOW)
        assert set(first.revoked) == {S1} and reader.revocation_revision() == first.revision
        _, revoked = writer.revoke_identity(WEB, x509.ReasonFlags.unspecified, "ops", "", NOW)
        assert [r.serial for r in revoked] == [S2]
        second = reader.revocation_state(NOW)
        assert set(second.revoked) == {S1, S2} and second.block(WEB) is not None
        writer.unblock(WEB, "ops", "", NOW)
        third = reader.revocation_state(NOW)
        assert third.block(WEB) is None and third.revision > second.revision > first.revision
    finally:
        writer.close()
        reader.close()
