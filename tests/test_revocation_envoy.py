"""Revocation end to end with the real Envoy: after ``revoke`` (written to the ledger), the
CA's CRL reaches the agent, the agent's SDS ``ROOTCA`` carries it, and Envoy refuses new
handshakes presenting the revoked certificate while a good one still gets through."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509

from meshtrust.clock import SystemClock
from meshtrust.pki import format_serial
from tests.revocation_rig import Rig, revocation_rig
from tests.waiting import async_until

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    # Short: the SDS socket lives here and Unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="revoke-"))
    try:
        async with revocation_rig(workdir, poll=0.2) as rig:
            yield rig
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.asyncio
async def test_envoy_refuses_a_revoked_client_certificate_and_keeps_taking_good_ones(
    rig: Rig,
) -> None:
    bad, good = await rig.client("web"), await rig.client("api")
    assert await asyncio.to_thread(rig.accepted, bad)
    assert await asyncio.to_thread(rig.accepted, good)
    held = await asyncio.to_thread(rig.open, bad)  # a connection made before the revocation

    rig.ledger.revoke_serial(
        format_serial(bad.serial), x509.ReasonFlags.key_compromise, "test", "", SystemClock().now()
    )

    async def refused() -> bool:
        return not await asyncio.to_thread(rig.accepted, bad)

    deadline = asyncio.get_running_loop().time() + 30
    while not await refused():
        assert asyncio.get_running_loop().time() < deadline, "revoked cert still accepted"
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(rig.accepted, good)
    crl = rig.agent.cache.crl
    assert crl is not None and crl.get_revoked_certificate_by_serial_number(bad.serial)

    # Envoy checks at the handshake: a connection made before the revocation is not cut by
    # Envoy itself (this static listener never drains; the agent's sidecar drains it:
    # tests/test_revocation_drain.py).
    def still_served() -> int:
        held.request("GET", "/")
        response = held.getresponse()
        response.read()
        return response.status

    try:
        assert await asyncio.to_thread(still_served) == 200
    finally:
        held.close()


@pytest.mark.asyncio
async def test_the_workloads_own_revoked_certificate_is_replaced_at_once(rig: Rig) -> None:
    first = rig.agent.cache.current
    assert first is not None
    rig.ledger.revoke_serial(
        first.serial_hex, x509.ReasonFlags.superseded, "test", "", SystemClock().now()
    )
    await async_until(
        lambda: (
            rig.agent.cache.current is not None
            and rig.agent.cache.current.serial_hex != first.serial_hex
        ),
        what="the agent renewed its revoked certificate with its token",
    )
    renewed = rig.agent.cache.current
    assert renewed is not None and not renewed.revoked
    assert renewed.revoked is False and first.serial_hex in {
        format_serial(r.serial_number) for r in renewed.crl or ()
    }
