"""What our two gRPC servers (the CA's :mod:`meshtrust.ca.server`, the agent's
:mod:`meshtrust.agent.grpc_server`) need from grpclib beyond its public API, in one place.

grpclib (pinned ``<0.5``) leaves four things to its user that we need, and they touch its
internals; ``tests/test_grpclib_compat.py`` fails when an upgrade moves any of them:

* the live connections, to close idle ones on shutdown (``Server._protocol_factory``, the
  ``H2Protocol`` it returns and its ``connection._transport`` / ``connection._connection``);
* the DER of the client certificate, for the SVID rules (``Stream.peer._transport``; the
  public ``Peer.cert()`` gives only the parsed dict);
* HTTP/2 GOAWAY before closing, so a client reconnects without counting a failure;
* a request body that does not decode: grpclib lets the codec's ``DecodeError`` through and
  says a truncated frame with an ``AssertionError``, a compressed one with
  ``NotImplementedError`` (all answered ``UNKNOWN "Internal Server Error"`` with a traceback
  in the log); :func:`recv_request` turns each into :class:`MalformedRequest` (the handler
  answers INVALID_ARGUMENT), a compressed one into :class:`UnsupportedCompression`
  (UNIMPLEMENTED);
* fewer, larger writes: grpclib writes each HTTP/2 step (headers, data, trailers, window
  updates) to the transport at once, which over TLS is one record and one ``send`` each --
  three or four per response. :class:`TrackingServer` hands grpclib a transport that joins
  what is written in one event-loop step into one write (``H2Protocol.connection_made``);
* header bytes that are not ASCII: grpclib decodes headers as ASCII (``Server._h2_config``),
  and h2 raises ``UnicodeDecodeError`` -- not a protocol error grpclib handles -- out of
  ``data_received``, which kills the connection with a "Fatal error" traceback. We decode as
  Latin-1 instead (every byte is a character), so such a header reaches the handler, which
  refuses it like any other bad value.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Iterable
from typing import Any, TypeVar

from google.protobuf.message import DecodeError
from grpclib import GRPCError, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.server import Server, Stream

__all__ = [
    "CoalescingTransport",
    "COMPRESSION_UNSUPPORTED",
    "MalformedRequest",
    "TrackingServer",
    "UnsupportedCompression",
    "abort",
    "goaway_and_close",
    "peer_cert_der",
    "recv_request",
    "transport_of",
]

_Req = TypeVar("_Req")


class MalformedRequest(Exception):
    """The request body is not a message of the method's type; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedCompression(GRPCError):
    """A request message with the compressed flag: we accept none (grpclib implements no
    compression), and the gRPC spec's answer to a compression the server does not support
    is UNIMPLEMENTED. A :class:`GRPCError`, so a handler that does not catch it still
    answers with that status."""

    def __init__(self) -> None:
        super().__init__(Status.UNIMPLEMENTED, COMPRESSION_UNSUPPORTED)


COMPRESSION_UNSUPPORTED = (
    "compressed gRPC messages are not supported; send them uncompressed "
    "(grpc-accept-encoding: identity)"
)


async def recv_request(stream: Stream[_Req, Any]) -> _Req | None:
    """``stream.recv_message()``, raising :class:`MalformedRequest` for a body that is not
    a well-formed message (corrupt protobuf, invalid UTF-8 in a string, nesting past the
    decoder's depth, a truncated gRPC frame) and :class:`UnsupportedCompression` for a
    compressed one."""
    try:
        return await stream.recv_message()
    except DecodeError as exc:
        # "Error parsing message with type 'x': Wire format was corrupt" -> the reason
        raise MalformedRequest(str(exc).rpartition(": ")[2] or "undecodable") from None
    except RecursionError:
        raise MalformedRequest("nested too deeply") from None
    except AssertionError:  # grpclib.stream.recv_message: "Received less data than expected"
        raise MalformedRequest("truncated gRPC message") from None
    except NotImplementedError:  # grpclib.stream.recv_message: a compressed message
        raise UnsupportedCompression() from None


class TrackingServer(Server):
    """grpclib's server, remembering its connections (``protocols``) so that a shutdown can
    close them, and accepting header values that are not ASCII (see the module docs).

    An explicit :class:`ProtoCodec`, so no status-details codec: we never send details, and
    grpclib would import google.rpc (and its descriptors) to offer them.
    """

    def __init__(self, handlers: Collection[Any]) -> None:
        super().__init__(handlers, codec=ProtoCodec())
        self._h2_config.header_encoding = "latin-1"
        self.protocols: set[Any] = set()  # H2Protocol; uvloop transports are not weakref-able

    def _protocol_factory(self) -> Any:
        protocol = super()._protocol_factory()
        made, lost = protocol.connection_made, protocol.connection_lost
        protocols = self.protocols

        def connection_made(transport: Any) -> None:
            # Any transport: uvloop's do not derive from asyncio.Transport.
            made(CoalescingTransport(transport))

        def connection_lost(exc: BaseException | None) -> None:
            protocols.discard(protocol)
            lost(exc)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        protocols.add(protocol)
        return protocol


class CoalescingTransport(asyncio.Transport):
    """``transport``, with the writes of one event-loop step joined into one write.

    Everything else is the real transport's: flow control (it calls the protocol's
    ``pause_writing``), extra info (the peer certificate), closing. ``close()`` writes what
    is buffered first; ``abort()`` drops it.
    """

    def __init__(self, transport: Any) -> None:
        super().__init__()
        # Duck-typed: uvloop's transports have asyncio.Transport's methods, not its class.
        self._transport: asyncio.Transport = transport
        self._buffer: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._buffer:
            asyncio.get_running_loop().call_soon(self._flush)
        self._buffer.append(bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._buffer.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._buffer))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


def transport_of(protocol: Any) -> asyncio.Transport | None:
    """The transport of one of :attr:`TrackingServer.protocols` (None before it connected)."""
    connection = getattr(protocol, "connection", None)
    transport = getattr(connection, "_transport", None)
    return transport if isinstance(transport, asyncio.Transport) else None


def goaway_and_close(protocol: Any) -> None:
    """HTTP/2 GOAWAY (the client reconnects without counting a failure), then close: the
    transport flushes what is buffered (trailers, the GOAWAY) before it closes."""
    transport = transport_of(protocol)
    if transport is None or transport.is_closing():
        return
    h2 = getattr(protocol.connection, "_connection", None)
    if h2 is not None:
        with contextlib.suppress(Exception):  # the connection may already be broken
            h2.close_connection()
            transport.write(h2.data_to_send())
    transport.close()


def abort(protocol: Any) -> None:
    """Drop the connection at once (no TLS close_notify exchange that could take 30 s)."""
    transport = transport_of(protocol)
    if transport is not None:
        transport.abort()


def peer_cert_der(stream: Stream[Any, Any]) -> bytes | None:
    """The DER of the client's certificate on ``stream``, or None (no TLS, no certificate)."""
    transport = getattr(stream.peer, "_transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return der if der else None
