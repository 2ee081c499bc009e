"""meshtrust.grpclib_compat against the installed grpclib: fails when an upgrade moves the
internals both our servers rely on (see that module's docstring)."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import grpclib.protocol
import grpclib.stream
import h2.config
import pytest
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Cardinality, Handler
from grpclib.encoding.proto import ProtoCodec
from grpclib.server import Server, Stream

from meshtrust.caapi.istio import ca_pb2
from meshtrust.grpclib_compat import (
    MalformedRequest,
    TrackingServer,
    goaway_and_close,
    peer_cert_der,
    recv_request,
    transport_of,
)

PATH = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
Request, Response = ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse


@pytest.mark.asyncio  # grpclib's Server takes the running loop
async def test_the_grpclib_internals_we_use_are_there() -> None:
    assert inspect.signature(Server._protocol_factory).parameters.keys() == {"self"}
    server = Server([], codec=ProtoCodec())
    assert isinstance(server._h2_config, h2.config.H2Configuration)
    assert server._h2_config.header_encoding == "ascii"  # what TrackingServer changes
    assert "self._transport = transport" in inspect.getsource(grpclib.protocol.Peer.__init__)
    connection_init = inspect.getsource(grpclib.protocol.Connection.__init__)
    assert "self._transport = transport" in connection_init
    assert "self._connection = connection" in connection_init
    # The exceptions recv_request translates.
    recv = inspect.getsource(grpclib.stream.recv_message)
    assert "assert len(message_bin) == message_len" in recv
    assert "raise NotImplementedError" in recv


class _Calls:
    def __init__(self) -> None:
        self.streams: list[Stream[Any, Any]] = []
        self.malformed: list[str] = []

    async def create(self, stream: Stream[Any, Any]) -> None:
        self.streams.append(stream)
        try:
            request = await recv_request(stream)
        except MalformedRequest as exc:
            self.malformed.append(exc.reason)
            await stream.send_message(Response())
            return
        assert request is not None
        await stream.send_message(Response(cert_chain=[request.csr]))

    def __mapping__(self) -> dict[str, Handler]:
        return {PATH: Handler(self.create, Cardinality.UNARY_UNARY, Request, Response)}


@pytest.mark.asyncio
async def test_tracking_server_sees_closes_and_forgets_its_connections(tmp_path: Path) -> None:
    calls = _Calls()
    server = TrackingServer([calls])
    sock = str(tmp_path / "s.sock")
    await server.start(path=sock)
    channel = Channel(path=sock, codec=ProtoCodec())
    try:
        reply = await UnaryUnaryMethod(channel, PATH, Request, Response)(Request(csr="hello"))
        assert reply.cert_chain == ["hello"]
        (protocol,) = server.protocols
        assert isinstance(transport_of(protocol), asyncio.Transport)
        assert peer_cert_der(calls.streams[0]) is None  # no TLS on this socket

        goaway_and_close(protocol)
        for _ in range(100):
            if not server.protocols:
                break
            await asyncio.sleep(0.01)
        assert server.protocols == set()
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # let the closed transports run connection_lost


class _RawBytes(ProtoCodec):
    """Sends the request bytes as they are (a codec grpclib lets us plug in)."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message if isinstance(message, bytes) else super().encode(message, message_type)


@pytest.mark.asyncio
async def test_recv_request_names_what_is_wrong_with_a_body(tmp_path: Path) -> None:
    calls = _Calls()
    server = TrackingServer([calls])
    sock = str(tmp_path / "s.sock")
    await server.start(path=sock)
    channel = Channel(path=sock, codec=_RawBytes())
    try:
        method = UnaryUnaryMethod(channel, PATH, bytes, Response)
        await method(b"\xff\xff")
        await method(b"\x0a\x02\xc3\x28")
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # let the closed transports run connection_lost
    assert calls.malformed == ["Wire format was corrupt", "String field had bad UTF-8"]


@pytest.mark.asyncio
async def test_coalescing_transport_joins_one_steps_writes_and_flushes_on_close() -> None:
    import socket as socket_module

    from meshtrust.grpclib_compat import CoalescingTransport

    ours, theirs = socket_module.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    coalescing = CoalescingTransport(transport)
    reader, writer = await asyncio.open_connection(sock=theirs)
    try:
        for part in (b"headers|", b"data|", b"trailers"):
            coalescing.write(part)
        assert coalescing.get_write_buffer_size() == len(b"headers|data|trailers")
        await asyncio.sleep(0)  # one step later, one write
        assert coalescing.get_write_buffer_size() == 0
        assert await reader.readexactly(21) == b"headers|data|trailers"

        coalescing.write(b"goaway")
        coalescing.close()  # what is buffered goes out before the close
        assert await reader.read() == b"goaway"
        assert coalescing.is_closing()
    finally:
        writer.close()
        await asyncio.sleep(0.01)
