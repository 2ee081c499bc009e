"""Revocation reaching pooled connections, without processes: the mTLS chain's revocation
epoch (what makes Envoy drain), SDS telling when Envoy holds a CRL, and the sidecar deciding
when to drain (a CRL revoking something new) on a fake Envoy. The real Envoy is in
tests/test_revocation_drain.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.sds import SdsRequest, SdsStream
from meshtrust.agent.sidecar import EnvoySidecar, SidecarSettings, revoked_serials
from meshtrust.ca.crl import build_crl
from meshtrust.ca.revocation import Revocation, RevocationState
from meshtrust.clock import FakeClock
from meshtrust.envoy.sidecar import SidecarConfig, inbound_listeners
from meshtrust.pki import format_serial
from meshtrust.policy import InboundPolicy, MtlsMode, PeerAuthentication, PolicySet
from meshtrust.spiffe import SpiffeId
from tests.badcerts import NOW, CaFixture, make_ca, svid_leaf
from tests.fake_envoy import FakeEnvoy, FakeLauncher, FakePolicies
from tests.waiting import async_until

WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
CONFIG = SidecarConfig(name="web", app_port=8080, inbound_port=15006)
STRICT = PolicySet(
    peer_authentications=(PeerAuthentication("default", "default", mode=MtlsMode.STRICT),)
)


@pytest.fixture(scope="module")
def ca() -> CaFixture:
    return make_ca("example.org")


def crl(ca: CaFixture, revision: int, *serials: int) -> x509.CertificateRevocationList:
    revoked = {
        format_serial(s): Revocation(format_serial(s), str(WEB), x509.ReasonFlags.superseded, NOW)
        for s in serials
    }
    return build_crl(ca.signer, RevocationState(revision, revoked), NOW)


def secret(ca: CaFixture) -> WorkloadSecret:
    leaf = svid_leaf(ca.signer, WEB)
    return WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (ca.root,), NOW)


def _chains(listeners: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in listeners[0]["filter_chains"]}


def test_a_revocation_epoch_changes_only_the_mtls_chain() -> None:
    """What Envoy diffs: the listener-level fields and the plain-text chain stay equal, so a
    new epoch is a filter-chain-only update draining the mTLS chain alone."""
    policy = InboundPolicy(MtlsMode.PERMISSIVE)
    before = inbound_listeners(CONFIG, policy)
    after = inbound_listeners(CONFIG, policy, revocation_epoch=3)
    assert inbound_listeners(CONFIG, policy, revocation_epoch=0) == before
    strip = {k: v for k, v in after[0].items() if k != "filter_chains"}
    assert strip == {k: v for k, v in before[0].items() if k != "filter_chains"}
    old, new = _chains(before), _chains(after)
    assert new["plaintext"] == old["plaintext"]
    assert new["tls"]["metadata"] == {"filter_metadata": {"meshtrust": {"revocation_epoch": 3}}}
    assert {k: v for k, v in new["tls"].items() if k != "metadata"} == old["tls"]
    # DISABLE has no mTLS chain: nothing to drain, nothing changes.
    disabled = InboundPolicy(MtlsMode.DISABLE)
    assert inbound_listeners(CONFIG, disabled, revocation_epoch=3) == inbound_listeners(
        CONFIG, disabled
    )


def test_sds_stream_tells_when_envoy_holds_a_crl(ca: CaFixture) -> None:
    base = secret(ca)
    first = dataclasses.replace(base, generation=1, crl=crl(ca, 1))
    revoked = dataclasses.replace(base, generation=2, crl=crl(ca, 2, 77))
    stream = SdsStream()
    assert stream.acknowledged("ROOTCA", revoked)  # a stream without ROOTCA holds it anyway

    push = stream.on_request(SdsRequest(("ROOTCA",), "", ""), first)
    assert push is not None and not stream.acknowledged("ROOTCA", first)  # sent, not ACKed
    stream.on_request(SdsRequest(("ROOTCA",), push.nonce, push.version_info), first)
    assert stream.acknowledged("ROOTCA", first)
    assert not stream.acknowledged("ROOTCA", revoked)

    push = stream.on_secret(revoked)
    assert push is not None and not stream.acknowledged("ROOTCA", revoked)
    stream.on_request(SdsRequest(("ROOTCA",), push.nonce, push.version_info), revoked)
    assert stream.acknowledged("ROOTCA", revoked)
    # A rotation that keeps roots and CRL is not pushed on ROOTCA: still held.
    rotated = dataclasses.replace(secret(ca), generation=3, crl=revoked.crl)
    assert stream.on_secret(rotated) is None and stream.acknowledged("ROOTCA", rotated)

    # A NACK: Envoy does not run it.
    newer = dataclasses.replace(base, generation=4, crl=crl(ca, 3, 77, 78))
    push = stream.on_secret(newer)
    assert push is not None
    stream.on_request(SdsRequest(("ROOTCA",), push.nonce, "3", error_detail="bad CRL"), newer)
    assert not stream.acknowledged("ROOTCA", newer)


class Acks:
    """SDS acknowledgements as a test decides them."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.asked: list[int] = []

    async def wait_acknowledged(self, name: str, secret: WorkloadSecret, timeout: float) -> bool:
        assert name == "ROOTCA"
        self.asked.append(secret.generation)
        return self.answer


