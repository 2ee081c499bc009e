"""The CA on the wire: ``istio.v1.auth.IstioCertificateService`` over gRPC + TLS.

We serve with grpclib on Python's ``ssl`` module rather than grpcio: grpcio's Python server
can only "not request" or "require" a client certificate, while Istio's CA port asks for one
*optionally* (a workload renews with its current certificate, a new one comes with a token).
``ssl.CERT_OPTIONAL`` does exactly that on one port. The cost, measured by
``benchmarks/ca_throughput.py``, is that grpclib's HTTP/2 is pure Python; uvloop and several
worker processes (:mod:`meshtrust.ca.workers`) more than make up for it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Any

from cryptography import x509
from grpclib import GRPCError, Status
from grpclib.server import Stream

from meshtrust.ca.authority import CertificateAuthority, Credentials
from meshtrust.caapi import status_name_for
from meshtrust.caapi.istio import ca_grpc, ca_pb2
from meshtrust.errors import (
    AddressInUse,
    ConfigError,
    LedgerError,
    MeshTrustError,
)
from meshtrust.fileio import load_cert_chain_pem
from meshtrust.grpclib_compat import (
    MalformedRequest,
    TrackingServer,
    UnsupportedCompression,
    abort,
    peer_cert_der,
    recv_request,
)
from meshtrust.pki import PrivateKey, certs_pem, private_key_pem

__all__ = [
    "CaGrpcService",
    "bind_listener",
    "server_ssl_context",
    "status_for",
]

log = logging.getLogger("meshtrust.ca")


def bind_listener(host: str, port: int, *, what: str) -> socket.socket:
    """A listening TCP socket, bound *without* SO_REUSEPORT.

    A second CA on the same port must fail here, at once: with SO_REUSEPORT (grpcio's
    default) two CAs with different keys would silently share the port. Worker processes of
    one CA share this one socket by inheriting it instead.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{what}: cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(
                f"{what}: {host}:{port} is already in use (is another CA running?)"
            ) from exc
        raise ConfigError(f"{what}: cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def server_ssl_context(
    serving_chain: list[x509.Certificate], serving_key: PrivateKey, client_roots_pem: str
) -> ssl.SSLContext:
    """TLS for the CA port: our serving chain, client certificate *optional*, HTTP/2 ALPN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_cert_chain_pem(ctx, certs_pem(serving_chain), private_key_pem(serving_key))
    ctx.load_verify_locations(cadata=client_roots_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["h2"])
    return ctx


def status_for(exc: MeshTrustError) -> Status:
    """The gRPC status for one of our errors, as :mod:`meshtrust.caapi.statuses` maps it."""
    return Status[status_name_for(exc)]


def _bearer(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes) or not value.isascii():
        return ""  # a JWT is ASCII; anything else authenticates as nothing, never echoed
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""  # present but unusable: authenticates as nothing, never echoed
    return token.strip()


def _peer_name(stream: Stream[Any, Any]) -> str:
    addr = stream.peer.addr()
    return f"{addr[0]}:{addr[1]}" if addr else "a local peer"


class CaGrpcService(ca_grpc.IstioCertificateServiceBase):
    """The gRPC handler. Counts in-flight requests so shutdown can drain them."""

    def __init__(self, authority: CertificateAuthority) -> None:
        self._authority = authority
        self.accepting = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def CreateCertificate(  # noqa: N802 (gRPC method name)
        self,
        stream: Stream[ca_pb2.IstioCertificateRequest, ca_pb2.IstioCertificateResponse],
    ) -> None:
        try:
            request = await recv_request(stream)
        except MalformedRequest as exc:
            # The caller's fault: one (throttled) line, never a traceback.
            self._authority.refusals.warning(
                "refused a malformed request from %s: %s", _peer_name(stream), exc.reason
            )
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"the request is not a valid IstioCertificateRequest: {exc.reason}",
            ) from None
        except UnsupportedCompression:
            self._authority.refusals.warning(
                "refused a compressed request from %s (UNIMPLEMENTED)", _peer_name(stream)
            )
            raise
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "empty request")
        if not self.accepting:
            raise GRPCError(Status.UNAVAILABLE, "CA is shutting down; retry another replica")
        creds = Credentials(
            bearer_token=_bearer(stream.metadata.get("authorization") if stream.metadata else None),
            peer_cert_der=peer_cert_der(stream),
        )
        self.in_flight += 1
        self._idle.clear()
        try:
            chain = await self._authority.create_certificate(
                request.csr, request.validity_duration, creds
            )
        except LedgerError as exc:
            raise GRPCError(Status.UNAVAILABLE, f"CA cannot record certificates: {exc}") from exc
        except MeshTrustError as exc:
            raise GRPCError(status_for(exc), str(exc)) from exc
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        await stream.send_message(ca_pb2.IstioCertificateResponse(cert_chain=chain))

    async def drain(self, grace: float) -> bool:
        """Stop taking new requests and wait up to ``grace`` s for in-flight ones to finish."""
        self.accepting = False
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


class GrpcServer(TrackingServer):
    """grpclib's server, plus closing client connections on shutdown.

    grpclib's ``close()`` stops listening and cancels handlers but leaves idle client
    connections (agents keep theirs open between renewals) to whoever owns the loop; we close
    their transports so an in-process shutdown leaves nothing behind.
    """

    async def shutdown(self) -> None:
        self.close()
        await self.wait_closed()
        for protocol in list(self.protocols):
            # abort, not close: nothing is in flight any more, and a TLS close_notify
            # exchange with an idle client could hold the socket open for 30 s.
            abort(protocol)
        await asyncio.sleep(0)  # let the transports run their connection_lost callbacks


async def serve_grpc(
    service: CaGrpcService, sock: socket.socket, ssl_ctx: ssl.SSLContext
) -> GrpcServer:
    server = GrpcServer([service])
    await server.start(sock=sock, ssl=ssl_ctx)
    return server
