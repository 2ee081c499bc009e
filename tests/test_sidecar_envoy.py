"""Two real Envoy sidecars on one machine, configured by :mod:`meshtrust.envoy.sidecar`.

The "apps" are tiny asyncio HTTP/TCP servers and clients written here. A call goes
client app -> client sidecar (outbound port, plain text) -> mTLS -> server sidecar (inbound
port) -> server app. Each sidecar gets its certificates from its own in-process SDS server,
and its inbound listener from an LDS file that the tests rewrite, as the agent does when
policy changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import pytest_asyncio

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.sds import SdsServer
from meshtrust.clock import SystemClock
from meshtrust.envoy import EnvoyProcess
from meshtrust.envoy.sidecar import (
    SidecarConfig,
    Upstream,
    inbound_listeners,
    inbound_stat_prefix,
    outbound_cluster_name,
    sidecar_bootstrap,
    sidecar_envoy_args,
    write_lds_file,
)
from meshtrust.policy import load_policy_files
from meshtrust.policy.model import InboundPolicy, MtlsMode, Protocol
from meshtrust.spiffe import SpiffeId
from tests.badcerts import CaFixture, Leaf, cert_pem, make_ca, svid_leaf
from tests.envoy_helpers import WAIT
from tests.processes import free_port
from tests.waiting import eventually

pytestmark = pytest.mark.slow

SERVER_ID = SpiffeId.parse("spiffe://example.org/ns/default/sa/server")
CLIENT_ID = SpiffeId.parse("spiffe://example.org/ns/default/sa/client")
OTHER_ID = SpiffeId.parse("spiffe://example.org/ns/default/sa/other")
OPS_ID = SpiffeId.parse("spiffe://example.org/ns/default/sa/ops")
FORGED_XFCC = "URI=spiffe://example.org/ns/default/sa/admin"

#: What a client sees when Envoy refuses its connection (TLS alert, reset or plain close).
REFUSED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, EOFError)


# --- tiny apps ----------------------------------------------------------------------------------


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, list[str]]]:
    head = await reader.readuntil(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return first, headers


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, list[str]]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", [""])[0].lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return body
            body += chunk[:-2]
    length = int(headers.get("content-length", ["0"])[0])
    return await reader.readexactly(length)


class _App:
    """An asyncio server on 127.0.0.1:<any port> whose connection handlers end with it
    (Python 3.11's ``Server.wait_closed`` does not wait for them)."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class EchoHttpApp(_App):
    """An HTTP/1.1 keep-alive server that answers every request 200 with JSON: the path and
    every ``x-forwarded-client-cert`` value it received."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            first, headers = await _read_head(reader)
            await _read_body(reader, headers)
            xfcc = headers.get("x-forwarded-client-cert", [])
            seen = {"path": first.split(" ")[1], "xfcc": xfcc}
            self.requests.append(seen)
            body = json.dumps(seen).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()


class EchoTcpApp(_App):
    """A TCP server that sends back every byte it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()


class EchoH2App(_App):
    """An HTTP/2 (h2c, prior knowledge) server, as a gRPC app is: answers every stream 200
    with JSON holding the ``x-forwarded-client-cert`` it received."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, str]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(_h2_config(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
                    headers = _h2_headers(event.headers)
                    self.requests.append(headers)
                    body = json.dumps({"xfcc": headers.get("x-forwarded-client-cert")}).encode()
                    conn.send_headers(
                        event.stream_id, [(":status", "200"), ("content-length", str(len(body)))]
                    )
                    conn.send_data(event.stream_id, body, end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()


def _h2_headers(headers: Sequence[tuple[bytes | str, bytes | str]] | None) -> dict[str, str]:
    def text(value: bytes | str) -> str:
        return value.decode() if isinstance(value, bytes) else value

    return {text(k): text(v) for k, v in headers or []}


def _h2_config(*, client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")


async def h2c_get(port: int, headers: Mapping[str, str]) -> tuple[int, bytes]:
    """One HTTP/2 request in plain text with prior knowledge (how gRPC talks to a sidecar)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(_h2_config(client_side=True))
    conn.initiate_connection()
    request = [(":method", "GET"), (":path", "/h2"), (":scheme", "http"), (":authority", "app")]
    conn.send_headers(1, request + list(headers.items()), end_stream=True)
    writer.write(conn.data_to_send())
    status, body = 0, b""
    try:
        async with asyncio.timeout(WAIT):
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(_h2_headers(event.headers)[":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data or b""
                        conn.acknowledge_received_data(event.flow_controlled_length or 0, 1)
                    elif isinstance(event, h2.events.StreamEnded):
                        return status, body
                writer.write(conn.data_to_send())
        raise ConnectionError("the connection closed before the response ended")
    finally:
        writer.close()


class HttpConnection:
    """One HTTP/1.1 keep-alive client connection (plain or TLS) that shows exactly what the
    server does: every response with its headers, and whether the server closed after it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext | None = None) -> HttpConnection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="" if context else None
            ),
            WAIT,
        )
        return cls(reader, writer)

    async def get(self, path: str = "/", headers: Mapping[str, str] | None = None) -> HttpResponse:
        lines = [f"GET {path} HTTP/1.1", "host: app"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()

        async def read() -> HttpResponse:
            first, response_headers = await _read_head(self.reader)
            body = await _read_body(self.reader, response_headers)
            return HttpResponse(int(first.split(" ")[1]), response_headers, body)

        return await asyncio.wait_for(read(), WAIT)

    async def closed_by_server(self, timeout: float = WAIT) -> bool:
        """True if the server closes the connection within ``timeout`` seconds (EOF)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except TimeoutError:
            return False
        except REFUSED:
            return True
        assert data == b"", f"unexpected bytes from the server: {data!r}"
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(*REFUSED, ssl.SSLError):
            await self.writer.wait_closed()


async def http_get_once(
    port: int, context: ssl.SSLContext | None = None, headers: Mapping[str, str] | None = None
) -> HttpResponse:
    """One request on a fresh connection."""
    conn = await HttpConnection.open(port, context)
    try:
        return await conn.get(headers=headers)
    finally:
        await conn.close()


# --- sidecars -----------------------------------------------------------------------------------


def tls_client_context(ca: CaFixture, client: Leaf | None, workdir: Path) -> ssl.SSLContext:
    """A TLS client trusting ``ca``'s root, presenting ``client`` (or no certificate)."""
    context = ssl.create_default_context(cadata=cert_pem(ca.root).decode())
    context.check_hostname = False  # an SVID names a SPIFFE ID, not a host
    if client is not None:
        directory = Path(tempfile.mkdtemp(dir=workdir))
        (directory / "chain.pem").write_bytes(client.chain_pem)
        (directory / "key.pem").write_bytes(client.key_pem)
        context.load_cert_chain(directory / "chain.pem", directory / "key.pem")
    return context


@dataclass
class Sidecar:
    """A running sidecar: its SDS server (own secret cache) and its Envoy."""

    config: SidecarConfig
    envoy: EnvoyProcess
    sds: SdsServer
    lds_path: Path
    version: int = 1

    async def apply(self, policy: InboundPolicy) -> None:
        """Rewrite the LDS file for ``policy`` and wait until Envoy runs it."""
        self.version += 1
        version = str(self.version)
        write_lds_file(self.lds_path, inbound_listeners(self.config, policy), version)
        await eventually(
            lambda: self.stat("listener_manager.lds.version_text"), lambda v: v == f'"{version}"'
        )
        await eventually(
            lambda: self.stat("listener_manager.total_listeners_warming"), lambda v: v == "0"
        )

    async def stats(self) -> dict[str, str]:
        text = await asyncio.to_thread(self.envoy.admin_get, "/stats")
        out = {}
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            out[key] = value
        return out

    async def stat(self, name: str) -> str | None:
        return (await self.stats()).get(name)

    async def counter(self, name: str) -> int:
        value = await self.stat(name)
        return int(value) if value is not None else 0

    @property
    def prefix(self) -> str:
        return inbound_stat_prefix(self.config)


@dataclass
class Mesh:
    ca: CaFixture
    workdir: Path
    stack: contextlib.AsyncExitStack
    now: dt.datetime

    def leaf(self, identity: SpiffeId) -> Leaf:
        return svid_leaf(self.ca.signer, identity, now=self.now)

    def tls(self, identity: SpiffeId | None) -> ssl.SSLContext:
        """A TLS client context with ``identity``'s certificate (None: no certificate)."""
        leaf = self.leaf(identity) if identity is not None else None
        return tls_client_context(self.ca, leaf, self.workdir)

    async def sidecar(
        self,
        config: SidecarConfig,
        identity: SpiffeId,
        policy: InboundPolicy,
        *,
        drain_time_s: int | None = None,
    ) -> Sidecar:
        """Start ``config``'s sidecar serving ``identity``'s certificate with ``policy``."""
        directory = self.workdir / config.name
        (directory / "lds").mkdir(parents=True)
        leaf = self.leaf(identity)
        cache = SecretCache()
        await cache.publish(
            WorkloadSecret(identity, leaf.key, tuple(leaf.chain), (self.ca.root,), self.now)
        )
        sds = SdsServer(cache, directory / "sds.sock")
        await sds.start()
        self.stack.push_async_callback(sds.stop)
        lds_path = directory / "lds" / "listeners.json"
        write_lds_file(lds_path, inbound_listeners(config, policy), "1")
        bootstrap = sidecar_bootstrap(
            config,
            sds_socket=sds.socket_path,
            lds_path=lds_path,
            node_id=f"sidecar~127.0.0.1~{config.name}.{config.namespace}~local",
            admin_socket=directory / "admin.sock",
        )
        envoy = EnvoyProcess(
            bootstrap,
            directory,
            name=config.name,
            extra_args=sidecar_envoy_args()
            if drain_time_s is None
            else sidecar_envoy_args(drain_time_s=drain_time_s),
        )
        envoy.start()
        self.stack.callback(envoy.stop)
        await asyncio.to_thread(envoy.wait_ready, 60)
        return Sidecar(config, envoy, sds, lds_path)

    async def http_app(self) -> tuple[EchoHttpApp, int]:
        app = EchoHttpApp()
        port = await app.start()
        self.stack.push_async_callback(app.stop)
        return app, port

    async def h2_app(self) -> tuple[EchoH2App, int]:
        app = EchoH2App()
        port = await app.start()
        self.stack.push_async_callback(app.stop)
        return app, port

    async def tcp_app(self) -> tuple[EchoTcpApp, int]:
        app = EchoTcpApp()
        port = await app.start()
        self.stack.push_async_callback(app.stop)
        return app, port


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: SDS sockets live here and Unix socket paths are limited to 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="sidecar-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest_asyncio.fixture
async def mesh(workdir: Path) -> AsyncIterator[Mesh]:
    async with contextlib.AsyncExitStack() as stack:
        now = SystemClock().now()  # real time: Envoy checks validity against its own clock
        yield Mesh(make_ca("example.org", now=now), workdir, stack, now)


@dataclass
class HttpPair:
    """server app <- server sidecar (inbound) <- client sidecar (outbound ports)."""

    app: EchoHttpApp
    server: Sidecar
    client: Sidecar

    def outbound(self, name: str = "server") -> int:
        (upstream,) = [u for u in self.client.config.upstreams if u.name == name]
        return upstream.local_port


async def http_pair(mesh: Mesh, mode: MtlsMode) -> HttpPair:
    app, app_port = await mesh.http_app()
    server_config = SidecarConfig(name="server", app_port=app_port, inbound_port=free_port())
    server = await mesh.sidecar(server_config, SERVER_ID, InboundPolicy(mode))
    inbound = f"127.0.0.1:{server_config.inbound_port}"
    client_config = SidecarConfig(
        name="client",
        app_port=free_port(),
        inbound_port=free_port(),
        upstreams=(
            Upstream("server", free_port(), inbound, SERVER_ID),
            # The same peer, but this upstream expects somebody else.
            Upstream("impostor", free_port(), inbound, OTHER_ID),
        ),
    )
    client = await mesh.sidecar(client_config, CLIENT_ID, InboundPolicy(MtlsMode.STRICT))
    return HttpPair(app, server, client)


def http_rbac_deny(principal: SpiffeId) -> dict[str, Any]:
    """A hand-made HTTP RBAC filter denying every request from ``principal``."""
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "DENY",
                "policies": {
                    "deny-client": {
                        "permissions": [{"any": True}],
                        "principals": [
                            {"authenticated": {"principal_name": {"exact": str(principal)}}}
                        ],
                    }
                },
            },
        },
    }


