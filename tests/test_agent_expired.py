"""The whole agent on a fake clock with the CA away past expiry: no expired certificate is
handed out anew over the Workload API (real py-spiffe client, real Unix socket), SDS
(grpcio client playing Envoy) or files; readiness, metrics and /debug/status say expired;
everything recovers when the CA comes back."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import queue
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import spiffe
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from spiffe.workloadapi.errors import FetchX509SvidError
from spiffe.workloadapi.x509_context import X509Context

from meshtrust.agent.agent import Agent
from meshtrust.agent.build import build_agent
from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.config import AgentConfig
from meshtrust.agent.handout import HandoutGate
from meshtrust.agent.rotation import SlotState
from meshtrust.agent.status import route
from meshtrust.agent.workload_api import WorkloadApiServer
from meshtrust.clock import FakeClock
from meshtrust.errors import CAUnavailable
from meshtrust.pki import format_serial
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests import badcerts
from tests.fake_ca import FakeClockCa
from tests.test_sds import FakeEnvoy
from tests.waiting import async_until

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "default", "web")
TTL = dt.timedelta(hours=1)
TIMEOUT = 10.0
#: Past the longest retry delay: 60 s + 10 % jitter.
BACKOFF_CAP = 67.0
CA_DOWN = "CA at 127.0.0.1:15012 unavailable (UNAVAILABLE): connection refused"


@dataclass
class SwitchableCa:
    """The fake-clock CA, which can be switched off."""

    inner: FakeClockCa
    down: bool = False

    async def sign(
        self,
        csr_pem: str,
        *,
        ttl_seconds: int,
        token: str | None,
        client_cert: tuple[bytes, bytes] | None,
    ) -> list[str]:
        if self.down:
            raise CAUnavailable(CA_DOWN)
        return await self.inner.sign(
            csr_pem, ttl_seconds=ttl_seconds, token=token, client_cert=client_cert
        )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths hold at most 107 bytes; tmp_path named after a test can be longer.
    directory = Path(tempfile.mkdtemp(prefix="exp-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Running:
    agent: Agent
    clock: FakeClock
    ca: SwitchableCa
    dir: Path

    @property
    def out(self) -> Path:
        return self.dir / "certs"

    def ready_status(self) -> int:
        """What ``GET /healthz/ready`` answers (the status server's own routing)."""
        a = self.agent
        return route("/healthz/ready", a.registry, a.ready, a.status_snapshot)[0]

    def metrics(self) -> str:
        a = self.agent
        return route("/metrics", a.registry, a.ready, a.status_snapshot)[2].decode()

    def debug_status(self) -> dict[str, Any]:
        a = self.agent
        body = route("/debug/status", a.registry, a.ready, a.status_snapshot)[2]
        parsed: dict[str, Any] = json.loads(body)
        return parsed


@pytest_asyncio.fixture
async def running(short_dir: Path) -> AsyncIterator[Running]:
    ca = badcerts.make_ca(TD, now=T0, lifetime=dt.timedelta(days=3650))
    (short_dir / "root-cert.pem").write_bytes(badcerts.cert_pem(ca.root))
    config = AgentConfig(
        ca_root=short_dir / "root-cert.pem",
        trust_domain=TD,
        namespace="default",
        service_account="web",
        cert_ttl=TTL,
        sds_socket=short_dir / "sds.sock",
        workload_socket=short_dir / "wl.sock",
        output_dir=short_dir / "certs",
        status_listen=None,
    )
    clock = FakeClock(T0)
    source = SwitchableCa(FakeClockCa(clock, ca, WEB))
    agent = build_agent(config, clock=clock, source=source, rng=random.Random(9))
    await agent.start()
    try:
        yield Running(agent, clock, source, short_dir)
    finally:
        await agent.stop()


class ContextStream:
    """py-spiffe's ``stream_x509_contexts`` on one stream (no reconnect), as a queue."""

    def __init__(self, client: spiffe.WorkloadApiClient) -> None:
        self.updates: queue.Queue[X509Context] = queue.Queue()
        self.errors: queue.Queue[Exception] = queue.Queue()
        self._handler = client.stream_x509_contexts(
            self.updates.put, self.errors.put, retry_connect=False
        )

    async def next_update(self) -> X509Context:
        return await asyncio.to_thread(self.updates.get, timeout=TIMEOUT)

    def cancel(self) -> None:
        self._handler.cancel()


def _serial_of_context(context: X509Context) -> str:
    svid = context.default_svid
    assert svid is not None
    return format_serial(svid.leaf.serial_number)


def _sds_serial(response: Any) -> str:
    secret = secret_pb2.Secret()
    assert response.resources[0].Unpack(secret)
    pem = secret.tls_certificate.certificate_chain.inline_bytes
    return format_serial(x509.load_pem_x509_certificates(pem)[0].serial_number)


def _sds_names(response: Any) -> list[str]:
    names = []
    for resource in response.resources:
        secret = secret_pb2.Secret()
        assert resource.Unpack(secret)
        names.append(secret.name)
    return names


def _file_serial(out: Path) -> str:
    leaf = x509.load_pem_x509_certificates((out / "cert-chain.pem").read_bytes())[0]
    return format_serial(leaf.serial_number)


async def _first(r: Running) -> WorkloadSecret:
    """The agent's first certificate (the CA is up at start)."""
    async with asyncio.timeout(TIMEOUT):
        return await r.agent.cache.wait_newer(0)


async def _expire(r: Running) -> WorkloadSecret:
    """Get the first certificate, switch the CA off, and let the certificate expire."""
    first = await _first(r)
    await async_until(lambda: (r.out / "cert-chain.pem").exists())
    r.ca.down = True
    await r.clock.wait_for_sleepers(1)
    await r.clock.advance(TTL.total_seconds() + 1)
    await r.clock.wait_for_sleepers(1)
    assert first.expired(r.clock.now()) and r.agent.cache.current is first
    assert r.agent.rotator.state == SlotState.EXPIRED
    return first


async def _recover(r: Running, first: WorkloadSecret) -> WorkloadSecret:
    """Switch the CA on; the next retry gets a fresh certificate."""
    r.ca.down = False
    # One advance past the longest backoff is enough only if the rotator was asleep when it
    # happened; when a retry was in flight, its next sleep starts after the advance. So keep
    # moving the clock on until the retry lands (each step is past any backoff).
    async with asyncio.timeout(TIMEOUT):
        while True:
            await r.clock.advance(BACKOFF_CAP)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    fresh = await r.agent.cache.wait_newer(first.generation)
                    break
    assert not fresh.expired(r.clock.now())
    return fresh


@pytest_asyncio.fixture
async def client(running: Running) -> AsyncIterator[spiffe.WorkloadApiClient]:
    made = await asyncio.to_thread(spiffe.WorkloadApiClient, f"unix://{running.dir / 'wl.sock'}")
    try:
        yield made
    finally:
        await asyncio.to_thread(made.close)


@pytest_asyncio.fixture
async def envoys() -> AsyncIterator[list[FakeEnvoy]]:
    made: list[FakeEnvoy] = []
    try:
        yield made
    finally:
        for envoy in made:
            await envoy.close()


@pytest.mark.asyncio
async def test_workload_api_refuses_an_expired_svid_with_the_reason_then_serves_the_fresh_one(
    running: Running, client: spiffe.WorkloadApiClient
) -> None:
    r = running
    stream = ContextStream(client)
    try:
        first = await _first(r)
        assert _serial_of_context(await stream.next_update()) == first.serial_hex
        await _expire(r)
        # A new fetch gets UNAVAILABLE with who, when and why -- not the expired SVID.
        with pytest.raises(FetchX509SvidError) as refused:
            await asyncio.to_thread(client.fetch_x509_svid, timeout=TIMEOUT)
        text = str(refused.value)
        assert "UNAVAILABLE" in text
        assert f"{WEB} (serial {first.serial_hex}) expired at" in text
        assert f"{first.not_after:%Y-%m-%dT%H:%M:%SZ}" in text and CA_DOWN in text
        assert "PRIVATE KEY" not in text
        # The trusted roots are not the expired certificate: still served.
        bundles = await asyncio.to_thread(client.fetch_x509_bundles, timeout=TIMEOUT)
        bundle = bundles.get_bundle_for_trust_domain(spiffe.TrustDomain("example.org"))
        assert bundle is not None and len(bundle.x509_authorities) == 1
        assert stream.errors.empty()  # the open stream keeps what it got: no error, no end

        fresh = await _recover(r, first)
        assert _serial_of_context(await stream.next_update()) == fresh.serial_hex
        svid = await asyncio.to_thread(client.fetch_x509_svid, timeout=TIMEOUT)
        assert format_serial(svid.leaf.serial_number) == fresh.serial_hex
    finally:
        stream.cancel()


@pytest.mark.asyncio
async def test_x509_source_started_while_expired_retries_until_the_fresh_svid(
    running: Running, client: spiffe.WorkloadApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    r = running
    caplog.set_level(logging.INFO, logger="meshtrust.agent")
    first = await _expire(r)

    def refusals() -> int:
        return sum("FetchX509SVID refused (UNAVAILABLE)" in m for m in caplog.messages)

    # py-spiffe retries UNAVAILABLE (it gives up only on CANCELLED and INVALID_ARGUMENT).
    starting = asyncio.create_task(
        asyncio.to_thread(spiffe.X509Source, workload_api_client=client, timeout_in_seconds=30)
    )
    await async_until(lambda: refusals() >= 2, what="py-spiffe retried after UNAVAILABLE")
    assert not starting.done()  # no expired SVID to start with
    fresh = await _recover(r, first)
    source = await starting
    try:
        assert _serial_of_context(source.get_x509_context()) == fresh.serial_hex
    finally:
        await asyncio.to_thread(source.close)


@pytest.mark.asyncio
async def test_sds_new_subscription_waits_for_a_fresh_certificate_and_rootca_is_served(
    running: Running, envoys: list[FakeEnvoy]
) -> None:
    r = running
    first = await _first(r)
    holder = FakeEnvoy(r.dir / "sds.sock")  # an Envoy that got `default` while it was valid
    envoys.append(holder)
    await holder.send("default")
    held = await holder.recv()
    assert _sds_serial(held) == first.serial_hex
    await holder.ack(held)
    await _expire(r)

    waiter, roots = FakeEnvoy(r.dir / "sds.sock"), FakeEnvoy(r.dir / "sds.sock")
    envoys += [waiter, roots]
    await waiter.send("default")
    await roots.send("ROOTCA")
    assert _sds_names(await roots.recv()) == ["ROOTCA"]

    fresh = await _recover(r, first)
    # The waiter's first answer is the fresh certificate (never the expired one); the
    # holder was sent nothing at the expiry, so its next message is the rotation.
    assert _sds_serial(await waiter.recv()) == fresh.serial_hex
    assert _sds_serial(await holder.recv()) == fresh.serial_hex


@pytest.mark.asyncio
async def test_files_are_kept_and_marked_expired_until_a_fresh_certificate(
    running: Running,
) -> None:
    r = running
    first = await _first(r)
    await async_until(lambda: (r.out / "cert-chain.pem").exists())
    assert not (r.out / "EXPIRED").exists()
    held_generation = (r.out / "..data").resolve()
    await _expire(r)

    await async_until(lambda: (r.out / "EXPIRED").exists())
    marker = (r.out / "EXPIRED").read_text()
    assert (held_generation / "EXPIRED").read_text() == marker  # in the generation itself
    assert f"{WEB} (serial {first.serial_hex}) expired at" in marker
    assert f"not_after: {first.not_after:%Y-%m-%dT%H:%M:%SZ}\n" in marker
    assert f"reason: {CA_DOWN}\n" in marker
    assert _file_serial(r.out) == first.serial_hex  # the files stay, for apps holding them

    fresh = await _recover(r, first)
    await async_until(lambda: _file_serial(r.out) == fresh.serial_hex)
    await async_until(lambda: not (r.out / "EXPIRED").is_symlink())
    assert not (r.out / "EXPIRED").exists() and not (r.out / "..data" / "EXPIRED").exists()
    # The previous generation is kept, marker and all, for a reader that resolved it.
    assert (held_generation / "EXPIRED").exists()


@pytest.mark.asyncio
async def test_readiness_metrics_and_status_say_expired_then_recover(running: Running) -> None:
    r = running
    await _first(r)
    await async_until(lambda: r.ready_status() == 200)
    assert 'meshtrust_agent_cert_expired{resource_name="default"} 0' in r.metrics()
    first = await _expire(r)

    assert r.ready_status() == 503
    assert 'meshtrust_agent_cert_expired{resource_name="default"} 1' in r.metrics()
    status = r.debug_status()
    assert (status["state"], status["expired"]) == ("expired", True)
    assert first.serial_hex in status["expired_reason"] and CA_DOWN in status["expired_reason"]

    await _recover(r, first)
    assert r.ready_status() == 200
    assert 'meshtrust_agent_cert_expired{resource_name="default"} 0' in r.metrics()
    status = r.debug_status()
    assert (status["state"], status["expired"]) == ("valid", False)
    assert "expired_reason" not in status


# --- the Workload API server at the very moment of expiry -----------------------------------


def _secret(now: dt.datetime, generation: int = 0) -> WorkloadSecret:
    ca = badcerts.make_ca(TD, now=now)
    leaf = badcerts.svid_leaf(ca.signer, WEB, now=now, ttl=TTL)
    return WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (ca.root,), now, generation)


@pytest.mark.asyncio
async def test_py_spiffe_is_refused_at_not_after_exactly(short_dir: Path) -> None:
    secret = _secret(T0)
    clock = FakeClock(secret.not_after - dt.timedelta(microseconds=1))
    cache = SecretCache()
    await cache.publish(secret)
    server = WorkloadApiServer(cache, short_dir / "wl.sock", gate=HandoutGate(clock))
    await server.start()
    client = await asyncio.to_thread(spiffe.WorkloadApiClient, f"unix://{short_dir}/wl.sock")
    try:
        svid = await asyncio.to_thread(client.fetch_x509_svid, timeout=TIMEOUT)
        assert format_serial(svid.leaf.serial_number) == secret.serial_hex  # its last µs
        await clock.advance(1e-6)
        assert clock.now() == secret.not_after
        with pytest.raises(FetchX509SvidError, match="UNAVAILABLE"):
            await asyncio.to_thread(client.fetch_x509_svid, timeout=TIMEOUT)
    finally:
        await asyncio.to_thread(client.close)
        await server.stop(grace=0.5)
