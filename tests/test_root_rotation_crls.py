"""One CRL per live issuing CA: the CA signs one with each signing slot's key, the agent
verifies each against issuers that chain to its roots and hands all of them on (SDS ROOTCA
``crl`` as one PEM, Workload API ``crl`` repeated, files), and a wrong-key CRL is refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.agent import AgentConfig
from meshtrust.agent.agent import Agent
from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.crl import CrlFollower, trusted_issuers
from meshtrust.agent.issuance import TokenFile
from meshtrust.agent.sds import secret_resource
from meshtrust.agent.trust import TrustUpdate
from meshtrust.agent.workload_api import x509_svid_response
from meshtrust.ca.crl import CrlPublisher
from meshtrust.ca.revocation import Revocation, RevocationState
from meshtrust.clock import FakeClock
from meshtrust.pki import (
    KeyType,
    Signer,
    TrustBundle,
    format_serial,
    generate_key,
    make_intermediate,
)
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests import badcerts
from tests.badcerts import CaFixture
from tests.test_crl_agent import RecordingCa
from tests.test_trust import QueueTrustSource
from tests.waiting import async_until

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "default", "web")
DER = serialization.Encoding.DER


class _Watch:
    """What CrlPublisher reads of a RevocationWatch."""

    def __init__(self, state: RevocationState) -> None:
        self.state = state

    def subscribe(self) -> object:
        return asyncio.Queue()


@pytest.fixture(scope="module")
def ca() -> CaFixture:
    return badcerts.make_ca(TD, now=T0 - dt.timedelta(days=1))


def _successor(ca: CaFixture) -> Signer:
    key = generate_key(KeyType.EC_P256)
    cert = make_intermediate(key, Signer(ca.root, ca.root_key), TD.name, T0, dt.timedelta(days=30))
    return Signer(cert, key)


@pytest.mark.asyncio
async def test_one_crl_per_issuer_reaches_every_output_and_a_wrong_key_is_refused(
    ca: CaFixture,
) -> None:
    new = _successor(ca)
    leaf = badcerts.svid_leaf(ca.signer, WEB, now=T0)
    state = RevocationState(3, {})
    issuers = [(ca.signer, (ca.signer.cert,)), (new, (new.cert,)), (ca.signer, (ca.signer.cert,))]
    publisher = CrlPublisher(
        ca.signer,
        _Watch(state),  # type: ignore[arg-type]
        FakeClock(T0),
        issuers=lambda: issuers,
    )
    # Same name and key once: one CRL each for the two issuers, each signed by its own key.
    assert len(publisher.ders) == 2 and len(publisher.issuer_ders) == 2
    crls = [x509.load_der_x509_crl(d) for d in publisher.ders]
    assert crls[0].is_signature_valid(ca.signer.cert.public_key())  # type: ignore[arg-type]
    assert crls[1].is_signature_valid(new.cert.public_key())  # type: ignore[arg-type]
    assert publisher.der == publisher.ders[0]

    cache = SecretCache()
    await cache.publish(WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (ca.root,), T0))
    follower = CrlFollower(None, cache, TrustBundle(TD, (ca.root,)), FakeClock(T0), lambda: None)
    # The new issuer is not in our chain: known only from the update's issuer certificates.
    assert await follower.offer(publisher.ders[0], publisher.ders, publisher.issuer_ders)
    assert len(cache.crls) == 2
    secret = cache.current
    assert secret is not None and len(secret.crls) == 2
    pem = secret.crl_pem()
    assert pem is not None and pem.count(b"BEGIN X509 CRL") == 2
    root_ca = secret_resource("ROOTCA", secret)
    assert root_ca.validation_context.crl.inline_bytes == pem
    response = x509_svid_response(secret)
    assert response is not None and list(response.crl) == list(publisher.ders)

    # Without the issuer's certificate (not under our roots), the other CRL is left out.
    refused = follower.refused
    assert await follower.offer(publisher.ders[0], publisher.ders, ())
    assert len(cache.crls) == 1 and follower.refused == refused

    # A CRL in the new issuer's name signed by another key is refused; the active one stays.
    forged = Signer(new.cert, generate_key(KeyType.EC_P256))
    from meshtrust.ca.crl import build_crl

    bad = build_crl(forged, RevocationState(4, {}), T0).public_bytes(DER)
    assert await follower.offer(publisher.ders[0], (bad,), publisher.issuer_ders)
    assert len(cache.crls) == 1 and follower.refused == refused + 1


def test_issuer_certificates_count_only_when_they_chain_to_a_trusted_root(ca: CaFixture) -> None:
    new = _successor(ca)
    other = badcerts.make_ca(TD, now=T0 - dt.timedelta(days=1))
    ders = [new.cert.public_bytes(DER), other.signer.cert.public_bytes(DER), b"junk"]
    assert trusted_issuers(ders, [ca.root]) == [new.cert]
    assert trusted_issuers(ders, [ca.root, other.root]) == [new.cert, other.signer.cert]


@pytest.mark.asyncio
async def test_a_revoked_leaf_is_found_in_its_own_issuers_crl(ca: CaFixture) -> None:
    new = _successor(ca)
    leaf = badcerts.svid_leaf(new, WEB, now=T0)
    serial = format_serial(leaf.chain[0].serial_number)
    state = RevocationState(
        5, {serial: Revocation(serial, str(WEB), x509.ReasonFlags.key_compromise, T0)}
    )
    issuers = [(ca.signer, (ca.signer.cert,)), (new, (new.cert,))]
    publisher = CrlPublisher(
        ca.signer,
        _Watch(state),  # type: ignore[arg-type]
        FakeClock(T0),
        issuers=lambda: issuers,
    )
    cache = SecretCache()
    await cache.publish(WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (ca.root,), T0))
    renewals: list[int] = []
    follower = CrlFollower(
        None, cache, TrustBundle(TD, (ca.root,)), FakeClock(T0), lambda: renewals.append(1)
    )
    assert await follower.offer(publisher.ders[0], publisher.ders, publisher.issuer_ders)
    secret = cache.current
    assert secret is not None and secret.revoked and renewals == [1]


@pytest.mark.asyncio
async def test_the_agent_reissues_until_its_certificate_chains_to_the_new_root(
    ca: CaFixture, tmp_path: Path
) -> None:
    """Root rotation phase 2: the stream's active issuer (first of ``crl_issuers``) chains
    to another root than our certificate: re-issue at once; a renewal answered by a CA
    process still signing under the old root is retried until the certificate moves."""
    from meshtrust.ca.crl import build_crl

    ca_b = badcerts.make_ca(TD, now=T0 - dt.timedelta(days=1))
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
    signer, stream = RecordingCa(clock, ca), QueueTrustSource()
    agent = Agent(
        config,
        identity=WEB,
        anchors=TrustBundle(TD, (ca.root,)),
        source=signer,
        token=TokenFile(token),
        clock=clock,
        rng=random.Random(1),
        trust_source=stream,
    )
    roots = (ca.root.public_bytes(DER), ca_b.root.public_bytes(DER))
    await agent.start()
    try:
        await agent.cache.wait_newer(0)
        await stream.queue.put(TrustUpdate(1, roots, b""))
        await async_until(lambda: stream.reports[-1] == 1, what="A+B served")
        await async_until(lambda: len(signer.calls) == 2, what="re-issued on the root change")
        crl_a = build_crl(ca.signer, RevocationState(1, {}), T0).public_bytes(DER)
        crl_b = build_crl(ca_b.signer, RevocationState(1, {}), T0).public_bytes(DER)
        issuers = (ca_b.signer.cert.public_bytes(DER), ca.signer.cert.public_bytes(DER))
        # The CA now signs under B (its first issuer), but this renewal is answered under A.
        await stream.queue.put(TrustUpdate(2, roots, crl_b, (crl_b, crl_a), issuers))
        await async_until(lambda: len(signer.calls) == 3, what="re-issued for the new root")
        assert len(agent.cache.crls) == 2
        current = agent.cache.current
        assert current is not None and current.chain[1] == ca.signer.cert
        signer.ca = ca_b  # the CA process has followed the slot
        for _ in range(50):
            await clock.advance(0.5)
            current = agent.cache.current
            if current is not None and current.chain[1] == ca_b.signer.cert:
                break
            await asyncio.sleep(0.01)
        assert current is not None and current.chain[1] == ca_b.signer.cert
        calls = len(signer.calls)
        await clock.advance(5)
        await asyncio.sleep(0.05)
        assert len(signer.calls) == calls  # moved: no more re-issues
    finally:
        await agent.stop()
