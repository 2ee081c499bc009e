"""The mesh's trust bundle: verified by the agent before use (pure), changed in the ledger
(pure checks, then one versioned row), the migrations applied by version, and an agent
following a bundle change into every output, re-issuing at once and reporting what it serves."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.agent import AgentConfig
from meshtrust.agent.agent import Agent
from meshtrust.agent.issuance import TokenFile
from meshtrust.agent.sds import secret_resource
from meshtrust.agent.trust import TrustUpdate, verify_bundle
from meshtrust.agent.workload_api import x509_bundles_response
from meshtrust.ca.ledger import SqlLedger
from meshtrust.ca.schema import MIGRATIONS, Migration, migrate
from meshtrust.ca.trust import (
    ServedReport,
    TrustLedger,
    add_root,
    behind,
    chains_to,
    fingerprint,
    remove_root,
)
from meshtrust.clock import FakeClock
from meshtrust.errors import InvalidInput, LedgerError, SvidVerificationError
from meshtrust.pki import TrustBundle, load_certs_pem
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests import badcerts
from tests.badcerts import CaFixture
from tests.test_crl_agent import RecordingCa
from tests.waiting import async_until

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "default", "web")
DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def ca_a() -> CaFixture:
    return badcerts.make_ca(TD, now=T0 - dt.timedelta(days=1))


@pytest.fixture(scope="module")
def ca_b() -> CaFixture:
    return badcerts.make_ca(TD, now=T0 - dt.timedelta(days=1))


def der(*certs: x509.Certificate) -> tuple[bytes, ...]:
    return tuple(c.public_bytes(DER) for c in certs)


# --- the agent's verification (pure) -------------------------------------------------------


def test_verify_bundle_accepts_new_roots_and_refuses_the_rest(
    ca_a: CaFixture, ca_b: CaFixture
) -> None:
    a, b = ca_a.root, ca_b.root
    assert verify_bundle(1, der(a), None, T0) == (a,)
    assert verify_bundle(2, der(a, b), (1, (a,)), T0) == (a, b)
    assert verify_bundle(2, der(b, a), (2, (a, b)), T0) == (b, a)  # same set, same version
    leaf = badcerts.svid_leaf(ca_a.signer, WEB, now=T0).chain[0]
    expired = badcerts.make_ca(TD, now=T0 - dt.timedelta(days=400)).root
    refused = [
        (0, der(a), None, "is not a version"),
        (3, (), None, "has no roots"),
        (3, (b"\x30\x03garbage",), None, "root 1 is not a DER certificate"),
        (3, (*der(a), b"junk"), None, "root 2 is not a DER certificate"),
        (3, der(leaf), None, "is not a CA certificate"),
        (3, der(expired), None, "expired at"),
        (3, der(a, a), None, "root 2 is repeated"),
        (1, der(a, b), (2, (a, b)), "older than the one held"),
        (2, der(b), (2, (a, b)), "other roots than the version 2 held"),
    ]
    for version, roots, held, why in refused:
        with pytest.raises(SvidVerificationError, match=why):
            verify_bundle(version, roots, held, T0)


# --- changing the bundle (pure checks) ------------------------------------------------------


def test_add_root_and_remove_root_check_the_change(ca_a: CaFixture, ca_b: CaFixture) -> None:
    a, b = ca_a.root, ca_b.root
    assert add_root((a,), b) == (a, b)
    with pytest.raises(InvalidInput, match="in the bundle already"):
        add_root((a, b), b)
    leaf = badcerts.svid_leaf(ca_a.signer, WEB, now=T0).chain[0]
    with pytest.raises(InvalidInput, match="is not a CA certificate"):
        add_root((a,), leaf)

    signing_under_a = ca_a.intermediates
    assert chains_to(signing_under_a, a) and not chains_to(signing_under_a, b)
    roots, removed = remove_root((a, b), fingerprint(b)[:12], signing_under_a)
    assert roots == (a,) and removed == b
    roots, removed = remove_root((a, b), fingerprint(a).upper(), ca_b.intermediates)
    assert roots == (b,) and removed == a  # any case, the whole fingerprint
    with pytest.raises(InvalidInput, match="active signing CA chains to it"):
        remove_root((a, b), fingerprint(a), signing_under_a)
    with pytest.raises(InvalidInput, match="the only root"):
        remove_root((b,), fingerprint(b), signing_under_a)
    with pytest.raises(InvalidInput, match="no root in the bundle"):
        remove_root((a, b), "00" * 8, signing_under_a)
    with pytest.raises(InvalidInput, match="is not a certificate fingerprint"):
        remove_root((a, b), "xyz", signing_under_a)


def test_behind_lists_older_versions_only() -> None:
    served = [
        ServedReport("spiffe://example.org/ns/default/sa/c", 1, "0c", T0),
        ServedReport("spiffe://example.org/ns/default/sa/a", 2, "0a", T0),
        ServedReport("spiffe://example.org/ns/default/sa/b", 1, "0b", T0),
    ]
    assert [r.spiffe_id.rsplit("/", 1)[1] for r in behind(2, served)] == ["b", "c"]
    assert behind(1, served) == []


# --- the ledger -----------------------------------------------------------------------------


def test_the_bundle_is_versioned_in_the_ledger_and_survives_reopening(
    ca_a: CaFixture, ca_b: CaFixture, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    sql = SqlLedger(url)
    try:
        trust = TrustLedger(sql.engine)
        assert trust.current() is None and trust.current_version() == 0
        first = trust.initialise((ca_a.root,), T0)
        assert (first.version, first.roots) == (1, (ca_a.root,))
        assert trust.initialise((ca_b.root,), T0).roots == (ca_a.root,)  # not twice
        second = trust.set_roots(
            (ca_a.root, ca_b.root), T0, actor="alice", why="add B", expect_version=1
        )
        assert (second.version, second.actor, second.why) == (2, "alice", "add B")
        with pytest.raises(LedgerError, match="changed meanwhile"):
            trust.set_roots((ca_b.root,), T0, actor="bob", why="", expect_version=1)
        with pytest.raises(InvalidInput, match="at least one root"):
            trust.set_roots((), T0, actor="bob", why="", expect_version=2)
        trust.record_served([ServedReport(str(WEB), 1, "01", T0)])
        trust.record_served([ServedReport(str(WEB), 2, "02", T0 + dt.timedelta(seconds=5))])
        assert trust.served() == [ServedReport(str(WEB), 2, "02", T0 + dt.timedelta(seconds=5))]
        with sql.engine.connect() as conn:
            details = conn.execute(
                sa.text("SELECT detail FROM audit WHERE action = 'trust-bundle'")
            ).scalars()
            assert [d.split(":")[0] for d in details] == ["version 1", "version 2"]
    finally:
        sql.close()
    sql = SqlLedger(url)  # a restarted CA reads the same version
    try:
        again = TrustLedger(sql.engine)
        assert again.initialise((ca_b.root,), T0).version == 2
        assert again.current() is not None and again.current().roots == (ca_a.root, ca_b.root)  # type: ignore[union-attr]
    finally:
        sql.close()


def test_migrations_are_applied_by_version_not_by_the_highest(tmp_path: Path) -> None:
    """A ledger migrated to 4 by a release without 3 (developed side by side) gets 3 later."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    without_3 = tuple(m for m in MIGRATIONS if m.version != 3)
    migrate(engine, T0, "test", without_3)
    made: list[int] = []
    three = Migration(3, "a table of its own", lambda conn: made.append(3))
    with_3 = tuple(sorted((*without_3, three), key=lambda m: m.version))
    assert migrate(engine, T0, "test", with_3) == max(m.version for m in without_3)
    assert made == [3]
    with engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version FROM meshtrust_schema")).scalars()
        assert sorted(versions) == sorted(m.version for m in with_3)
    migrate(engine, T0, "test", with_3)
    assert made == [3]  # once
    with pytest.raises(LedgerError, match=r"migration\(s\) \[3\] that this meshtrust does not"):
        migrate(engine, T0, "test", without_3)  # an older release meets a ledger with 3
    engine.dispose()


