"""The SPIFFE Workload API on a real Unix socket, with the real py-spiffe client.

py-spiffe is synchronous and starts its own threads, so its calls run in worker threads
(``asyncio.to_thread``) while the server runs on the test's event loop. Waits are on
conditions with a deadline, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from google.protobuf import descriptor_pb2
from spiffe._proto import workload_pb2 as client_pb2  # the client's own messages
from spiffe.workloadapi.errors import FetchJwtSvidError, WorkloadApiError
from spiffe.workloadapi.x509_context import X509Context

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.workload_api import (
    JWT_UNSUPPORTED,
    WorkloadApiServer,
    _serialized_workload_descriptor,
    has_security_header,
    x509_bundles_response,
    x509_svid_response,
)
from meshtrust.clock import SystemClock
from meshtrust.errors import AddressInUse, ConfigError
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.badcerts import CaFixture, make_ca, svid_leaf
from tests.waiting import async_until

TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "default", "web")
TIMEOUT = 15.0  # seconds: the bound of every wait; reached only when something is broken
HEADER = (("workload.spiffe.io", "true"),)
REPO = Path(__file__).resolve().parent.parent


# --- fixtures and helpers ---------------------------------------------------------------------


def make_secret(ca: CaFixture, spiffe_id: SpiffeId = WEB) -> WorkloadSecret:
    """A WorkloadSecret as the agent would hold it: fresh key, leaf + intermediate, root."""
    now = SystemClock().now()
    leaf = svid_leaf(ca.signer, spiffe_id, now=now)
    return WorkloadSecret(
        spiffe_id=spiffe_id,
        key=leaf.key,
        chain=tuple(leaf.chain),
        roots=(ca.root,),
        received_at=now,
    )


@pytest.fixture(scope="module")
def ca() -> CaFixture:
    return make_ca(TD, now=SystemClock().now())


@pytest.fixture
def socket_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short on purpose: a Unix socket path holds at most 107 bytes, and tmp_path (named after
    # the test) can be longer. The "agent" directory does not exist yet: the server makes it.
    return tmp_path_factory.mktemp("wl") / "agent" / "socket"


@pytest.fixture
def cache() -> SecretCache:
    return SecretCache()


@pytest_asyncio.fixture
async def server(cache: SecretCache, socket_path: Path) -> AsyncIterator[WorkloadApiServer]:
    srv = WorkloadApiServer(cache, socket_path)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=0.5)


def endpoint(path: Path) -> str:
    """The socket as py-spiffe and SPIFFE_ENDPOINT_SOCKET spell it."""
    return f"unix://{path}"


def public_der(holder: PrivateKeyTypes | x509.Certificate) -> bytes:
    """The SubjectPublicKeyInfo of a private key or a certificate."""
    return holder.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


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

    async def next_error(self) -> Exception:
        return await asyncio.to_thread(self.errors.get, timeout=TIMEOUT)

    def cancel(self) -> None:
        self._handler.cancel()


@pytest.fixture
def open_client(socket_path: Path) -> Iterator[Callable[[], spiffe.WorkloadApiClient]]:
    """Make py-spiffe clients on the server's socket; all are closed after the test."""
    clients: list[spiffe.WorkloadApiClient] = []

    def make() -> spiffe.WorkloadApiClient:
        client = spiffe.WorkloadApiClient(endpoint(socket_path))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def raw_channel(path: Path) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix:{path}")


# --- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "admitted"),
    [
        (HEADER, True),
        ((("x-other", "1"), ("workload.spiffe.io", "true")), True),
        ((), False),
        (None, False),
        ((("workload.spiffe.io", "false"),), False),
        ((("workload.spiffe.io", "TRUE"),), False),
        ((("workload.spiffe.io", "true"), ("workload.spiffe.io", "true")), False),
    ],
)
def test_security_header_rule(metadata: tuple[tuple[str, str], ...] | None, admitted: bool) -> None:
    assert has_security_header(metadata) is admitted


def test_a_secret_that_cannot_make_a_complete_response_is_not_sent(ca: CaFixture) -> None:
    # py-spiffe closes an X509Source for good on a response it cannot parse (an empty
    # bundle is one), so such a secret yields no response at all.
    good = make_secret(ca)
    rootless = WorkloadSecret(
        spiffe_id=good.spiffe_id,
        key=good.key,
        chain=good.chain,
        roots=(),
        received_at=good.received_at,
    )
    assert x509_svid_response(rootless) is None
    assert x509_bundles_response(rootless) is None
    assert x509_svid_response(good) is not None


