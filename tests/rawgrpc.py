"""gRPC calls with arbitrary bytes where a client library would refuse to send them: raw
HTTP/2 (h2, which grpclib is built on) over TLS or a Unix socket, for attack tests.

:class:`RawConnection` keeps one HTTP/2 connection for several calls, so a test can check
that a bad request leaves the connection usable for the next one."""

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
    body: bytes = b""  # the response's DATA, gRPC-framed as sent


def grpc_frame(body: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return b"\x00" + struct.pack(">I", len(body)) + body


class ConnectionClosed(ConnectionError):
    """The server ended the connection (or reset the stream) without a gRPC status."""


class RawConnection:
    """One HTTP/2 connection to ``address``: HOST:PORT (TLS, verified with ``root_pem``) or
    ``unix:PATH`` (plain). Use :meth:`open`, then :meth:`call` any number of times."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        self._conn.initiate_connection()
        self._writer.write(self._conn.data_to_send())
        self.terminated = False  # the server sent GOAWAY

    @classmethod
    async def open(cls, address: str, root_pem: bytes | None) -> RawConnection:
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
        return cls(reader, writer)

    async def call(
        self,
        body: bytes,
        *,
        authorization: bytes | None = None,
        path: str = CREATE_CERTIFICATE,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> RawReply:
        """POST ``body`` (already framed, or not: it is sent as given) to ``path`` on a new
        stream, with an ``authorization`` header of arbitrary bytes; returns the status and
        message of the trailers (or of a trailers-only response) and the response body.
        Raises :class:`ConnectionClosed` when there is none."""
        conn = self._conn
        stream_id = conn.get_next_available_stream_id()
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
        conn.send_headers(stream_id, request_headers)
        conn.send_data(stream_id, body, end_stream=True)
        self._writer.write(conn.data_to_send())
        status: int | None = None
        message = ""
        data = bytearray()
        while status is None:
            chunk = await asyncio.wait_for(self._reader.read(65536), 10)
            if not chunk:
                raise ConnectionClosed("the server closed the connection without a gRPC status")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.terminated = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    raise ConnectionClosed(f"the server reset the stream ({event.error_code!r})")
                elif (
                    isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived)
                    and event.stream_id == stream_id
                ):
                    fields = dict(event.headers)
                    if b"grpc-status" in fields:
                        status = int(fields[b"grpc-status"])
                        message = fields.get(b"grpc-message", b"").decode()
            self._writer.write(conn.data_to_send())
        return RawReply(status, message, bytes(data))

    async def close(self) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 5)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass


async def raw_call(
    address: str,
    root_pem: bytes | None,
    body: bytes,
    *,
    authorization: bytes | None = None,
    path: str = CREATE_CERTIFICATE,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> RawReply:
    """One :meth:`RawConnection.call` on a connection of its own."""
    connection = await RawConnection.open(address, root_pem)
    try:
        return await connection.call(body, authorization=authorization, path=path, headers=headers)
    finally:
        await connection.close()