# --- an agent following the stream ----------------------------------------------------------


class QueueTrustSource:
    """The trust stream as a queue; records the reports."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[TrustUpdate] = asyncio.Queue()
        self.reports: list[int] = []

    async def watch(self, serving: int, held_crl: str) -> AsyncIterator[TrustUpdate]:
        self.reports.append(serving)
        while True:
            yield await self.queue.get()

    async def report(self, serving: int) -> None:
        self.reports.append(serving)


def _pem_roots(data: bytes) -> list[x509.Certificate]:
    return load_certs_pem(data)


@pytest.mark.asyncio
async def test_a_new_bundle_reaches_every_output_renews_at_once_and_garbage_is_refused(
    ca_a: CaFixture, ca_b: CaFixture, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("a-token")
    config = AgentConfig(
        ca_root=tmp_path / "root.pem",
        trust_domain=TD,
        namespace="default",
        service_account="web",
        sds_socket=None,
        workload_socket=None,
        output_dir=tmp_path / "certs",
        status_listen=None,
    )
    clock = FakeClock(T0)
    ca_source, stream = RecordingCa(clock, ca_a), QueueTrustSource()
    heard: list[tuple[x509.Certificate, ...]] = []
    agent = Agent(
        config,
        identity=WEB,
        anchors=TrustBundle(TD, (ca_a.root,)),
        source=ca_source,
        token=TokenFile(token),
        clock=clock,
        rng=random.Random(1),
        trust_source=stream,
        on_roots=heard.append,  # build_agent: the CA client's roots for renewals
    )
    a, b = ca_a.root, ca_b.root
    files = tmp_path / "certs"
    await agent.start()
    try:
        first = await agent.cache.wait_newer(0)
        # Version 1 holds the root we started with: served, nothing re-issued.
        await stream.queue.put(TrustUpdate(1, der(a), b""))
        await async_until(lambda: stream.reports == [0, 1], what="version 1 reported")
        assert len(ca_source.calls) == 1

        await stream.queue.put(TrustUpdate(2, der(a, b), b""))
        await async_until(lambda: stream.reports[-1] == 2, what="version 2 reported")
        secret = agent.cache.current
        assert secret is not None and secret.bundle_version == 2
        # Reported only once every output had it: the files are of that generation.
        assert _pem_roots((files / "root-cert.pem").read_bytes()) == [a, b]
        assert _pem_roots((files / "bundle.pem").read_bytes()) == [a, b]
        trusted = secret_resource("ROOTCA", secret).validation_context.trusted_ca.inline_bytes
        assert _pem_roots(trusted) == [a, b]
        response = x509_bundles_response(secret)
        assert response is not None
        assert response.bundles[TD.id_string()] == b"".join(der(a, b))
        # The roots changed: a new certificate at once, and it keeps the new bundle.
        await async_until(
            lambda: (
                agent.cache.current is not None
                and agent.cache.current.serial_hex != first.serial_hex
            ),
            what="re-issued on the root change",
        )
        renewed = agent.cache.current
        assert renewed is not None and renewed.roots == (a, b) and renewed.bundle_version == 2

        # Garbage, an empty bundle and an older version are refused; the last good stays.
        for bad in (
            TrustUpdate(3, (b"\x30\x03garbage",), b""),
            TrustUpdate(3, (), b""),
            TrustUpdate(1, der(a), b""),
        ):
            await stream.queue.put(bad)
        assert agent.trust is not None
        await async_until(lambda: agent.trust is not None and agent.trust.refused == 3)
        assert agent.cache.bundle == (2, (a, b))
        assert stream.reports[-1] == 2
        assert heard == [(a,), (a, b)]  # the accepted bundles only
        status = agent.status_snapshot()["trust_bundle"]
        assert status == {
            "version": 2,
            "roots": 2,
            "serving": 2,
            "refused": 3,
            "last_error": "trust bundle version 1 is older than the one held (2)",
        }
        assert _pem_roots((files / "root-cert.pem").read_bytes()) == [a, b]
    finally:
        await agent.stop()