def network_rbac_deny(principal: SpiffeId, stat_prefix: str) -> dict[str, Any]:
    """A hand-made network RBAC filter closing every connection from ``principal``."""
    return {
        "name": "envoy.filters.network.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
            "stat_prefix": stat_prefix,
            "rules": {
                "action": "DENY",
                "policies": {
                    "deny-client": {
                        "permissions": [{"any": True}],
                        "principals": [
                            {"authenticated": {"principal_name": {"exact": str(principal)}}}
                        ],
                    }
                },
            },
        },
    }


def xfcc_uris(values: Sequence[str]) -> list[str]:
    """The ``URI=`` elements of x-forwarded-client-cert header values."""
    return [
        part.split("=", 1)[1]
        for value in values
        for element in value.split(",")
        for part in element.split(";")
        if part.startswith("URI=")
    ]


async def refused(call: Callable[[], Awaitable[object]]) -> bool:
    try:
        await call()
    except REFUSED:
        return True
    return False


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_call_through_both_sidecars_carries_the_callers_identity(mesh: Mesh) -> None:
    pair = await http_pair(mesh, MtlsMode.STRICT)
    conn = await HttpConnection.open(pair.outbound())
    try:
        for path in ("/first", "/second"):  # two requests on the app's keep-alive connection
            response = await conn.get(path, {"x-forwarded-client-cert": FORGED_XFCC})
            assert response.status == 200
            seen = response.json()
            assert seen["path"] == path
            # Exactly one XFCC value: Envoy's, naming the client; the forged one is gone.
            (xfcc,) = seen["xfcc"]
            assert xfcc_uris([xfcc]) == [str(CLIENT_ID)]
            assert "sa/admin" not in xfcc
            assert f"By={SERVER_ID}" in xfcc
    finally:
        await conn.close()
    assert len(pair.app.requests) == 2
    # The two requests shared one pooled mTLS connection between the sidecars.
    cluster = outbound_cluster_name(pair.client.config.upstreams[0])
    assert await pair.client.counter(f"cluster.{cluster}.upstream_cx_total") == 1
    assert await pair.client.counter(f"cluster.{cluster}.ssl.handshake") == 1


