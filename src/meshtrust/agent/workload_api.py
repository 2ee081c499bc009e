"""The SPIFFE Workload API on a Unix socket, served from the agent's secret cache.

Theory of operation
-------------------
One grpclib server (:class:`~meshtrust.agent.grpc_server.UnixGrpcServer`) listens on
``unix:<socket_path>``; the socket is 0600 so only the agent's own user can connect. Every
call must carry the metadata ``workload.spiffe.io: true`` exactly once (SPIFFE Workload
Endpoint spec); without it the call ends with INVALID_ARGUMENT.

``FetchX509SVID`` and ``FetchX509Bundles`` are server streams. Each waits on the cache for a
generation newer than the one it last handled (``SecretCache.wait_newer``, no polling),
builds a *complete* response and sends it. Nothing is sent before the first secret exists,
and a secret that could not make a complete response is skipped: py-spiffe closes an
``X509Source`` for good on a response it cannot parse, so a half-formed answer would be
worse than a late one. ``FetchX509Bundles`` only sends when the trusted roots change (a leaf
rotation does not change them).

An expired certificate is never handed out anew (:mod:`meshtrust.agent.handout` decides):
a ``FetchX509SVID`` call that would start with an expired SVID ends at once with UNAVAILABLE
and the refusal's message (which identity, expired when, the CA's last error) -- a status
py-spiffe and go-spiffe retry, so an ``X509Source`` gets the fresh SVID once the CA is back.
A stream that already holds an SVID keeps it: nothing is sent, and nothing ends, when it
expires; the next fresh one is pushed as a rotation. Bundles are not the workload's
certificate: ``FetchX509Bundles`` keeps serving them while any root is valid.

:meth:`WorkloadApiServer.stop` first ends every open stream with UNAVAILABLE ("shutting
down"): a status py-spiffe and go-spiffe retry, unlike CANCELLED or INVALID_ARGUMENT after
which py-spiffe gives up. Then it stops the gRPC server and removes the socket.

The messages and the descriptor pool
------------------------------------
The Workload API proto has no package, so its message names (``X509SVIDResponse``, ...) are
global. py-spiffe registers the very same names in protobuf's *default* descriptor pool, from
a file of another name, and protobuf refuses the second registration ("duplicate symbol")
whichever module is imported first. So no ``workload_pb2`` module is generated at all:
``scripts/gen-protos.py`` writes the serialized file descriptor (``workload.pb``) and type
stubs (``workload_pb2.pyi``); we load the descriptor into a private
:class:`~google.protobuf.descriptor_pool.DescriptorPool`, make the message classes from
there, and register the handlers by hand (grpclib handlers: path, cardinality, message
classes). The wire format does not depend on the pool, and py-spiffe, go-spiffe and
meshtrust can live in one process. The generated ``.pyi`` still gives the classes their
static types.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import descriptor_pool, message_factory, struct_pb2
from grpclib import GRPCError, Status
from grpclib.const import Cardinality, Handler
from grpclib.server import Stream

from meshtrust._proto import read_descriptor
from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.federated import federated_der
from meshtrust.agent.grpc_server import UnixGrpcServer
from meshtrust.agent.handout import HandoutGate, Refusal
from meshtrust.agent.uds import PrivateSocket
from meshtrust.grpclib_compat import MalformedRequest, recv_request

if TYPE_CHECKING:
    from meshtrust._proto.spiffe.workload_pb2 import (
        X509SVID,
        X509BundlesRequest,
        X509BundlesResponse,
        X509SVIDRequest,
        X509SVIDResponse,
    )

__all__ = [
    "JWT_UNSUPPORTED",
    "MESSAGES",
    "SECURITY_HEADER",
    "WorkloadApiServer",
    "has_security_header",
    "x509_bundles_response",
    "x509_svid_response",
]

log = logging.getLogger("meshtrust.agent")

#: The metadata every Workload API call must carry (SPIFFE Workload Endpoint spec).
SECURITY_HEADER = ("workload.spiffe.io", "true")
#: Status message of the JWT-SVID methods.
JWT_UNSUPPORTED = "JWT-SVIDs are not supported yet"
_MISSING_HEADER = (
    "security header missing from request: Workload API calls must carry the metadata "
    "'workload.spiffe.io: true'"
)
_SHUTTING_DOWN = "the meshtrust agent is shutting down; reconnect to its new instance"
_DESCRIPTOR = "spiffe/workload.pb"


# --- the protobuf messages, in a private descriptor pool --------------------------------------


@dataclass(frozen=True)
class _WorkloadProto:
    service: str  # full service name, "SpiffeWorkloadAPI": the method paths' prefix
    X509SVIDResponse: type[X509SVIDResponse]
    X509SVID: type[X509SVID]
    X509BundlesResponse: type[X509BundlesResponse]
    request_types: dict[str, Any]  # method name -> its request message class
    response_types: dict[str, Any]  # method name -> its response message class


def _serialized_workload_descriptor() -> bytes:
    """The Workload API's ``FileDescriptorProto``, as ``scripts/gen-protos.py`` wrote it
    (``workload.pb``): loaded into a private pool, never imported as a module (see the
    module docstring)."""
    return read_descriptor(_DESCRIPTOR)


def _load_workload_proto() -> _WorkloadProto:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)  # ValidateJWTSVIDResponse.claims
    file = pool.AddSerializedFile(_serialized_workload_descriptor())
    (service,) = file.services_by_name.values()

    def message(name: str) -> Any:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    return _WorkloadProto(
        service=service.full_name,
        X509SVIDResponse=message("X509SVIDResponse"),
        X509SVID=message("X509SVID"),
        X509BundlesResponse=message("X509BundlesResponse"),
        request_types={m.name: message(m.input_type.full_name) for m in service.methods},
        response_types={m.name: message(m.output_type.full_name) for m in service.methods},
    )


_PROTO = _load_workload_proto()
#: The Workload API's message classes (from the private pool) for clients in this process:
#: ``MESSAGES.request_types["FetchX509SVID"]``, ``MESSAGES.X509SVIDResponse``, ...
MESSAGES = _PROTO


# --- what goes on the wire (pure) -------------------------------------------------------------


def has_security_header(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether call metadata carries ``workload.spiffe.io: true`` exactly once, as SPIRE wants."""
    key, expected = SECURITY_HEADER
    values = [value for name, value in metadata or () if name.lower() == key]
    return values == [expected]


