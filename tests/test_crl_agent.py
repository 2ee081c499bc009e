"""The agent following the CA's CRL: verified before use, handed to SDS ``ROOTCA``, the
Workload API and ``crl.pem``, and its own serial in it means renewing at once with the token."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.agent import AgentConfig
from meshtrust.agent.agent import Agent
from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.crl import MAX_CRL_AGE, CrlFollower, stale_at, verify_crl
from meshtrust.agent.issuance import TokenFile
from meshtrust.agent.sds import secret_resource
from meshtrust.agent.workload_api import x509_svid_response
from meshtrust.ca.crl import CRL_VALIDITY, build_crl
from meshtrust.ca.revocation import Revocation, RevocationState
from meshtrust.clock import FakeClock
from meshtrust.errors import InvalidCertificate, SvidVerificationError
from meshtrust.pki import TrustBundle, format_serial
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests import badcerts
from tests.badcerts import CaFixture
from tests.fake_ca import signed_chain
from tests.waiting import async_until

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "default", "web")
DER = serialization.Encoding.DER


def crl_der(ca: CaFixture, revision: int, *serials: int, now: dt.datetime = T0) -> bytes:
    revoked = {
        format_serial(s): Revocation(
            format_serial(s), str(WEB), x509.ReasonFlags.key_compromise, now
        )
        for s in serials
    }
    return build_crl(ca.signer, RevocationState(revision, revoked), now).public_bytes(DER)


@pytest.fixture(scope="module")
def ca() -> CaFixture:
    return badcerts.make_ca(TD, now=T0 - dt.timedelta(days=1))


def test_verify_crl_accepts_the_issuing_cas_and_refuses_the_rest(ca: CaFixture) -> None:
    issuers = [ca.signer.cert, ca.root]
    good = verify_crl(crl_der(ca, 2), issuers, None, T0)
    assert good.issuer == ca.signer.cert.subject
    # Same names, another key: a forged CRL.
    forged = badcerts.make_ca(TD, now=T0 - dt.timedelta(days=1))
    with pytest.raises(SvidVerificationError, match="not signed by a CA this agent trusts"):
        verify_crl(crl_der(forged, 3), issuers, None, T0)
    with pytest.raises(SvidVerificationError, match="past its nextUpdate"):
        verify_crl(crl_der(ca, 3), issuers, None, T0 + dt.timedelta(days=2))
    with pytest.raises(SvidVerificationError, match="older than the one held"):
        verify_crl(crl_der(ca, 1), issuers, good, T0)
    with pytest.raises(InvalidCertificate, match="cannot be parsed"):
        verify_crl(b"\x30\x03garbage", issuers, None, T0)


@dataclass
class RecordingCa:
    """Signs every CSR at the fake clock's time; remembers how each caller authenticated."""

    clock: FakeClock
    ca: CaFixture
    calls: list[tuple[bool, bool]] = field(default_factory=list)  # (token, client cert)

    async def sign(
        self,
        csr_pem: str,
        *,
        ttl_seconds: int,
        token: str | None,
        client_cert: tuple[bytes, bytes] | None,
    ) -> list[str]:
        self.calls.append((token is not None, client_cert is not None))
        return signed_chain(self.ca, csr_pem, WEB, self.clock.now(), ttl_seconds)


class QueueCrlSource:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.helds: list[str] = []

    async def watch(self, held: str) -> AsyncIterator[bytes]:
        self.helds.append(held)
        while True:
            yield await self.queue.get()