@pytest.mark.asyncio
async def test_http2_through_both_sidecars(mesh: Mesh) -> None:
    """HTTP/2 callers (gRPC) reach an HTTP/2 app as HTTP/2: the sidecars speak whatever
    HTTP version the caller spoke, with the caller's identity in XFCC."""
    app, app_port = await mesh.h2_app()
    server_config = SidecarConfig(name="grpc", app_port=app_port, inbound_port=free_port())
    await mesh.sidecar(server_config, SERVER_ID, InboundPolicy(MtlsMode.STRICT))
    upstream = Upstream("grpc", free_port(), f"127.0.0.1:{server_config.inbound_port}", SERVER_ID)
    client_config = SidecarConfig(
        name="client", app_port=free_port(), inbound_port=free_port(), upstreams=(upstream,)
    )
    client = await mesh.sidecar(client_config, CLIENT_ID, InboundPolicy(MtlsMode.STRICT))

    status, body = await h2c_get(upstream.local_port, {"x-forwarded-client-cert": FORGED_XFCC})
    assert status == 200
    assert xfcc_uris([json.loads(body)["xfcc"]]) == [str(CLIENT_ID)]
    assert len(app.requests) == 1
    cluster = outbound_cluster_name(upstream)
    assert await client.counter(f"cluster.{cluster}.upstream_cx_http2_total") == 1