def x509_svid_response(secret: WorkloadSecret) -> X509SVIDResponse | None:
    """The ``X509SVIDResponse`` for ``secret``, or None when it cannot make a complete one.

    The SVID is the DER leaf and intermediates concatenated, its key PKCS#8 DER, its bundle
    the DER roots concatenated; ``crl`` every issuing CA's CRL (DER) the agent holds;
    ``federated_bundles`` the federated trust domains' roots, keyed ``spiffe://<td>``.
    """
    if not secret.chain or not secret.roots:
        return None
    svid = _PROTO.X509SVID(
        spiffe_id=str(secret.spiffe_id),
        x509_svid=secret.chain_der(),
        x509_svid_key=secret.key_der(),
        bundle=secret.roots_der(),
    )
    return _PROTO.X509SVIDResponse(
        svids=[svid],
        crl=list(secret.crls_der()),
        federated_bundles=federated_der(secret.federated),
    )


def x509_bundles_response(secret: WorkloadSecret) -> X509BundlesResponse | None:
    """The ``X509BundlesResponse`` for ``secret``'s trust domain and the federated ones (and
    the CA's CRL, when held), or None without roots.

    Bundles are keyed by the trust domain's SPIFFE ID (``spiffe://example.org``) as the
    standard says and SPIRE does; py-spiffe and go-spiffe accept that and the bare name.
    """
    if not secret.roots:
        return None
    return _PROTO.X509BundlesResponse(
        # The own trust domain's and every federated one's (SPIFFE Workload API).
        bundles={
            **federated_der(secret.federated),
            secret.trust_domain.id_string(): secret.roots_der(),
        },
        crl=list(secret.crls_der()),
    )


