"""A gRPC call with arbitrary bytes where a client library would refuse to send them: raw
HTTP/2 (h2, which grpclib is built on) over TLS, for attack tests of the CA."""

from __future__ import annotations

import asyncio
import ssl
import struct
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"


@dataclass(frozen=True)
class RawReply:
    status: int  # grpc-status
    message: str  # grpc-message


def grpc_frame(body: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return b"\x00" + struct.pack(">I", len(body)) + body


async def raw_call(
    address: str,
    root_pem: bytes | None,
    body: bytes,
    *,
    authorization: bytes | None = None,
    path: str = CREATE_CERTIFICATE,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> RawReply:
    """POST ``body`` (already framed, or not: it is sent as given) to ``path`` with an
    ``authorization`` header of arbitrary bytes; returns the trailers' status and message.

    ``address`` is HOST:PORT (TLS, verified with ``root_pem``) or ``unix:PATH`` (plain)."""
    if address.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(address.removeprefix("unix:"))
    else:
        assert root_pem is not None
        host, port = address.rsplit(":", 1)
        context = ssl.create_default_context(cadata=root_pem.decode())
        context.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=context, server_hostname="localhost"
        )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    request_headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", path.encode()),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *headers,
    ]
    if authorization is not None:
        request_headers.append((b"authorization", authorization))
    conn.send_headers(1, request_headers)
    conn.send_data(1, body, end_stream=True)
    writer.write(conn.data_to_send())
    status: int | None = None
    message = ""
    try:
        while status is None:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                raise ConnectionError("the CA closed the connection without a gRPC status")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    fields = dict(event.headers)
                    if b"grpc-status" in fields:
                        status = int(fields[b"grpc-status"])
                        message = fields.get(b"grpc-message", b"").decode()
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    return RawReply(status, message)