@pytest.mark.asyncio
async def test_strict_refuses_plain_text_and_tls_without_client_certificate(mesh: Mesh) -> None:
    pair = await http_pair(mesh, MtlsMode.STRICT)
    port = pair.server.config.inbound_port
    prefix = f"listener.{pair.server.prefix}"

    assert await refused(lambda: http_get_once(port))
    await eventually(
        lambda: pair.server.counter(f"{prefix}.no_filter_chain_match"), lambda n: n >= 1
    )

    assert await refused(lambda: http_get_once(port, mesh.tls(None)))
    await eventually(
        lambda: pair.server.counter(f"{prefix}.ssl.fail_verify_no_cert"), lambda n: n >= 1
    )

    stranger = make_ca("example.org", now=mesh.now)
    foreign = tls_client_context(
        mesh.ca, svid_leaf(stranger.signer, CLIENT_ID, now=mesh.now), mesh.workdir
    )
    assert await refused(lambda: http_get_once(port, foreign))
    await eventually(
        lambda: pair.server.counter(f"{prefix}.ssl.fail_verify_error"), lambda n: n >= 1
    )
    assert pair.app.requests == []

    # mTLS with a certificate from the mesh's CA is answered, with the caller's identity.
    response = await http_get_once(
        port, mesh.tls(CLIENT_ID), {"x-forwarded-client-cert": FORGED_XFCC}
    )
    assert response.status == 200
    assert xfcc_uris(response.json()["xfcc"]) == [str(CLIENT_ID)]