@pytest.mark.asyncio
async def test_the_crl_reaches_every_output_and_our_own_serial_renews_at_once(
    ca: CaFixture, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("a-token")
    (tmp_path / "root.pem").write_bytes(badcerts.cert_pem(ca.root))
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
    source, crls = RecordingCa(clock, ca), QueueCrlSource()
    agent = Agent(
        config,
        identity=WEB,
        anchors=TrustBundle(TD, (ca.root,)),
        source=source,
        token=TokenFile(token),
        clock=clock,
        rng=random.Random(1),
        crl_source=crls,
    )
    await agent.start()
    try:
        first = await agent.cache.wait_newer(0)
        empty = crl_der(ca, 1)
        await crls.queue.put(empty)
        await async_until(lambda: agent.cache.crl is not None, what="first CRL held")
        secret = agent.cache.current
        assert secret is not None and secret.serial_hex == first.serial_hex
        root_ca = secret_resource("ROOTCA", secret)
        context = root_ca.validation_context
        assert context.crl.inline_bytes == x509.load_der_x509_crl(empty).public_bytes(
            serialization.Encoding.PEM
        )
        assert context.only_verify_leaf_cert_crl is True
        response = x509_svid_response(secret)
        assert response is not None and list(response.crl) == [empty]
        pem = tmp_path / "certs" / "crl.pem"
        await async_until(
            lambda: pem.exists() and pem.read_bytes().startswith(b"-----BEGIN X509 CRL"),
            what="crl.pem written",
        )
        assert agent.status_snapshot()["crl"]["own_certificate_revoked"] is False  # type: ignore[index]

        # A CRL signed by someone else is refused; the good one stays.
        forged = badcerts.make_ca(TD, now=T0 - dt.timedelta(days=1))
        await crls.queue.put(crl_der(forged, 9, first.leaf.serial_number))
        await async_until(lambda: agent.crl is not None and agent.crl.refused == 1)
        assert agent.cache.current is not None
        assert agent.cache.current.serial_hex == first.serial_hex

        # Our own serial: a new certificate at once, asked for with the token only.
        await crls.queue.put(crl_der(ca, 2, first.leaf.serial_number))
        await async_until(
            lambda: (
                agent.cache.current is not None
                and agent.cache.current.serial_hex != first.serial_hex
            ),
            what="renewed after revocation",
        )
        assert source.calls[0] == (True, False) and source.calls[-1] == (True, False)
        renewed = agent.cache.current
        assert renewed is not None and not renewed.revoked
        assert renewed.crl is not None  # a rotation keeps the CRL
        assert renewed.not_after > clock.now()
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_a_crl_not_renewed_for_three_hours_is_stale_long_before_its_next_update(
    ca: CaFixture,
) -> None:
    """The CA's CRLs run as long as its longest certificate (so Envoy never holds an expired
    one); what says the CA stopped re-signing (hourly) is the CRL's age."""
    clock = FakeClock(T0)
    cache = SecretCache()
    leaf = badcerts.svid_leaf(ca.signer, WEB, now=T0)
    await cache.publish(WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (ca.root,), T0))
    follower = CrlFollower(
        QueueCrlSource(), cache, TrustBundle(TD, (ca.root,)), clock, lambda: None
    )
    der = build_crl(ca.signer, RevocationState(1, {}), T0, dt.timedelta(days=90)).public_bytes(DER)
    assert await follower.offer(der)
    held = cache.crl
    assert held is not None and stale_at(held) == T0 + MAX_CRL_AGE
    task = asyncio.create_task(follower.watch_staleness())
    try:
        await clock.wait_for_sleepers(1)
        await clock.advance(MAX_CRL_AGE.total_seconds() - 60)
        assert not follower.stale(clock.now()) and follower.stale_alerts == 0
        await clock.advance(120)
        await async_until(lambda: follower.stale_alerts == 1, what="an old CRL alerted")
        assert follower.stale(clock.now()) and cache.crl is held  # kept, revocations and all
    finally:
        task.cancel()


@pytest.mark.asyncio
async def test_a_crl_past_next_update_is_kept_and_alerted_once(ca: CaFixture) -> None:
    clock = FakeClock(T0)
    cache = SecretCache()
    leaf = badcerts.svid_leaf(ca.signer, WEB, now=T0)
    await cache.publish(WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (ca.root,), T0))
    renewals: list[int] = []
    follower = CrlFollower(
        QueueCrlSource(), cache, TrustBundle(TD, (ca.root,)), clock, lambda: renewals.append(1)
    )
    assert await follower.offer(crl_der(ca, 1))
    task = asyncio.create_task(follower.watch_staleness())
    try:
        await clock.wait_for_sleepers(1)
        assert not follower.stale(clock.now())
        await clock.advance(CRL_VALIDITY.total_seconds() + 120)
        await async_until(lambda: follower.stale_alerts == 1, what="stale CRL alerted")
        assert follower.stale(clock.now()) and cache.crl is not None  # kept
        await clock.advance(3600)
        assert follower.stale_alerts == 1  # once per CRL
        assert renewals == []
    finally:
        task.cancel()
