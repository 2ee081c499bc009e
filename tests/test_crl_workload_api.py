"""The CRL over the Workload API: ``X509SVIDResponse.crl`` and ``X509BundlesResponse.crl``
(DER) read by a raw client with the SPIFFE proto, the bundle stream sends again when only
the CRL changed, and py-spiffe keeps working with the field filled."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest
import pytest_asyncio
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2 as client_pb2  # the client's own messages

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.workload_api import WorkloadApiServer
from meshtrust.ca.crl import build_crl
from meshtrust.ca.revocation import Revocation, RevocationState
from meshtrust.clock import SystemClock
from meshtrust.pki import format_serial
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.badcerts import make_ca, svid_leaf

TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "default", "web")
HEADER = (("workload.spiffe.io", "true"),)
CA = make_ca(TD, now=SystemClock().now())


def secret() -> WorkloadSecret:
    now = SystemClock().now()
    leaf = svid_leaf(CA.signer, WEB, now=now)
    return WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (CA.root,), now)


def crl(revision: int, *serials: int) -> x509.CertificateRevocationList:
    now = SystemClock().now()
    revoked = {
        format_serial(s): Revocation(format_serial(s), str(WEB), x509.ReasonFlags.superseded, now)
        for s in serials
    }
    return build_crl(CA.signer, RevocationState(revision, revoked), now)


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[SecretCache, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="wl-crl-"))
    cache = SecretCache()
    server = WorkloadApiServer(cache, directory / "wl.sock")
    await server.start()
    try:
        yield cache, directory / "wl.sock"
    finally:
        await server.stop(grace=0.5)


@pytest.mark.asyncio
async def test_svid_and_bundle_responses_carry_the_crl(
    served: tuple[SecretCache, Path],
) -> None:
    cache, path = served
    await cache.publish(secret())
    first = crl(1)
    await cache.publish_crl(first)
    der = first.public_bytes(serialization.Encoding.DER)
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        svids = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=client_pb2.X509SVIDRequest.SerializeToString,
            response_deserializer=client_pb2.X509SVIDResponse.FromString,
        )(client_pb2.X509SVIDRequest(), metadata=HEADER, timeout=15)
        assert list((await svids.read()).crl) == [der]
        svids.cancel()

        bundles = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509Bundles",
            request_serializer=client_pb2.X509BundlesRequest.SerializeToString,
            response_deserializer=client_pb2.X509BundlesResponse.FromString,
        )(client_pb2.X509BundlesRequest(), metadata=HEADER, timeout=15)
        assert list((await bundles.read()).crl) == [der]
        # Same roots, a new CRL: the bundle stream tells.
        second = crl(2, 0x1234)
        await cache.publish_crl(second)
        again = await bundles.read()
        assert list(again.crl) == [second.public_bytes(serialization.Encoding.DER)]
        bundles.cancel()


@pytest.mark.asyncio
async def test_py_spiffe_still_reads_svids_and_bundles_with_a_crl(
    served: tuple[SecretCache, Path],
) -> None:
    cache, path = served
    held = await cache.publish(secret())
    await cache.publish_crl(crl(1, 0x99))
    client = spiffe.WorkloadApiClient(f"unix://{path}")
    try:
        svid = await asyncio.to_thread(client.fetch_x509_svid, 15)
        assert svid.leaf.serial_number == held.leaf.serial_number
        bundles = await asyncio.to_thread(client.fetch_x509_bundles, 15)
        assert bundles.get_bundle_for_trust_domain(spiffe.TrustDomain("example.org"))
    finally:
        client.close()