@pytest.mark.asyncio
async def test_permissive_accepts_plain_text_and_mtls(mesh: Mesh) -> None:
    pair = await http_pair(mesh, MtlsMode.PERMISSIVE)
    port = pair.server.config.inbound_port

    plain = await http_get_once(port, headers={"x-forwarded-client-cert": FORGED_XFCC})
    assert plain.status == 200
    assert plain.json()["xfcc"] == []  # plain text: no identity, and the forged one is dropped

    via_sidecar = await http_get_once(
        pair.outbound(), headers={"x-forwarded-client-cert": FORGED_XFCC}
    )
    assert via_sidecar.status == 200
    assert xfcc_uris(via_sidecar.json()["xfcc"]) == [str(CLIENT_ID)]

    # TLS without a client certificate is neither mTLS nor plain text.
    assert await refused(lambda: http_get_once(port, mesh.tls(None)))
    assert len(pair.app.requests) == 2


@pytest.mark.asyncio
async def test_disable_serves_plain_text_only(mesh: Mesh) -> None:
    pair = await http_pair(mesh, MtlsMode.DISABLE)
    port = pair.server.config.inbound_port
    plain = await http_get_once(port, headers={"x-forwarded-client-cert": FORGED_XFCC})
    assert (plain.status, plain.json()["xfcc"]) == (200, [])
    assert await refused(lambda: http_get_once(port, mesh.tls(CLIENT_ID)))
    # The client sidecar insists on mTLS: its call fails (503 to its app), nothing is sent.
    assert (await http_get_once(pair.outbound())).status == 503
    assert len(pair.app.requests) == 1