def test_proto_is_wire_identical_to_py_spiffe() -> None:
    # Same messages, fields, numbers, types, service and methods as the client's proto;
    # only the file name differs.
    ours = descriptor_pb2.FileDescriptorProto.FromString(_serialized_workload_descriptor())
    theirs = descriptor_pb2.FileDescriptorProto()
    client_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.name == "meshtrust/_proto/spiffe/workload.proto"
    assert ours.package == "" and ours.service[0].name == "SpiffeWorkloadAPI"
    ours.ClearField("name")
    theirs.ClearField("name")
    assert ours == theirs


@pytest.mark.parametrize(
    "imports",
    [
        "import spiffe, meshtrust.agent.workload_api",
        "import meshtrust.agent.workload_api, spiffe",
    ],
)
def test_py_spiffe_and_meshtrust_import_together_in_either_order(imports: str) -> None:
    # Both define the package-less SPIFFE messages; ours live in a private descriptor pool.
    done = subprocess.run(
        [sys.executable, "-c", f"{imports}; import spiffe._proto.workload_pb2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# --- fetching with py-spiffe ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_py_spiffe_fetches_svid_and_bundle(
    server: WorkloadApiServer,
    cache: SecretCache,
    ca: CaFixture,
    open_client: Callable[[], spiffe.WorkloadApiClient],
) -> None:
    secret = await cache.publish(make_secret(ca))
    client = open_client()

    svid = await asyncio.to_thread(client.fetch_x509_svid, TIMEOUT)
    assert str(svid.spiffe_id) == str(WEB)
    assert svid.leaf.serial_number == secret.leaf.serial_number
    assert [c.serial_number for c in svid.cert_chain] == [c.serial_number for c in secret.chain]
    # The private key is the one of the leaf (and of the secret).
    assert public_der(svid.private_key) == public_der(svid.leaf)
    assert public_der(svid.private_key) == public_der(secret.key)

    bundles = await asyncio.to_thread(client.fetch_x509_bundles, TIMEOUT)
    bundle = bundles.get_bundle_for_trust_domain(spiffe.TrustDomain("example.org"))
    assert bundle is not None
    assert bundle.x509_authorities == {ca.root}

    context = await asyncio.to_thread(client.fetch_x509_context, TIMEOUT)
    assert context.default_svid.leaf == secret.leaf
    td_bundle = context.x509_bundle_set.get_bundle_for_trust_domain(spiffe.TrustDomain(TD.name))
    assert td_bundle is not None and td_bundle.x509_authorities == {ca.root}


@pytest.mark.asyncio
async def test_rotation_is_pushed_on_the_open_stream(
    server: WorkloadApiServer,
    cache: SecretCache,
    ca: CaFixture,
    open_client: Callable[[], spiffe.WorkloadApiClient],
) -> None:
    first = await cache.publish(make_secret(ca))
    stream = ContextStream(open_client())  # one stream; it does not reconnect
    try:
        update = await stream.next_update()
        assert update.default_svid.leaf.serial_number == first.leaf.serial_number

        rotated = await cache.publish(make_secret(ca))
        update = await stream.next_update()
        assert update.default_svid.leaf.serial_number == rotated.leaf.serial_number
        assert public_der(update.default_svid.private_key) == public_der(rotated.key)
        assert server.open_streams == 1
        assert stream.errors.empty()
    finally:
        stream.cancel()


@pytest.mark.asyncio
async def test_x509_source_follows_rotation(
    server: WorkloadApiServer, cache: SecretCache, ca: CaFixture, socket_path: Path
) -> None:
    first = await cache.publish(make_secret(ca))
    source = await asyncio.to_thread(
        spiffe.X509Source, socket_path=endpoint(socket_path), timeout_in_seconds=TIMEOUT
    )
    try:
        assert source.get_x509_context().default_svid.leaf == first.leaf
        rotated_serial = threading.Event()
        rotated = make_secret(ca)

        def on_update() -> None:
            svid = source.get_x509_context().default_svid
            if svid.leaf.serial_number == rotated.leaf.serial_number:
                rotated_serial.set()

        source.subscribe_for_updates(on_update)
        await cache.publish(rotated)
        assert await asyncio.to_thread(rotated_serial.wait, TIMEOUT)
        assert not source.is_closed()
        assert server.open_streams == 1  # the same stream, not a reconnect
    finally:
        source.close()


@pytest.mark.asyncio
async def test_client_connected_before_the_first_secret_gets_it_when_published(
    server: WorkloadApiServer, cache: SecretCache, ca: CaFixture, socket_path: Path
) -> None:
    opening = asyncio.create_task(
        asyncio.to_thread(
            spiffe.X509Source, socket_path=endpoint(socket_path), timeout_in_seconds=TIMEOUT
        )
    )
    await async_until(lambda: server.open_streams == 1, TIMEOUT, "the source's stream is open")
    assert not opening.done()  # nothing to send yet, and nothing half-formed was sent

    secret = await cache.publish(make_secret(ca))
    source = await opening
    try:
        assert source.get_x509_context().default_svid.leaf == secret.leaf
    finally:
        source.close()


@pytest.mark.asyncio
async def test_bundle_stream_sends_on_root_change_only(
    server: WorkloadApiServer, cache: SecretCache, ca: CaFixture, socket_path: Path
) -> None:
    await cache.publish(make_secret(ca))
    async with raw_channel(socket_path) as channel:
        fetch = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509Bundles",
            request_serializer=client_pb2.X509BundlesRequest.SerializeToString,
            response_deserializer=client_pb2.X509BundlesResponse.FromString,
        )
        call = fetch(client_pb2.X509BundlesRequest(), metadata=HEADER, timeout=TIMEOUT)
        first = await call.read()
        root_der = ca.root.public_bytes(serialization.Encoding.DER)
        assert dict(first.bundles) == {"spiffe://example.org": root_der}

        # A leaf rotation keeps the roots: no message. A new root is the next message.
        await cache.publish(make_secret(ca))
        new_ca = make_ca(TD, now=SystemClock().now())
        await cache.publish(make_secret(new_ca))
        second = await call.read()
        new_root_der = new_ca.root.public_bytes(serialization.Encoding.DER)
        assert dict(second.bundles) == {"spiffe://example.org": new_root_der}
        call.cancel()