# --- the server -------------------------------------------------------------------------------


class WorkloadApiServer:
    """The SPIFFE Workload API (``SpiffeWorkloadAPI``) over ``unix:<socket_path>``.

    Serves X.509-SVIDs and bundles from ``cache``, as far as ``gate`` allows (by default
    :class:`HandoutGate` on the system clock: no expired SVID); the JWT methods answer
    UNIMPLEMENTED.
    """

    def __init__(
        self, cache: SecretCache, socket_path: Path, *, gate: HandoutGate | None = None
    ) -> None:
        self._cache = cache
        self._gate = gate or HandoutGate()
        self._socket_path = Path(socket_path)
        self._server: UnixGrpcServer | None = None
        self._socket = PrivateSocket(self._socket_path, "Workload API socket")
        self._stopping = asyncio.Event()
        self._open_streams = 0

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    @property
    def address(self) -> str:
        """The gRPC target of this server, ``unix:<socket_path>``."""
        return f"unix:{self._socket_path}"

    @property
    def open_streams(self) -> int:
        """How many FetchX509SVID/FetchX509Bundles streams are open right now."""
        return self._open_streams

    async def start(self) -> None:
        """Bind the socket (0600) and start serving.

        Raises :class:`ConfigError` for an unusable socket path (too long, not a socket,
        directory not creatable) and :class:`AddressInUse` when a live server owns it.
        """
        if self._server is not None:
            raise RuntimeError("WorkloadApiServer is already started")
        self._stopping = asyncio.Event()
        server = UnixGrpcServer(self._handlers(), self._socket)
        await server.start()
        self._server = server
        log.info("Workload API listening on %s", self.address)

    async def stop(self, grace: float = 1.0) -> None:
        """End every open stream (UNAVAILABLE), stop serving, remove the socket.

        Calls still running after ``grace`` seconds are cancelled. Safe to call twice.
        """
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        await server.stop(grace)
        log.info("Workload API on %s stopped", self.address)

    def _handlers(self) -> dict[str, Handler]:
        methods = {
            "FetchX509SVID": (self._fetch_x509_svid, Cardinality.UNARY_STREAM),
            "FetchX509Bundles": (self._fetch_x509_bundles, Cardinality.UNARY_STREAM),
            "FetchJWTSVID": (self._fetch_jwt_svid, Cardinality.UNARY_UNARY),
            "FetchJWTBundles": (self._fetch_jwt_bundles, Cardinality.UNARY_STREAM),
            "ValidateJWTSVID": (self._validate_jwt_svid, Cardinality.UNARY_UNARY),
        }
        return {
            f"/{_PROTO.service}/{name}": Handler(
                func, cardinality, _PROTO.request_types[name], _PROTO.response_types[name]
            )
            for name, (func, cardinality) in methods.items()
        }

    # --- handlers ---

    async def _admit(self, stream: Stream[Any, Any], method: str) -> None:
        """Refuse (INVALID_ARGUMENT) a call without the security header, then read its
        request (the Workload API's requests carry nothing the X.509 methods need)."""
        metadata = stream.metadata.items() if stream.metadata is not None else None
        if not has_security_header(metadata):
            log.debug("Workload API %s refused: security header missing", method)
            raise GRPCError(Status.INVALID_ARGUMENT, _MISSING_HEADER)
        log.debug("Workload API client connected: %s (%s)", method, _peer(stream))
        try:
            await recv_request(stream)
        except MalformedRequest as exc:  # bad protobuf, a truncated or compressed frame
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"malformed {method} request: {exc.reason}"
            ) from None

    async def _next_secret(self, generation: int) -> WorkloadSecret:
        """The first secret newer than ``generation``; ends the call (UNAVAILABLE) when the
        server stops."""
        newer = asyncio.ensure_future(self._cache.wait_newer(generation))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((newer, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            newer.cancel()
            stopping.cancel()
        if self._stopping.is_set():
            raise GRPCError(Status.UNAVAILABLE, _SHUTTING_DOWN)
        return newer.result()

    async def _fetch_x509_svid(self, stream: Stream[X509SVIDRequest, X509SVIDResponse]) -> None:
        await self._admit(stream, "FetchX509SVID")
        self._open_streams += 1
        try:
            generation = 0
            sent_any = False
            while True:
                secret = await self._next_secret(generation)
                generation = secret.generation
                decision = self._gate(secret)
                if isinstance(decision, Refusal):
                    _refuse_or_skip(decision, sent_any, "FetchX509SVID", generation)
                    continue
                response = x509_svid_response(secret)
                if response is None:
                    log.error(
                        "not sending X.509-SVID generation %d: it has no chain or no roots",
                        generation,
                    )
                    continue
                log.debug(
                    "Workload API: sending X.509-SVID %s serial %s (generation %d)",
                    secret.spiffe_id,
                    secret.serial_hex,
                    generation,
                )
                await stream.send_message(response)
                sent_any = True
        finally:
            self._open_streams -= 1
            log.debug("Workload API FetchX509SVID stream closed")

    async def _fetch_x509_bundles(
        self, stream: Stream[X509BundlesRequest, X509BundlesResponse]
    ) -> None:
        await self._admit(stream, "FetchX509Bundles")
        self._open_streams += 1
        try:
            generation = 0
            sent: tuple[object, ...] | None = None  # the roots, CRL and federated roots sent
            while True:
                secret = await self._next_secret(generation)
                generation = secret.generation
                decision = self._gate.bundle(secret)
                if isinstance(decision, Refusal):
                    _refuse_or_skip(decision, sent is not None, "FetchX509Bundles", generation)
                    continue
                response = x509_bundles_response(secret)
                content = (secret.roots_der(), secret.crls_der(), federated_der(secret.federated))
                if response is None or content == sent:
                    continue  # no roots, or the same bundles and CRLs as last time
                sent = content
                log.debug("Workload API: sending X.509 bundle (generation %d)", generation)
                await stream.send_message(response)
        finally:
            self._open_streams -= 1
            log.debug("Workload API FetchX509Bundles stream closed")

    async def _fetch_jwt_svid(self, stream: Stream[Any, Any]) -> None:
        await self._admit(stream, "FetchJWTSVID")
        raise GRPCError(Status.UNIMPLEMENTED, JWT_UNSUPPORTED)

    async def _fetch_jwt_bundles(self, stream: Stream[Any, Any]) -> None:
        await self._admit(stream, "FetchJWTBundles")
        raise GRPCError(Status.UNIMPLEMENTED, JWT_UNSUPPORTED)

    async def _validate_jwt_svid(self, stream: Stream[Any, Any]) -> None:
        await self._admit(stream, "ValidateJWTSVID")
        raise GRPCError(Status.UNIMPLEMENTED, JWT_UNSUPPORTED)


def _refuse_or_skip(refusal: Refusal, sent_any: bool, method: str, generation: int) -> None:
    """A stream that has sent nothing yet ends with UNAVAILABLE and the refusal's message;
    one that has keeps what it holds and skips this generation."""
    if not sent_any:
        log.info("Workload API %s refused (UNAVAILABLE): %s", method, refusal.message)
        raise GRPCError(Status.UNAVAILABLE, refusal.message)
    log.warning(
        "Workload API %s: not sending generation %d: %s", method, generation, refusal.message
    )


def _peer(stream: Stream[Any, Any]) -> str:
    """Who is calling, for the log: the peer process's pid and uid when the kernel says."""
    transport = getattr(stream.peer, "_transport", None)  # grpclib < 0.5, as the CA reads it
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and hasattr(socket, "SO_PEERCRED"):
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            pass
        else:
            pid, uid, _ = struct.unpack("3i", creds)
            return f"pid {pid}, uid {uid}"
    return "unix socket"