@pytest.mark.asyncio
async def test_upstream_presenting_another_spiffe_id_is_refused(mesh: Mesh) -> None:
    pair = await http_pair(mesh, MtlsMode.STRICT)
    impostor = pair.client.config.upstreams[1]
    assert impostor.spiffe_id == OTHER_ID

    response = await http_get_once(pair.outbound("impostor"))
    assert response.status == 503
    assert pair.app.requests == []
    cluster = outbound_cluster_name(impostor)
    assert await pair.client.counter(f"cluster.{cluster}.ssl.fail_verify_san") >= 1
    # The same peer through the upstream that expects its real identity works.
    assert (await http_get_once(pair.outbound())).status == 200


@pytest.mark.asyncio
async def test_http_rbac_change_applies_live_and_keeps_connections(mesh: Mesh) -> None:
    pair = await http_pair(mesh, MtlsMode.STRICT)
    server = pair.server
    pid = server.envoy.pid
    port = server.config.inbound_port
    deny = http_rbac_deny(CLIENT_ID)

    # A long-lived mTLS keep-alive connection, opened before any change.
    early = await HttpConnection.open(port, mesh.tls(CLIENT_ID))
    try:
        assert (await early.get("/before")).status == 200

        await server.apply(InboundPolicy(MtlsMode.STRICT, (deny,)))
        assert await server.counter("listener_manager.listener_in_place_updated") == 1

        # New connections are judged by the new policy, through the sidecars or directly.
        denied = await http_get_once(pair.outbound())
        assert (denied.status, denied.body) == (403, b"RBAC: access denied")
        assert (await http_get_once(port, mesh.tls(CLIENT_ID))).status == 403
        assert await server.counter(f"http.{server.prefix}.rbac.denied") >= 2

        # The early connection was not reset: it still runs the filter chain it was accepted
        # on; Envoy drains it by answering its next request and then closing it.
        kept = await early.get("/after-deny")
        assert kept.status == 200
        assert kept.header("connection") == "close"
        assert await early.closed_by_server()
    finally:
        await early.close()

    # Removing the rule: a fresh keep-alive connection is refused, then allowed.
    late = await HttpConnection.open(port, mesh.tls(CLIENT_ID))
    try:
        assert (await late.get()).status == 403
        await server.apply(InboundPolicy(MtlsMode.STRICT))
        assert (await late.get()).status == 403  # drained gracefully, like the early one
        assert await late.closed_by_server()
    finally:
        await late.close()
    assert (await http_get_once(port, mesh.tls(CLIENT_ID))).status == 200
    # Through the client sidecar: the one pooled connection it opened under the DENY rule
    # (in the pool of whichever Envoy worker served that call) gives the old verdict once
    # more if a call lands on it, and closes; every other call is allowed.
    statuses = [(await http_get_once(pair.outbound())).status for _ in range(3)]
    assert statuses.count(403) <= 1 and statuses.count(200) >= 2

    # One process all along, every change in place.
    assert server.envoy.running and server.envoy.pid == pid
    assert await server.counter("listener_manager.listener_in_place_updated") == 2
    assert await server.counter("listener_manager.lds.update_rejected") == 0


@pytest.mark.asyncio
async def test_app_connection_through_sidecar_survives_policy_changes(mesh: Mesh) -> None:
    """The client app's keep-alive connection to its outbound port never notices the
    server's policy changes: the client sidecar re-connects to the server underneath."""
    pair = await http_pair(mesh, MtlsMode.STRICT)
    app_conn = await HttpConnection.open(pair.outbound())
    try:
        assert (await app_conn.get()).status == 200
        await pair.server.apply(InboundPolicy(MtlsMode.STRICT, (http_rbac_deny(CLIENT_ID),)))
        # The pooled upstream connection was accepted on the old chain: its last answer.
        assert (await app_conn.get()).status == 200
        assert (await app_conn.get()).status == 403
        await pair.server.apply(InboundPolicy(MtlsMode.PERMISSIVE))
        assert (await app_conn.get()).status == 403
        statuses = [(await app_conn.get()).status for _ in range(2)]
        assert statuses == [200, 200]
    finally:
        await app_conn.close()