# --- refusals ---------------------------------------------------------------------------------

ALL_METHODS = [
    ("FetchX509SVID", True),
    ("FetchX509Bundles", True),
    ("FetchJWTSVID", False),
    ("FetchJWTBundles", True),
    ("ValidateJWTSVID", False),
]


async def raw_call(
    channel: grpc.aio.Channel, method: str, streaming: bool, metadata: Any
) -> grpc.aio.AioRpcError:
    """Call ``method`` with an empty request; return the error it ends with."""
    path = f"/SpiffeWorkloadAPI/{method}"
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if streaming:
            call = channel.unary_stream(path, request_serializer=identity)(
                b"", metadata=metadata, timeout=TIMEOUT
            )
            await call.read()
        else:
            await channel.unary_unary(path, request_serializer=identity)(
                b"", metadata=metadata, timeout=TIMEOUT
            )
    return info.value


@pytest.mark.asyncio
@pytest.mark.parametrize(("method", "streaming"), ALL_METHODS)
@pytest.mark.parametrize("metadata", [(), (("workload.spiffe.io", "false"),)])
async def test_call_without_security_header_is_invalid_argument(
    server: WorkloadApiServer,
    cache: SecretCache,
    ca: CaFixture,
    socket_path: Path,
    method: str,
    streaming: bool,
    metadata: Any,
) -> None:
    await cache.publish(make_secret(ca))
    async with raw_channel(socket_path) as channel:
        error = await raw_call(channel, method, streaming, metadata)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "security header missing" in (error.details() or "")


@pytest.mark.asyncio
@pytest.mark.parametrize(("method", "streaming"), [m for m in ALL_METHODS if "JWT" in m[0]])
async def test_jwt_methods_are_unimplemented(
    server: WorkloadApiServer, socket_path: Path, method: str, streaming: bool
) -> None:
    async with raw_channel(socket_path) as channel:
        error = await raw_call(channel, method, streaming, HEADER)
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED
    assert error.details() == JWT_UNSUPPORTED


@pytest.mark.asyncio
async def test_py_spiffe_jwt_fetch_reports_unimplemented(
    server: WorkloadApiServer, open_client: Callable[[], spiffe.WorkloadApiClient]
) -> None:
    client = open_client()
    with pytest.raises(FetchJwtSvidError):
        await asyncio.to_thread(client.fetch_jwt_svid, {"backend"}, None, TIMEOUT)


# --- the socket and the lifecycle -------------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.asyncio
async def test_socket_is_0600_in_a_0700_directory(cache: SecretCache, socket_path: Path) -> None:
    umask_before = current_umask()
    srv = WorkloadApiServer(cache, socket_path)
    await srv.start()
    try:
        mode = socket_path.lstat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
        assert socket_path.lstat().st_uid == os.getuid()
        assert current_umask() == umask_before  # the process umask is restored
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_stop_ends_streams_with_unavailable_and_removes_the_socket(
    cache: SecretCache,
    ca: CaFixture,
    socket_path: Path,
    open_client: Callable[[], spiffe.WorkloadApiClient],
) -> None:
    srv = WorkloadApiServer(cache, socket_path)
    await srv.start()
    try:
        await cache.publish(make_secret(ca))
        stream = ContextStream(open_client())
        try:
            await stream.next_update()
            # Open streams end at once: stop() does not sit out its grace period.
            await asyncio.wait_for(srv.stop(grace=60), timeout=TIMEOUT)
            error = await stream.next_error()
        finally:
            stream.cancel()
    finally:
        await srv.stop()
    # UNAVAILABLE is retried by py-spiffe and go-spiffe (CANCELLED would not be).
    assert isinstance(error, WorkloadApiError)
    assert "UNAVAILABLE" in str(error)
    assert not socket_path.exists()
    assert srv.open_streams == 0


