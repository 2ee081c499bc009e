"""Revocation reaches pooled connections: the agent's real sidecar (LDS file, the Envoy
options of ``meshtrust agent --sidecar``) drains its inbound mTLS connections when a CRL
revokes something new, once Envoy holds that CRL. A revoked caller's idle kept-alive
connection is closed and its new handshake refused; a caller that is not revoked, calling in
a loop over kept-alive connections the whole time, loses no request (docs/revocation.md)."""

from __future__ import annotations

import asyncio
import http.client
import shutil
import ssl
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509

from meshtrust.clock import SystemClock
from meshtrust.envoy.process import EnvoyChild
from meshtrust.pki import format_serial
from tests.revocation_rig import Client, Rig, closed_by_server, revocation_rig
from tests.waiting import async_until

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    # Short: the SDS socket lives here and Unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="drain-"))
    try:
        async with revocation_rig(workdir, poll=0.2, sidecar=True) as rig:
            yield rig
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class Caller(threading.Thread):
    """Calls the sidecar in a loop over a kept-alive mTLS connection, opening a new one when
    the server says ``connection: close`` (counted in ``closes``); every other outcome is a
    failure (the first one ends the loop with ``until_failure``)."""

    def __init__(self, rig: Rig, client: Client, *, until_failure: bool = False) -> None:
        super().__init__(daemon=True)
        self.context = client.context(rig.root_pem)
        self.port = rig.port
        self.until_failure = until_failure
        self.ok = 0
        self.closes = 0
        self.connections = 0
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        conn: http.client.HTTPSConnection | None = None
        while not self.done.is_set():
            if conn is None:
                conn = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, context=self.context, timeout=10
                )
                self.connections += 1
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = None
                if self.until_failure:
                    break
                continue
            if response.status == 200:
                self.ok += 1
            else:
                self.failures.append(f"HTTP {response.status}")
            if response.will_close:
                self.closes += 1
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


@pytest.mark.asyncio
async def test_a_revocation_cuts_pooled_connections_and_good_callers_lose_nothing(
    rig: Rig,
) -> None:
    sidecar = rig.agent.sidecar
    assert sidecar is not None and sidecar.envoy is not None
    bad, good = await rig.client("web"), await rig.client("api")
    idle = await asyncio.to_thread(rig.open, bad)  # pooled, idle when the revocation comes
    revoked = Caller(rig, bad, until_failure=True)  # pooled, busy all along
    caller = Caller(rig, good)
    caller.start()
    revoked.start()
    try:
        await async_until(
            lambda: caller.ok >= 20 and revoked.ok >= 20, what="both callers are calling"
        )
        await async_until(  # the CA commits what it issued in groups
            lambda: rig.ledger.certificate(format_serial(bad.serial)) is not None,
            what="the certificate is in the ledger",
        )
        rig.ledger.revoke_serial(
            format_serial(bad.serial), x509.ReasonFlags.key_compromise, "t", "", SystemClock().now()
        )
        await async_until(
            lambda: sidecar.revocation_drains == 1, what="the sidecar drained for the CRL"
        )
        # Envoy held the new CRL before the drain: the revoked certificate is refused.
        assert not await asyncio.to_thread(rig.accepted, bad)

        # The busy revoked caller: its pooled connection got `connection: close` with the
        # next answer (HTTP/1.1 drains gracefully), and its reconnect was refused.
        await asyncio.to_thread(revoked.join, 30)
        assert not revoked.is_alive(), "the revoked caller is still served"
        assert revoked.closes == 1 and revoked.connections == 2
        # (the refusal shows as a TLS alert or a reset, depending on when the client reads)
        assert len(revoked.failures) == 1 and not revoked.failures[0].startswith("HTTP")
        # The idle one is closed by Envoy when the drain time ends.
        await async_until(
            lambda: closed_by_server(idle), timeout=60, what="the idle pooled connection was cut"
        )
        calls_before = caller.ok
        await async_until(lambda: caller.ok >= calls_before + 20, what="the good caller goes on")
    finally:
        caller.done.set()
        revoked.done.set()
        await asyncio.to_thread(caller.join, 30)
        await asyncio.to_thread(revoked.join, 30)
        idle.close()
    # The good caller was drained too (it reconnected), without a failed request.
    assert caller.failures == []
    assert caller.connections >= 2
    assert await asyncio.to_thread(rig.accepted, good)
    assert isinstance(sidecar.envoy, EnvoyChild)
    stats = await asyncio.to_thread(sidecar.envoy.process.admin_get, "/stats")
    assert "listener_manager.lds.update_rejected: 0" in stats
    assert "listener_manager.listener_in_place_updated: 1" in stats  # chains only