@pytest.mark.asyncio
async def test_mode_changes_apply_live(mesh: Mesh) -> None:
    pair = await http_pair(mesh, MtlsMode.STRICT)
    server = pair.server
    pid = server.envoy.pid
    port = server.config.inbound_port
    mtls = await HttpConnection.open(port, mesh.tls(CLIENT_ID))
    try:
        assert (await mtls.get()).status == 200
        assert await refused(lambda: http_get_once(port))

        # STRICT -> PERMISSIVE only adds the plain-text chain: the TLS chain, and the
        # connections on it, are untouched (no "connection: close").
        await server.apply(InboundPolicy(MtlsMode.PERMISSIVE))
        assert (await http_get_once(port)).status == 200
        response = await mtls.get()
        assert (response.status, response.header("connection")) == (200, None)

        # PERMISSIVE -> STRICT: the same, the plain-text chain goes away.
        await server.apply(InboundPolicy(MtlsMode.STRICT))
        assert await refused(lambda: http_get_once(port))
        response = await mtls.get()
        assert (response.status, response.header("connection")) == (200, None)
        assert await server.counter("listener_manager.listener_in_place_updated") == 2

        # STRICT -> DISABLE replaces the listener (the TLS inspector goes): the old mTLS
        # connection is drained gracefully, plain text is now served and TLS refused.
        await server.apply(InboundPolicy(MtlsMode.DISABLE))
        response = await mtls.get()
        assert (response.status, response.header("connection")) == (200, "close")
        assert await mtls.closed_by_server()
        assert (await http_get_once(port)).status == 200
        assert await refused(lambda: http_get_once(port, mesh.tls(CLIENT_ID)))
    finally:
        await mtls.close()
    assert server.envoy.running and server.envoy.pid == pid
    assert await server.counter("listener_manager.lds.update_rejected") == 0


@pytest.mark.asyncio
async def test_tcp_workload_with_network_rbac(mesh: Mesh) -> None:
    app, app_port = await mesh.tcp_app()
    server_config = SidecarConfig(
        name="db", app_port=app_port, inbound_port=free_port(), protocol=Protocol.TCP
    )
    server = await mesh.sidecar(server_config, SERVER_ID, InboundPolicy(MtlsMode.STRICT))
    upstream = Upstream(
        "db", free_port(), f"127.0.0.1:{server_config.inbound_port}", SERVER_ID, Protocol.TCP
    )
    client_config = SidecarConfig(
        name="client", app_port=free_port(), inbound_port=free_port(), upstreams=(upstream,)
    )
    await mesh.sidecar(client_config, CLIENT_ID, InboundPolicy(MtlsMode.STRICT))
    pid = server.envoy.pid

    async def echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
    ) -> bytes:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(data)), WAIT)

    async def fresh_echo() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", upstream.local_port)
        try:
            return await echo(reader, writer, b"ping")
        finally:
            writer.close()

    early_reader, early_writer = await asyncio.open_connection("127.0.0.1", upstream.local_port)
    try:
        assert await echo(early_reader, early_writer, b"hello") == b"hello"

        deny = network_rbac_deny(CLIENT_ID, "inbound_db")
        await server.apply(InboundPolicy(MtlsMode.STRICT, (deny,)))
        assert await refused(fresh_echo)
        assert await server.counter("inbound_db.rbac.denied") >= 1
        # The connection opened before the change keeps flowing (until the drain time).
        assert await echo(early_reader, early_writer, b"still") == b"still"

        await server.apply(InboundPolicy(MtlsMode.STRICT))
        assert await fresh_echo() == b"ping"
        assert await echo(early_reader, early_writer, b"again") == b"again"
    finally:
        early_writer.close()
    assert server.envoy.pid == pid and server.envoy.running
    assert app.connections >= 2


