"""Several CRLs in one PEM on a real Envoy: after the CA switches to a new intermediate with a
new key, Envoy's ``ROOTCA`` holds both issuers' CRLs; leaves of either issuer get through, and
a revoked leaf of the new issuer is refused while the old issuer's good leaf still passes."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509

from meshtrust.ca.cadir import load_ca_dir, load_root_signer
from meshtrust.ca.signing import SlotLedger, switch_to_root
from meshtrust.clock import SystemClock
from meshtrust.pki import format_serial
from tests.revocation_rig import TD, Client, Rig, revocation_rig
from tests.waiting import async_until

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    workdir = Path(tempfile.mkdtemp(prefix="crls-"))  # short: the SDS socket path
    try:
        async with revocation_rig(workdir, poll=0.2, signing=True) as rig:
            yield rig
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.asyncio
async def test_envoy_checks_each_leaf_against_its_own_issuers_crl(rig: Rig) -> None:
    old_client = await rig.client("api")
    now = SystemClock().now()
    material = load_ca_dir(rig.ca_dir, now)
    root = load_root_signer(rig.ca_dir, material.roots)
    assert root is not None
    await switch_to_root(
        SlotLedger(rig.ledger.engine), rig.ca_dir, now, trust_domain=TD.name, root=root
    )
    await async_until(lambda: len(rig.agent.cache.crls) == 2, timeout=30, what="two CRLs held")

    async def new_issuer_client(name: str) -> Client:
        while True:
            client = await rig.client(name)
            chain = x509.load_pem_x509_certificates((client.directory / "chain.pem").read_bytes())
            if chain[1].public_key() != material.signer.cert.public_key():
                return client
            await asyncio.sleep(0.2)  # the CA follows the slot within a second

    new_client = await asyncio.wait_for(new_issuer_client("web"), 30)
    assert await asyncio.to_thread(rig.accepted, new_client)
    assert await asyncio.to_thread(rig.accepted, old_client)

    rig.ledger.revoke_serial(
        format_serial(new_client.serial),
        x509.ReasonFlags.key_compromise,
        "test",
        "",
        SystemClock().now(),
    )

    async def refused() -> bool:
        return not await asyncio.to_thread(rig.accepted, new_client)

    deadline = asyncio.get_running_loop().time() + 30
    while not await refused():
        assert asyncio.get_running_loop().time() < deadline, "revoked leaf still accepted"
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(rig.accepted, old_client)