def _lds(sidecar: EnvoySidecar) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(sidecar.lds_path.read_text())
    return data


def _epoch(sidecar: EnvoySidecar) -> int | None:
    tls = _chains(_lds(sidecar)["resources"])["tls"]
    meta = tls.get("metadata", {}).get("filter_metadata", {}).get("meshtrust", {})
    epoch: int | None = meta.get("revocation_epoch")
    return epoch


@pytest.mark.asyncio
async def test_the_sidecar_drains_when_a_crl_revokes_something_new(
    tmp_path: Path, ca: CaFixture
) -> None:
    clock = FakeClock(NOW)
    envoy = FakeEnvoy(clock)
    sidecar = EnvoySidecar(
        SidecarSettings(config=CONFIG, workdir=tmp_path),
        WEB,
        tmp_path / "sds.sock",
        launcher=FakeLauncher(envoy),
        policies=FakePolicies(STRICT),
        clock=clock,
    )
    cache, acks = SecretCache(), Acks()
    await cache.publish_crl(crl(ca, 1))
    await cache.publish(secret(ca))
    await sidecar.start()
    assert _lds(sidecar)["version_info"] == "1" and _epoch(sidecar) is None
    task = asyncio.create_task(sidecar.follow_revocations(cache, acks))
    try:
        # The first CRL revoked nothing (no drain); this one revokes a serial.
        await cache.publish_crl(crl(ca, 2, 11))
        await async_until(lambda: sidecar.revocation_drains == 1, what="a drain")
        assert acks.asked == [cache.generation]  # waited for Envoy to hold that CRL
        assert _lds(sidecar)["version_info"] == "1.r1" and _epoch(sidecar) == 1

        # Re-signed with the same serials, or one gone (it expired): nothing new, no drain.
        await cache.publish_crl(crl(ca, 3, 11))
        await cache.publish_crl(crl(ca, 4))
        await cache.publish(secret(ca))  # a rotation
        await cache.publish_crl(crl(ca, 5, 12))
        await async_until(lambda: sidecar.revocation_drains == 2, what="a second drain")
        assert _epoch(sidecar) == 2 and len(acks.asked) == 2

        # Envoy never acknowledging (stuck SDS) does not stop the drain.
        acks.answer = False
        await cache.publish_crl(crl(ca, 6, 12, 13))
        await async_until(lambda: sidecar.revocation_drains == 3, what="a drain without ACK")

        # A policy reload keeps the epoch (no second drain of the same chain).
        assert sidecar.reload_policy()
        assert _lds(sidecar)["version_info"] == "2.r3" and _epoch(sidecar) == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert revoked_serials(None) == frozenset()
    assert revoked_serials(crl(ca, 7, 5, 6)) == {5, 6}


def test_a_drain_before_the_sidecar_started_comes_with_its_first_listener(
    tmp_path: Path,
) -> None:
    clock = FakeClock(NOW)
    sidecar = EnvoySidecar(
        SidecarSettings(config=CONFIG, workdir=tmp_path),
        WEB,
        tmp_path / "sds.sock",
        launcher=FakeLauncher(FakeEnvoy(clock)),
        policies=FakePolicies(STRICT),
        clock=clock,
    )
    assert not sidecar.drain_for_revocation(1)
    assert sidecar.revocation_drains == 0 and sidecar.revocation_epoch == 1
    assert sidecar.reload_policy()
    assert _lds(sidecar)["version_info"] == "1.r1" and _epoch(sidecar) == 1