@pytest.mark.asyncio
async def test_denied_tcp_connection_is_closed_when_the_drain_time_ends(mesh: Mesh) -> None:
    """A raw TCP connection accepted before a DENY keeps flowing while its chain drains, and
    Envoy closes it when the drain time ends: a new DENY reaches every connection in the end.
    """
    _, app_port = await mesh.tcp_app()
    config = SidecarConfig(
        name="db", app_port=app_port, inbound_port=free_port(), protocol=Protocol.TCP
    )
    server = await mesh.sidecar(config, SERVER_ID, InboundPolicy(MtlsMode.STRICT), drain_time_s=1)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", config.inbound_port, ssl=mesh.tls(CLIENT_ID), server_hostname=""
    )
    try:
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), WAIT) == b"before"
        await server.apply(InboundPolicy(MtlsMode.STRICT, (network_rbac_deny(CLIENT_ID, "db"),)))
        writer.write(b"during")
        assert await asyncio.wait_for(reader.readexactly(6), WAIT) == b"during"
        with contextlib.suppress(*REFUSED):
            assert await asyncio.wait_for(reader.read(1), WAIT) == b""
    finally:
        writer.close()
    await eventually(
        lambda: server.stat("listener_manager.total_filter_chains_draining"), lambda v: v == "0"
    )


@pytest.mark.asyncio
async def test_rejected_lds_file_keeps_the_running_listener(mesh: Mesh) -> None:
    """An LDS file Envoy refuses (here: an RBAC regex that does not compile) changes nothing;
    the next good one applies."""
    pair = await http_pair(mesh, MtlsMode.STRICT)
    server = pair.server
    broken = http_rbac_deny(CLIENT_ID)
    rules = broken["typed_config"]["rules"]["policies"]["deny-client"]
    rules["principals"] = [{"authenticated": {"principal_name": {"safe_regex": {"regex": "("}}}}]
    write_lds_file(
        server.lds_path,
        inbound_listeners(server.config, InboundPolicy(MtlsMode.STRICT, (broken,))),
        "2",
    )
    await eventually(
        lambda: server.counter("listener_manager.lds.update_rejected"), lambda n: n == 1
    )
    assert await server.stat("listener_manager.lds.version_text") == '"1"'
    assert (await http_get_once(pair.outbound())).status == 200

    server.version = 2
    await server.apply(InboundPolicy(MtlsMode.STRICT, (http_rbac_deny(CLIENT_ID),)))
    assert await server.stat("listener_manager.lds.version_text") == '"3"'
    assert (await http_get_once(server.config.inbound_port, mesh.tls(CLIENT_ID))).status == 403


ADMIN_ONLY_FOR_OPS = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admin-only-for-ops, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["example.org/ns/default/sa/ops"]}}]
    to: [{operation: {paths: ["/admin*"]}}]
"""


@pytest.mark.asyncio
async def test_istio_policy_compiled_by_the_policy_package(mesh: Mesh) -> None:
    """Istio YAML -> meshtrust.policy -> LDS file -> the running Envoy enforces it."""
    pair = await http_pair(mesh, MtlsMode.PERMISSIVE)
    server = pair.server
    (mesh.workdir / "policies.yaml").write_text(ADMIN_ONLY_FOR_OPS)
    policies = load_policy_files([mesh.workdir / "policies.yaml"])
    policy = policies.inbound_for(server.config.workload(SERVER_ID), trust_domain="example.org")
    assert policy.mode is MtlsMode.STRICT
    await server.apply(policy)

    conn = await HttpConnection.open(pair.outbound())
    try:
        assert (await conn.get("/public")).status == 200
        assert (await conn.get("/admin/users")).status == 403
        assert (await conn.get("/public/../admin")).status == 403  # normalized before RBAC
    finally:
        await conn.close()
    ops = await http_get_once(server.config.inbound_port, mesh.tls(OPS_ID))
    assert ops.status == 200
    # The policy package's DENY filter has rules_stat_prefix "deny_"; Envoy adds a dot.
    assert await server.counter(f"http.{server.prefix}.rbac.deny_.denied") == 2
    assert await refused(lambda: http_get_once(server.config.inbound_port))  # now STRICT
    assert [r["path"] for r in pair.app.requests] == ["/public", "/"]
