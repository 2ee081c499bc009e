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
  in the log); :func:`recv_request` turns each into :class:`MalformedRequest`;
* header bytes that are not ASCII: grpclib decodes headers as ASCII (``Server._h2_config``),
  and h2 raises ``UnicodeDecodeError`` -- not a protocol error grpclib handles -- out of
  ``data_received``, which kills the connection with a "Fatal error" traceback. We decode as
  Latin-1 instead (every byte is a character), so such a header reaches the handler, which
  refuses it like any other bad value.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import Any, TypeVar

from google.protobuf.message import DecodeError
from grpclib.encoding.proto import ProtoCodec
from grpclib.server import Server, Stream

__all__ = [
    "MalformedRequest",
    "TrackingServer",
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


async def recv_request(stream: Stream[_Req, Any]) -> _Req | None:
    """``stream.recv_message()``, raising :class:`MalformedRequest` for a body that is not
    a well-formed message (corrupt protobuf, invalid UTF-8 in a string, nesting past the
    decoder's depth, a truncated or compressed gRPC frame)."""
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
        raise MalformedRequest("compressed messages are not accepted") from None


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
        lost = protocol.connection_lost
        protocols = self.protocols

        def connection_lost(exc: BaseException | None) -> None:
            protocols.discard(protocol)
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        protocols.add(protocol)
        return protocol


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
