"""The trust stream on a real CA (in process: TLS, grpclib, SQLite ledger) with a real agent
following it: only a workload certificate opens the stream; the agent reports what it serves
and the CA records it; a bundle change reaches the agent and is recorded as served; a bundle
row in the ledger that does not parse changes nothing."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from meshtrust.ca.trust import WATCH_TRUST, TrustLedger
from meshtrust.caapi.client import client_ssl_context
from meshtrust.caapi.trust import trust_pb2
from meshtrust.pki import load_certs_pem
from tests import badcerts
from tests.revocation_rig import TD, Client, Rig, revocation_rig
from tests.waiting import async_until

pytestmark = pytest.mark.slow

BACKEND = "spiffe://example.org/ns/default/sa/backend"


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    # Short: the SDS socket lives here and Unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="trust-"))
    try:
        async with revocation_rig(workdir, poll=0.2) as made:
            yield made
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _first_update(rig: Rig, client: Client | None) -> trust_pb2.TrustUpdate:
    host, port = rig.address.rsplit(":", 1)
    cert = None
    if client is not None:
        cert = (
            (client.directory / "chain.pem").read_bytes(),
            (client.directory / "key.pem").read_bytes(),
        )
    channel = Channel(
        host, int(port), ssl=client_ssl_context(rig.root_pem, cert), codec=ProtoCodec()
    )
    try:
        async with channel.request(
            WATCH_TRUST, Cardinality.STREAM_STREAM, trust_pb2.TrustReport, trust_pb2.TrustUpdate
        ) as stream:
            await stream.send_message(trust_pb2.TrustReport())
            update = await stream.recv_message()
            assert update is not None
            await stream.cancel()
            return update
    finally:
        channel.close()


def _served(rig: Rig) -> dict[str, int]:
    return {r.spiffe_id: r.version for r in TrustLedger(rig.ledger.engine).served()}


@pytest.mark.asyncio
async def test_only_a_workload_certificate_opens_the_stream_and_reports_are_recorded(
    rig: Rig,
) -> None:
    with pytest.raises(GRPCError) as refused:
        await _first_update(rig, None)
    assert refused.value.status is Status.UNAUTHENTICATED
    assert "workload's certificate" in str(refused.value.message)

    web = await rig.client("web")
    update = await _first_update(rig, web)
    assert update.bundle_version == 1
    assert [bytes(r) for r in update.roots] == [
        c.public_bytes(serialization.Encoding.DER) for c in load_certs_pem(rig.root_pem)
    ]
    assert update.crl and dict(update.federated) == {}  # no federated bundle stored
    await async_until(lambda: _served(rig).get(str(web.spiffe_id)) == 0, what="web's report")

    now = dt.datetime.now(dt.UTC)
    rig.ledger.revoke_serial(
        format(web.serial, "032x"), x509.ReasonFlags.key_compromise, "t", "", now
    )
    await asyncio.sleep(0.5)  # the CA's revocation poll (0.2 s)
    with pytest.raises(GRPCError) as revoked:
        await _first_update(rig, web)
    assert revoked.value.status is Status.UNAUTHENTICATED
    assert "was revoked" in str(revoked.value.message)


@pytest.mark.asyncio
async def test_a_bundle_change_reaches_the_agent_and_a_garbage_row_changes_nothing(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "meshtrust.ca")
    await async_until(lambda: _served(rig).get(BACKEND) == 1, what="the agent serves version 1")
    trust = TrustLedger(rig.ledger.engine)
    root_b = badcerts.make_ca(TD).root
    current = trust.current()
    assert current is not None
    trust.set_roots(
        (*current.roots, root_b), dt.datetime.now(dt.UTC), actor="t", why="", expect_version=1
    )
    await async_until(lambda: _served(rig).get(BACKEND) == 2, timeout=30, what="version 2 served")
    assert rig.agent.cache.bundle is not None and rig.agent.cache.bundle[1][-1] == root_b

    with rig.ledger.engine.begin() as conn:  # not something the CA or the CLI would write
        conn.execute(
            sa.text(
                "INSERT INTO trust_bundles (version, roots_pem, changed_at, actor, why) "
                "VALUES (3, 'not PEM', :at, 'someone', '')"
            ),
            {"at": dt.datetime.now(dt.UTC)},
        )
    await async_until(
        lambda: "trust bundle version 3 in the ledger" in caplog.text,
        what="the CA refused the row (logged) and kept version 2",
    )
    assert rig.agent.cache.bundle is not None and rig.agent.cache.bundle[0] == 2
    assert _served(rig)[BACKEND] == 2
