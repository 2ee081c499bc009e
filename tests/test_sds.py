"""SDS: the pure per-stream state (table-driven), then the server on a real Unix socket with a
grpcio client playing Envoy."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.sds import (
    SECRET_TYPE_URL,
    SdsPush,
    SdsRequest,
    SdsServer,
    SdsStream,
    secret_resource,
)
from meshtrust.errors import AddressInUse, ConfigError
from meshtrust.spiffe import SpiffeId
from tests.badcerts import NOW, CaFixture, cert_pem, make_ca, svid_leaf

SERVER_ID = SpiffeId.parse("spiffe://example.org/ns/default/sa/server")
TIMEOUT = 10.0


# --- fixtures: a few secrets with controlled content ------------------------------------------


@dataclass(frozen=True)
class Secrets:
    """Leaves ``a1``..``a3`` from CA A, ``b1`` from CA B (other roots)."""

    ca_a: CaFixture
    ca_b: CaFixture
    leaves: dict[str, WorkloadSecret]

    def at(self, generation: int, leaf: str = "a1") -> WorkloadSecret:
        base = self.leaves[leaf]
        return WorkloadSecret(
            spiffe_id=base.spiffe_id,
            key=base.key,
            chain=base.chain,
            roots=base.roots,
            received_at=base.received_at,
            generation=generation,
        )


def _secret(ca: CaFixture, now: dt.datetime = NOW) -> WorkloadSecret:
    leaf = svid_leaf(ca.signer, SERVER_ID, now=now)
    return WorkloadSecret(SERVER_ID, leaf.key, tuple(leaf.chain), (ca.root,), now)


@pytest.fixture(scope="module")
def secrets() -> Secrets:
    a, b = make_ca("example.org"), make_ca("example.org")
    return Secrets(a, b, {"a1": _secret(a), "a2": _secret(a), "a3": _secret(a), "b1": _secret(b)})


# --- the pure state: table ------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    """Envoy sends a DiscoveryRequest."""

    names: tuple[str, ...]
    nonce: str = ""
    version: str = ""
    error: str | None = None
    type_url: str = SECRET_TYPE_URL


@dataclass(frozen=True)
class Pub:
    """The cache publishes generation ``gen`` holding leaf ``leaf``."""

    gen: int
    leaf: str = "a1"


@dataclass(frozen=True)
class Sent:
    """The stream answers with these resources, this version and this nonce."""

    names: tuple[str, ...]
    version: str
    nonce: str


Step = tuple[Req | Pub, Sent | None]
D, R = "default", "ROOTCA"

TABLE: dict[str, list[Step]] = {
    "first request answered with what exists": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
    ],
    "first request before any secret waits for it": [
        (Req((D,)), None),
        (Pub(1), Sent((D,), "1", "1")),
    ],
    "ack sends nothing": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
        (Req((D,), nonce="1", version="1"), None),
    ],
    "ack with new names answers the new set": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
        (Req((D, R), nonce="1", version="1"), Sent((D, R), "1", "2")),
        (Req((D, R), nonce="2", version="1"), None),
    ],
    "rotation pushed, then acked": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
        (Req((D,), nonce="1", version="1"), None),
        (Pub(2, "a2"), Sent((D,), "2", "2")),
        (Req((D,), nonce="2", version="2"), None),
    ],
    "nack blocks until a newer generation": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
        (Req((D,), nonce="1", version="1"), None),
        (Pub(2, "a2"), Sent((D,), "2", "2")),
        (Req((D,), nonce="2", version="1", error="bad key"), None),
        # The same generation again (a re-delivered wake-up) must not resend what was refused,
        (Pub(2, "a2"), None),
        # nor must a re-subscription on the stream,
        (Req((D,)), None),
        # but a newer generation is sent.
        (Pub(3, "a3"), Sent((D,), "3", "3")),
        (Req((D,), nonce="3", version="3"), None),
    ],
    "nack of the first response": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
        (Req((D,), nonce="1", error="no"), None),
        (Pub(2, "a2"), Sent((D,), "2", "2")),
    ],
    "stale nonce ignored, even with new names": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
        (Pub(2, "a2"), Sent((D,), "2", "2")),
        # Envoy's ACK of the first response arrives after we sent the second: stale.
        (Req((D, R), nonce="1", version="1"), None),
        (Req((D,), nonce="2", version="2"), None),
    ],
    "stale nack ignored": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
        (Pub(2, "a2"), Sent((D,), "2", "2")),
        (Req((D,), nonce="1", error="late complaint"), None),
        (Pub(3, "a3"), Sent((D,), "3", "3")),
    ],
    "nonce from a previous agent: answered as a first request": [
        (Pub(1), None),
        (Req((D,), nonce="999", version="7"), Sent((D,), "1", "1")),
        (Req((D,), nonce="999", version="7"), None),  # now it is stale
        (Req((D,), nonce="1", version="1"), None),
    ],
    "error before our first response: answered as a first request": [
        (Pub(1), None),
        (Req((D,), nonce="999", error="from the previous agent"), Sent((D,), "1", "1")),
    ],
    "unknown names are left out": [
        (Pub(1), None),
        (Req(("file-cert:/etc/x", D)), Sent((D,), "1", "1")),
    ],
    "only unknown names: nothing, stream keeps working": [
        (Pub(1), None),
        (Req(("bogus",)), None),
        (Pub(2, "a2"), None),
        (Req((R,)), Sent((R,), "2", "1")),
    ],
    "roots stream not woken by a leaf rotation": [
        (Pub(1), None),
        (Req((R,)), Sent((R,), "1", "1")),
        (Req((R,), nonce="1", version="1"), None),
        (Pub(2, "a2"), None),
        (Pub(3, "b1"), Sent((R,), "3", "2")),
    ],
    "default stream woken by a leaf rotation": [
        (Pub(1), None),
        (Req((D, R)), Sent((D, R), "1", "1")),
        (Pub(2, "a2"), Sent((D, R), "2", "2")),
    ],
    "resubscription answered again": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
        (Req((D,), nonce="1", version="1"), None),
        (Req((D,), version="1"), Sent((D,), "1", "2")),
    ],
    "duplicate names answered once": [
        (Pub(1), None),
        (Req((D, D, R, D)), Sent((D, R), "1", "1")),
    ],
    "empty names: nothing": [
        (Pub(1), None),
        (Req(()), None),
        (Pub(2, "a2"), None),
    ],
    "other type url: nothing": [
        (Pub(1), None),
        (Req((D,), type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"), None),
    ],
    "names dropped: no more pushes": [
        (Pub(1), None),
        (Req((D,)), Sent((D,), "1", "1")),
        (Req((), nonce="1", version="1"), None),
        (Pub(2, "a2"), None),
    ],
}


def _sent(push: SdsPush | None) -> Sent | None:
    return None if push is None else Sent(push.names, push.version_info, push.nonce)


def _run(secrets: Secrets, steps: list[Step], stream: SdsStream) -> None:
    current: WorkloadSecret | None = None
    for number, (event, expected) in enumerate(steps, 1):
        if isinstance(event, Pub):
            current = secrets.at(event.gen, event.leaf)
            push = stream.on_secret(current)
        else:
            request = SdsRequest(
                resource_names=event.names,
                version_info=event.version,
                response_nonce=event.nonce,
                error_detail=event.error,
                type_url=event.type_url,
            )
            push = stream.on_request(request, current)
        assert _sent(push) == expected, f"step {number}: {event}"
        if push is not None:
            assert current is not None
            assert push.generation == current.generation
            assert push.serial_hex == current.serial_hex


@pytest.mark.parametrize("steps", list(TABLE.values()), ids=list(TABLE))
def test_stream_state(secrets: Secrets, steps: list[Step]) -> None:
    _run(secrets, steps, SdsStream())


def test_counters_and_nack_log(secrets: Secrets, caplog: pytest.LogCaptureFixture) -> None:
    stream = SdsStream()
    caplog.set_level(logging.INFO, logger="meshtrust.agent")
    _run(secrets, TABLE["nack blocks until a newer generation"], stream)
    _run(secrets, [(Req(("bogus", "bogus2")), None), (Req(("bogus",)), None)], stream)
    c = stream.counters
    assert (c.acks, c.nacks, c.stale, c.pushes, c.unknown_names) == (2, 1, 0, 3, 2)
    assert c.last_nack == "bad key"
    assert stream.acked_version == "3"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bad key" in warnings[0].getMessage()
    assert warnings[0].name == "meshtrust.agent"
    # Each unknown name is logged once per stream, at info.
    unknown = [r for r in caplog.records if "unknown secret" in r.getMessage()]
    assert [r.levelno for r in unknown] == [logging.INFO, logging.INFO]


def test_nonces_come_from_the_factory(secrets: Secrets) -> None:
    made = iter(["n-a", "n-b"])
    stream = SdsStream(nonces=lambda: next(made))
    first = stream.on_request(SdsRequest((D,)), secrets.at(1))
    second = stream.on_secret(secrets.at(2, "a2"))
    assert first is not None and second is not None
    assert (first.nonce, second.nonce) == ("n-a", "n-b")
    assert stream.on_request(SdsRequest((D,), "1", "n-a"), secrets.at(2, "a2")) is None
    assert stream.counters.stale == 1


def test_resources_content(secrets: Secrets) -> None:
    secret = secrets.at(4, "a2")
    default = secret_resource(D, secret)
    root = secret_resource(R, secret)
    with pytest.raises(ValueError, match="bogus"):
        secret_resource("bogus", secret)
    assert default.name == D
    assert default.tls_certificate.certificate_chain.inline_bytes == secret.chain_with_root_pem()
    assert default.tls_certificate.private_key.inline_bytes == secret.key_pem()
    # Leaf, intermediate, root: as istio-agent serves it.
    chain = x509.load_pem_x509_certificates(secret.chain_with_root_pem())
    assert chain == [*secret.chain, *secret.roots]
    assert root.name == R
    assert root.validation_context.trusted_ca.inline_bytes == cert_pem(*secret.roots)
    assert not root.HasField("tls_certificate")

    push = SdsStream().on_request(SdsRequest((R, D)), secret)
    assert push is not None
    response = push.to_proto()
    assert response.version_info == "4"
    assert response.type_url == SECRET_TYPE_URL
    assert [a.type_url for a in response.resources] == [SECRET_TYPE_URL] * 2
    unpacked = [_unpack(a) for a in response.resources]
    assert [s.name for s in unpacked] == [R, D]
    assert "PRIVATE KEY" not in repr(push)


def _unpack(resource: Any) -> Any:
    secret = secret_pb2.Secret()
    assert resource.Unpack(secret)
    return secret


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(
        st.sampled_from(["publish", "publish-roots", "envoy-reads", "envoy-reads-all"]),
        max_size=30,
    )
)
def test_a_well_behaved_envoy_converges(secrets: Secrets, events: list[str]) -> None:
    """Whatever the interleaving of rotations and Envoy's (delayed) replies, once Envoy has
    read everything it holds the latest generation and nothing is left to send."""
    stream = SdsStream()
    generation = 1
    current = secrets.at(1)
    in_flight: list[SdsPush] = []
    envoy_has: dict[str, bytes] = {}
    nonces: list[str] = []

    def deliver(push: SdsPush | None) -> None:
        if push is not None:
            in_flight.append(push)
            nonces.append(push.nonce)

    def envoy_reads_one() -> None:
        push = in_flight.pop(0)
        for resource in push.secrets:
            envoy_has[resource.name] = resource.SerializeToString()
        deliver(stream.on_request(SdsRequest((D, R), push.version_info, push.nonce), current))

    deliver(stream.on_request(SdsRequest((D, R)), current))
    for event in events:
        if event.startswith("publish"):
            generation += 1
            leaf = "b1" if event == "publish-roots" else ("a1", "a2", "a3")[generation % 3]
            current = secrets.at(generation, leaf)
            deliver(stream.on_secret(current))
        elif in_flight:
            envoy_reads_one()
            while event == "envoy-reads-all" and in_flight:
                envoy_reads_one()
    while in_flight:
        envoy_reads_one()
    assert len(set(nonces)) == len(nonces)
    for name in (D, R):
        assert envoy_has[name] == secret_resource(name, current).SerializeToString()
    assert stream.on_secret(current) is None
    assert stream.counters.nacks == 0


# --- the server on a real Unix socket --------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short and private: Unix socket paths are limited to 107 bytes, and pytest's tmp_path
    # for a long test name can exceed that.
    directory = Path(tempfile.mkdtemp(prefix="sds-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest_asyncio.fixture
async def cache(secrets: Secrets) -> SecretCache:
    cache = SecretCache()
    await cache.publish(secrets.leaves["a1"])
    return cache


@pytest_asyncio.fixture
async def server(cache: SecretCache, sock_dir: Path) -> AsyncIterator[SdsServer]:
    server = SdsServer(cache, sock_dir / "agent" / "sds.sock")
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


class FakeEnvoy:
    """A grpcio client playing Envoy on one SDS stream."""

    def __init__(self, socket_path: Path) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
        self.stub = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel)
        self.call: Any = None

    async def send(
        self,
        *names: str,
        nonce: str = "",
        version: str = "",
        error: str | None = None,
    ) -> None:
        if self.call is None:
            self.call = self.stub.StreamSecrets()
        request = discovery_pb2.DiscoveryRequest(
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
            type_url=SECRET_TYPE_URL,
        )
        request.node.id = "sidecar~test"
        request.node.cluster = "test"
        if error is not None:
            request.error_detail.code = grpc.StatusCode.INTERNAL.value[0]
            request.error_detail.message = error
        await self.call.write(request)

    async def recv(self) -> Any:
        response = await _bounded(self.call.read())
        assert response is not grpc.aio.EOF, "stream ended"
        return response

    async def ack(self, response: Any) -> None:
        names = [_unpack(r).name for r in response.resources]
        await self.send(*names, nonce=response.nonce, version=response.version_info)

    async def close(self) -> None:
        await self.channel.close()


async def _bounded(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, TIMEOUT)


@pytest_asyncio.fixture
async def envoys(server: SdsServer) -> AsyncIterator[list[FakeEnvoy]]:
    made: list[FakeEnvoy] = []
    try:
        yield made
    finally:
        for envoy in made:
            await envoy.close()


def _names(response: Any) -> list[str]:
    return [_unpack(r).name for r in response.resources]


def _serial(response: Any) -> int:
    secret = _unpack(response.resources[0])
    pem = secret.tls_certificate.certificate_chain.inline_bytes
    return int(x509.load_pem_x509_certificates(pem)[0].serial_number)


@pytest.mark.asyncio
async def test_first_request_ack_and_push_on_publish(
    server: SdsServer, cache: SecretCache, secrets: Secrets, envoys: list[FakeEnvoy]
) -> None:
    envoy = FakeEnvoy(server.socket_path)
    envoys.append(envoy)
    await envoy.send(D)
    first = await envoy.recv()
    assert first.type_url == SECRET_TYPE_URL
    assert first.version_info == "1"
    assert _names(first) == [D]
    secret = _unpack(first.resources[0])
    assert secret.tls_certificate.private_key.inline_bytes == secrets.leaves["a1"].key_pem()
    assert _serial(first) == secrets.leaves["a1"].leaf.serial_number

    await envoy.ack(first)
    await server.wait_for(lambda s: s.acks == 1, TIMEOUT)
    # The ACK was answered with nothing: the next message is the rotation.
    rotated = await cache.publish(secrets.leaves["a2"])
    second = await envoy.recv()
    assert second.version_info == str(rotated.generation) == "2"
    assert second.nonce != first.nonce
    assert _serial(second) == rotated.leaf.serial_number
    stats = server.stats
    assert (stats.streams_active, stats.pushes, stats.acks, stats.nacks) == (1, 2, 1, 0)


@pytest.mark.asyncio
async def test_nack_is_logged_and_stream_survives(
    server: SdsServer,
    cache: SecretCache,
    secrets: Secrets,
    envoys: list[FakeEnvoy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="meshtrust.agent")
    envoy = FakeEnvoy(server.socket_path)
    envoys.append(envoy)
    await envoy.send(D)
    first = await envoy.recv()
    await envoy.send(D, nonce=first.nonce, version="", error="Failed to load private key")
    await server.wait_for(lambda s: s.nacks == 1, TIMEOUT)
    assert server.stats.last_nack == "Failed to load private key"
    nack_logs = [r for r in caplog.records if "Failed to load private key" in r.getMessage()]
    assert [(r.name, r.levelno) for r in nack_logs] == [("meshtrust.agent", logging.WARNING)]

    # A newer generation is sent after a NACK.
    await cache.publish(secrets.leaves["a2"])
    second = await envoy.recv()
    assert second.version_info == "2"
    await envoy.ack(second)
    await server.wait_for(lambda s: s.acks == 1, TIMEOUT)
    _assert_no_key_material(caplog, secrets)


@pytest.mark.asyncio
async def test_stale_nonce_is_ignored(
    server: SdsServer, cache: SecretCache, secrets: Secrets, envoys: list[FakeEnvoy]
) -> None:
    envoy = FakeEnvoy(server.socket_path)
    envoys.append(envoy)
    await envoy.send(D)
    first = await envoy.recv()
    await cache.publish(secrets.leaves["a2"])
    second = await envoy.recv()
    # Envoy's reply to the first response arrives late, asking for more names: stale.
    await envoy.send(D, R, nonce=first.nonce, version=first.version_info)
    await server.wait_for(lambda s: s.stale == 1, TIMEOUT)
    await envoy.ack(second)
    await server.wait_for(lambda s: s.acks == 1, TIMEOUT)
    # Had the stale request counted, ROOTCA would have been sent before this rotation.
    await cache.publish(secrets.leaves["a3"])
    third = await envoy.recv()
    assert (third.version_info, _names(third)) == ("3", [D])


@pytest.mark.asyncio
async def test_unknown_names_do_not_break_the_stream(
    server: SdsServer, envoys: list[FakeEnvoy], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshtrust.agent")
    envoy = FakeEnvoy(server.socket_path)
    envoys.append(envoy)
    await envoy.send("file-root:/etc/ssl/ca.pem")
    await server.wait_for(lambda s: s.unknown_names == 1, TIMEOUT)
    await envoy.send("file-root:/etc/ssl/ca.pem", R)
    response = await envoy.recv()
    assert _names(response) == [R]
    assert sum("unknown secret" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.asyncio
async def test_push_goes_to_streams_whose_secret_changed(
    server: SdsServer, cache: SecretCache, secrets: Secrets, envoys: list[FakeEnvoy]
) -> None:
    """Like Envoy: one stream per secret name. A leaf rotation wakes ``default`` only; a new
    CA wakes both."""
    cert, roots = FakeEnvoy(server.socket_path), FakeEnvoy(server.socket_path)
    envoys += [cert, roots]
    await cert.send(D)
    await roots.send(R)
    await cert.ack(await cert.recv())
    first_roots = await roots.recv()
    assert _unpack(first_roots.resources[0]).validation_context.trusted_ca.inline_bytes == (
        cert_pem(secrets.ca_a.root)
    )
    await roots.ack(first_roots)
    await server.wait_for(lambda s: s.acks == 2 and s.streams_active == 2, TIMEOUT)

    await cache.publish(secrets.leaves["a2"])  # same roots
    assert (await cert.recv()).version_info == "2"
    await cache.publish(secrets.leaves["b1"])  # new roots
    assert (await cert.recv()).version_info == "3"
    new_roots = await roots.recv()
    assert new_roots.version_info == "3"
    assert _unpack(new_roots.resources[0]).validation_context.trusted_ca.inline_bytes == (
        cert_pem(secrets.ca_b.root)
    )


@pytest.mark.asyncio
async def test_stream_before_first_secret_waits(sock_dir: Path, secrets: Secrets) -> None:
    cache = SecretCache()
    async with SdsServer(cache, sock_dir / "sds.sock") as server:
        envoy = FakeEnvoy(server.socket_path)
        try:
            await envoy.send(D)
            await server.wait_for(lambda s: s.requests == 1, TIMEOUT)
            assert server.stats.pushes == 0
            await cache.publish(secrets.leaves["a1"])
            response = await envoy.recv()
            assert response.version_info == "1"
        finally:
            await envoy.close()


@pytest.mark.asyncio
async def test_delta_and_fetch_are_unimplemented(server: SdsServer) -> None:
    async with grpc.aio.insecure_channel(f"unix:{server.socket_path}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as fetch:
            await stub.FetchSecrets(discovery_pb2.DiscoveryRequest(resource_names=[D]), timeout=5)
        assert fetch.value.code() == grpc.StatusCode.UNIMPLEMENTED
        call = stub.DeltaSecrets(timeout=5)
        await call.write(discovery_pb2.DeltaDiscoveryRequest(resource_names_subscribe=[D]))
        with pytest.raises(grpc.aio.AioRpcError) as delta:
            await call.read()
        assert delta.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.asyncio
async def test_stream_end_and_stop(server: SdsServer, cache: SecretCache, secrets: Secrets) -> None:
    leaving, staying = FakeEnvoy(server.socket_path), FakeEnvoy(server.socket_path)
    try:
        await leaving.send(D)
        await staying.send(D)
        await leaving.recv()
        await staying.recv()
        await server.wait_for(lambda s: s.streams_active == 2, TIMEOUT)
        # Envoy closing its side ends the stream on ours.
        await leaving.call.done_writing()
        assert await _bounded(leaving.call.read()) is grpc.aio.EOF
        await server.wait_for(lambda s: s.streams_active == 1, TIMEOUT)

        # Stopping ends the remaining streams cleanly and removes the socket.
        await server.stop(grace=5)
        assert await _bounded(staying.call.read()) is grpc.aio.EOF
        assert await _bounded(staying.call.code()) == grpc.StatusCode.OK
        assert server.stats.streams_active == 0
        assert not os.path.lexists(server.socket_path)
    finally:
        await leaving.close()
        await staying.close()


# --- the socket file ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_socket_is_private(server: SdsServer) -> None:
    assert stat.S_ISSOCK(os.lstat(server.socket_path).st_mode)
    assert stat.S_IMODE(os.lstat(server.socket_path).st_mode) == 0o600
    # The missing parent directory was created private too.
    assert stat.S_IMODE(os.stat(server.socket_path.parent).st_mode) == 0o700


@pytest.mark.asyncio
async def test_stale_socket_is_replaced(
    sock_dir: Path, cache: SecretCache, secrets: Secrets
) -> None:
    path = sock_dir / "sds.sock"
    with socket.socket(socket.AF_UNIX) as leftover:  # a crashed agent's socket file
        leftover.bind(str(path))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    async with SdsServer(cache, path) as server:
        envoy = FakeEnvoy(path)
        try:
            await envoy.send(D)
            assert _serial(await envoy.recv()) == secrets.leaves["a1"].leaf.serial_number
        finally:
            await envoy.close()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert server.stats.streams_total == 1
    assert not os.path.lexists(path)


@pytest.mark.asyncio
async def test_live_socket_is_not_taken_over(server: SdsServer, cache: SecretCache) -> None:
    second = SdsServer(cache, server.socket_path)
    with pytest.raises(AddressInUse, match="another server is listening"):
        await second.start()
    assert stat.S_ISSOCK(os.lstat(server.socket_path).st_mode)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_non_socket_in_the_way_is_a_config_error(
    sock_dir: Path, cache: SecretCache, kind: str
) -> None:
    path = sock_dir / "sds.sock"
    if kind == "file":
        path.write_text("important data")
    else:
        path.mkdir()
    with pytest.raises(ConfigError, match="not a socket"):
        await SdsServer(cache, path).start()
    assert path.exists()  # left alone
    if kind == "file":
        assert path.read_text() == "important data"


@pytest.mark.asyncio
async def test_too_long_socket_path_is_a_config_error(sock_dir: Path, cache: SecretCache) -> None:
    path = sock_dir / ("x" * 120) / "sds.sock"
    with pytest.raises(ConfigError, match="the limit is 107"):
        await SdsServer(cache, path).start()


def _assert_no_key_material(caplog: pytest.LogCaptureFixture, secrets: Secrets) -> None:
    text = caplog.text
    assert "PRIVATE KEY" not in text
    for secret in secrets.leaves.values():
        body = secret.key_pem().decode().splitlines()[1]
        assert body not in text