@pytest.mark.asyncio
async def test_x509_source_survives_an_agent_restart(
    cache: SecretCache, ca: CaFixture, socket_path: Path
) -> None:
    first = await cache.publish(make_secret(ca))
    srv = WorkloadApiServer(cache, socket_path)
    await srv.start()
    source = await asyncio.to_thread(
        spiffe.X509Source, socket_path=endpoint(socket_path), timeout_in_seconds=TIMEOUT
    )
    try:
        assert source.get_x509_context().default_svid.leaf == first.leaf
        await srv.stop()
        assert not source.is_closed()  # it retries, still serving the current SVID

        after_restart = await cache.publish(make_secret(ca))
        srv = WorkloadApiServer(cache, socket_path)
        await srv.start()
        await async_until(
            lambda: source.get_x509_context().default_svid.leaf == after_restart.leaf,
            TIMEOUT,
            "the source has the SVID of the restarted agent",
        )
    finally:
        source.close()
        await srv.stop()


@pytest.mark.asyncio
async def test_stale_socket_of_a_dead_agent_is_replaced(
    cache: SecretCache, ca: CaFixture, socket_path: Path
) -> None:
    socket_path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(socket_path))
    dead.close()  # the file stays; nobody listens
    srv = WorkloadApiServer(cache, socket_path)
    await srv.start()
    try:
        await cache.publish(make_secret(ca))
        with spiffe.WorkloadApiClient(endpoint(socket_path)) as client:
            svid = await asyncio.to_thread(client.fetch_x509_svid, TIMEOUT)
        assert str(svid.spiffe_id) == str(WEB)
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_socket_of_a_live_server_is_not_taken_over(
    cache: SecretCache, socket_path: Path
) -> None:
    socket_path.parent.mkdir(mode=0o700)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        live.bind(str(socket_path))
        live.listen()
        inode = socket_path.lstat().st_ino
        with pytest.raises(AddressInUse, match="in use"):
            await WorkloadApiServer(cache, socket_path).start()
        assert socket_path.lstat().st_ino == inode
    finally:
        live.close()


@pytest.mark.asyncio
async def test_path_that_is_not_a_socket_is_refused(cache: SecretCache, socket_path: Path) -> None:
    socket_path.parent.mkdir(mode=0o700)
    socket_path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        await WorkloadApiServer(cache, socket_path).start()
    assert socket_path.read_text() == "not a socket"


@pytest.mark.asyncio
async def test_socket_directory_that_cannot_be_made_is_refused(
    cache: SecretCache, socket_path: Path
) -> None:
    socket_path.parent.write_text("a file where the directory should be")
    with pytest.raises(ConfigError, match="cannot create the Workload API socket directory"):
        await WorkloadApiServer(cache, socket_path).start()


@pytest.mark.asyncio
async def test_too_long_socket_path_is_refused(cache: SecretCache, tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120) / "socket"
    with pytest.raises(ConfigError, match="too long"):
        await WorkloadApiServer(cache, path).start()


@pytest.mark.asyncio
async def test_logs_connections_but_never_key_material(
    server: WorkloadApiServer,
    cache: SecretCache,
    ca: CaFixture,
    open_client: Callable[[], spiffe.WorkloadApiClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG", logger="meshtrust.agent")
    secret = await cache.publish(make_secret(ca))
    await asyncio.to_thread(open_client().fetch_x509_svid, TIMEOUT)
    await async_until(
        lambda: server.open_streams == 0, TIMEOUT, "the one-shot fetch's stream closed"
    )
    assert "client connected: FetchX509SVID" in caplog.text
    key_der = secret.key_der()
    for rendering in (secret.key_pem().decode(), key_der.hex(), repr(key_der)):
        assert rendering not in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_leaf_fixture_is_a_valid_svid(ca: CaFixture) -> None:
    # Sanity check of the fixture the tests above rely on: py-spiffe's strict parser takes it.
    secret = make_secret(ca)
    svid = spiffe.X509Svid.parse_raw(secret.chain_der(), secret.key_der())
    assert str(svid.spiffe_id) == str(WEB)
    assert svid.leaf == secret.leaf
