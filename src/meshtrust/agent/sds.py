"""Envoy SDS v3 (``envoy.service.secret.v3.SecretDiscoveryService``) over a Unix socket.

Theory of operation
-------------------
Envoy opens one state-of-the-world ``StreamSecrets`` stream per secret name (it uses no ADS
here) and names what it wants in each ``DiscoveryRequest``. We answer from the agent's one
:class:`~meshtrust.agent.cache.SecretCache`. Two resources exist, as in istio-agent:

* ``default`` -- ``Secret.tls_certificate``: leaf + intermediates + roots, and the private key;
* ``ROOTCA``  -- ``Secret.validation_context.trusted_ca``: the trusted roots, and the CRLs;
* ``ROOTCA:<td>`` and ``ROOTCA~shared-root`` -- the validation contexts for peers of
  another trust domain (:mod:`meshtrust.envoy.trust_domains`): a federated trust domain's
  roots (never the mesh's) and the CRLs its CA publishes with its bundle; nobody for a
  trust domain whose federation ended while the agent runs; for any other trust domain the
  mesh's roots without the mesh's CRLs (a shared root).

What to send is decided by :class:`SdsStream`, a small socket-free state machine fed with two
kinds of events, and nothing else:

``on_request(request, secret)``  a ``DiscoveryRequest`` arrived; ``secret`` is the cache's
                                 current secret (or None before the first one).
``on_secret(secret)``            the cache published a new generation.

Its rules, in the order it applies them to a request:

1. A request whose ``response_nonce`` is set but is not the nonce of our latest response is
   *stale* (Envoy answered an older response that a newer one has overtaken): ignored.
2. A request with ``error_detail`` is a *NACK*: Envoy refused our latest response. We log
   Envoy's message and send nothing more on this stream until the cache has a newer
   generation than the one refused -- resending what Envoy just refused would loop.
3. A request carrying the latest nonce and no error is an *ACK*. If its ``resource_names``
   differ from the previous request's, we answer for the new set; otherwise nothing.
4. A request without a nonce is a (re)subscription: we answer for every requested name we
   have. So is any request before our first response on the stream, whatever its nonce
   (Envoy reconnecting after an agent restart may quote the previous agent's nonce; Istio
   answers those too).

An expired certificate is never handed out anew (:func:`meshtrust.agent.handout.handout`):
given the time (``now``), a stream leaves ``default`` out of what it "has" while the
certificate is expired, so a new subscription to ``default`` waits exactly as it waits for
a first certificate, and gets the fresh one pushed the moment the cache has it. ``ROOTCA``
is still served. Expiry itself is not an event: what Envoy already holds is Envoy's, and
nothing is pushed to an open stream when its certificate expires.

When the cache changes, every stream that asked for a name whose content changed gets a
response (a stream holding only ``ROOTCA`` is not woken by a leaf rotation that kept the
roots). A response carries every requested resource we have -- with one name per stream, that
is the one Envoy asked for. Other names (see :func:`is_known_secret`) are never answered and
never break a stream (logged once per stream at info). ``version_info`` is the cache
generation the response was built from; nonces are unique per response.

:class:`SdsServer` is the thin edge: a grpclib server on the Unix socket
(:class:`~meshtrust.agent.grpc_server.UnixGrpcServer`; xds-protos ships grpcio stubs only, so
the three methods are registered by hand). Each stream has one task reading requests and one
waiting on :meth:`SecretCache.wait_newer`; both feed the same :class:`SdsStream` (plain method
calls on one event loop, so they never interleave), and one writer sends what it decides.
Delta and Fetch answer UNIMPLEMENTED, as istio-agent's do. Stopping ends every stream with OK
(Envoy reconnects to the next agent); a stream opened while stopping gets UNAVAILABLE.
:meth:`SdsServer.wait_acknowledged` says when Envoy has ACKed a resource as a given
generation has it (Envoy ACKs after applying): the sidecar waits for the ``ROOTCA`` carrying
a new CRL before it drains connections (:mod:`meshtrust.agent.sidecar`).

No key material is ever logged: log lines name resources, versions and serials only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpclib import GRPCError, Status
from grpclib.const import Cardinality, Handler
from grpclib.server import Stream

from meshtrust._proto import read_descriptor
from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.federated import nobody_root
from meshtrust.agent.grpc_server import GrpcMethod, UnixGrpcServer
from meshtrust.agent.handout import Refusal, handout
from meshtrust.agent.uds import PrivateSocket
from meshtrust.clock import Clock, SystemClock
from meshtrust.envoy.trust_domains import (
    PEER_ROOT_SECRET,
    ROOT_SECRET,
    trust_domain_of_root_secret,
)
from meshtrust.grpclib_compat import MalformedRequest, UnsupportedCompression, recv_request
from meshtrust.pki import certs_pem

__all__ = [
    "DEFAULT_SECRET",
    "ROOT_SECRET",
    "SECRET_TYPE_URL",
    "SdsCounters",
    "SdsPush",
    "SdsRequest",
    "SdsServer",
    "SdsStats",
    "SdsStream",
    "is_known_secret",
    "secret_resource",
]

log = logging.getLogger("meshtrust.agent")

#: The workload's certificate chain and key (istio-agent's name).
DEFAULT_SECRET = "default"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
KNOWN_SECRETS = frozenset({DEFAULT_SECRET, ROOT_SECRET, PEER_ROOT_SECRET})


def is_known_secret(name: str) -> bool:
    """Whether SDS serves ``name``: ``default``, ``ROOTCA``, ``ROOTCA~shared-root`` or
    ``ROOTCA:<trust domain>``."""
    return name in KNOWN_SECRETS or trust_domain_of_root_secret(name) is not None
#: The gRPC service (envoy/service/secret/v3/sds.proto).
SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"

# Envoy's NACK messages are short; cap what we copy into our log anyway.
_MAX_LOGGED_ERROR = 1000


# --- the wire messages, in a private descriptor pool ------------------------------------------
#
# xds-protos' generated modules would do, but importing them loads some fifty modules
# (Envoy's core config, validation annotations, udpa, xds) and their descriptors for seven
# messages and some twenty fields: about a megabyte of the agent's resident memory, for good. So
# proto/meshtrust/_proto/sds/*.proto declare just the fields SDS reads and writes, under their
# real names and numbers (the wire format is the field numbers and types), and
# scripts/gen-protos.py compiles them to serialized descriptors (*.pb) that we load into a
# private pool, as the Workload API does for its own reasons. Fields we do not declare (the
# request's ``node``, ...) are skipped on parse. The sources: envoy/service/discovery/v3/
# discovery.proto, envoy/extensions/transport_sockets/tls/v3/{secret,common}.proto,
# envoy/config/core/v3/base.proto and google/rpc/status.proto, as shipped in xds-protos.

_DESCRIPTORS = ("rpc.pb", "core.pb", "tls.pb", "discovery.pb")  # dependencies first
_DATA_SOURCE = "envoy.config.core.v3.DataSource"
_TLS = "envoy.extensions.transport_sockets.tls.v3"


@dataclass(frozen=True)
class _SdsProto:
    AnyMessage: Any
    DataSource: Any
    TlsCertificate: Any
    CertificateValidationContext: Any
    Secret: Any
    DiscoveryRequest: Any
    DiscoveryResponse: Any
    DeltaDiscoveryRequest: Any
    DeltaDiscoveryResponse: Any


def _load_sds_proto() -> _SdsProto:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    for name in _DESCRIPTORS:
        pool.AddSerializedFile(read_descriptor(f"sds/{name}"))

    def message(name: str) -> Any:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    discovery = "envoy.service.discovery.v3"
    return _SdsProto(
        AnyMessage=message("google.protobuf.Any"),
        DataSource=message(_DATA_SOURCE),
        TlsCertificate=message(f"{_TLS}.TlsCertificate"),
        CertificateValidationContext=message(f"{_TLS}.CertificateValidationContext"),
        Secret=message(f"{_TLS}.Secret"),
        DiscoveryRequest=message(f"{discovery}.DiscoveryRequest"),
        DiscoveryResponse=message(f"{discovery}.DiscoveryResponse"),
        DeltaDiscoveryRequest=message(f"{discovery}.DeltaDiscoveryRequest"),
        DeltaDiscoveryResponse=message(f"{discovery}.DeltaDiscoveryResponse"),
    )


_PROTO = _load_sds_proto()


# --- resources ------------------------------------------------------------------------------


def secret_resource(name: str, secret: WorkloadSecret) -> Any:
    """The ``envoy.extensions.transport_sockets.tls.v3.Secret`` named ``name`` built from
    ``secret``. Raises :class:`ValueError` for a name :func:`is_known_secret` refuses."""
    if name == DEFAULT_SECRET:
        return _PROTO.Secret(
            name=name,
            tls_certificate=_PROTO.TlsCertificate(
                # Leaf + intermediates + roots, as istio-agent serves it.
                certificate_chain=_PROTO.DataSource(inline_bytes=secret.chain_with_root_pem()),
                private_key=_PROTO.DataSource(inline_bytes=secret.key_pem()),
            ),
        )
    roots, crl = _validation(name, secret)
    if roots is not None:
        context = _PROTO.CertificateValidationContext(
            trusted_ca=_PROTO.DataSource(inline_bytes=roots),
        )
        if crl is not None:
            # One CRL per live issuing CA, in one PEM (Envoy finds a leaf's by its issuer's
            # name and key). They are for leaves: only the leaf is checked against them.
            # Otherwise Envoy wants a CRL for every CA in the chain, the root included, which
            # a plugged-in CA (no root key) cannot sign; CAs are revoked by rotating them.
            context.crl.inline_bytes = crl
            context.only_verify_leaf_cert_crl = True
        return _PROTO.Secret(name=name, validation_context=context)
    raise ValueError(f"no secret named {name!r}; only {DEFAULT_SECRET!r} and {ROOT_SECRET!r}[:td]")


def _validation(name: str, secret: WorkloadSecret) -> tuple[bytes | None, bytes | None]:
    """The roots (PEM) and CRLs (PEM or None) of validation context ``name``; (None, None)
    when ``name`` is not one. A validation context never has empty roots: Envoy would then
    verify nothing. A federated trust domain held without roots trusts nobody."""
    if name == ROOT_SECRET:
        return secret.roots_pem(), secret.crl_pem()
    if name == PEER_ROOT_SECRET:
        return secret.roots_pem(), None
    td = trust_domain_of_root_secret(name)
    if td is None:
        return None, None
    if td == secret.trust_domain:
        return secret.roots_pem(), secret.crl_pem()
    if td in secret.dropped_federated:
        return certs_pem((nobody_root(),)), None  # federation with it ended
    if td in secret.federated:
        federated = secret.federated[td]
        if not federated:
            return certs_pem((nobody_root(),)), None
        crls = secret.federated_crls.get(td, ())
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)
        return certs_pem(federated), pem or None
    return secret.roots_pem(), None  # another trust domain under the mesh's roots


def _fingerprint(name: str, secret: WorkloadSecret) -> bytes:
    """A digest of what resource ``name`` would carry (kept instead of the key itself)."""
    digest = hashlib.sha256(name.encode())
    if name == DEFAULT_SECRET:
        digest.update(secret.chain_with_root_pem())
        digest.update(b"\0")
        digest.update(secret.key_pem())
    else:
        roots, crl = _validation(name, secret)
        digest.update(roots or b"")
        digest.update(b"\0")
        digest.update(crl or b"")
    return digest.digest()


# --- the pure per-stream state ----------------------------------------------------------------


@dataclass(frozen=True)
class SdsRequest:
    """The parts of a ``DiscoveryRequest`` that decide what we send."""

    resource_names: tuple[str, ...]
    version_info: str = ""
    response_nonce: str = ""
    #: ``error_detail.message`` of a NACK; None when the request carries no error.
    error_detail: str | None = None
    type_url: str = SECRET_TYPE_URL

    @classmethod
    def from_proto(cls, request: Any) -> SdsRequest:
        """From an ``envoy.service.discovery.v3.DiscoveryRequest``."""
        error: str | None = None
        if request.HasField("error_detail"):
            error = request.error_detail.message or f"(status code {request.error_detail.code})"
        return cls(
            resource_names=tuple(request.resource_names),
            version_info=request.version_info,
            response_nonce=request.response_nonce,
            error_detail=error,
            type_url=request.type_url,
        )


@dataclass(frozen=True)
class SdsPush:
    """One response to send: the secrets, the version they come from and a fresh nonce."""

    version_info: str
    nonce: str
    generation: int
    serial_hex: str
    secrets: tuple[Any, ...] = field(repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.secrets)

    def to_proto(self) -> Any:
        """The ``envoy.service.discovery.v3.DiscoveryResponse`` to write."""
        resources = []
        for secret in self.secrets:
            packed = _PROTO.AnyMessage()
            packed.Pack(secret)
            resources.append(packed)
        return _PROTO.DiscoveryResponse(
            version_info=self.version_info,
            resources=resources,
            type_url=SECRET_TYPE_URL,
            nonce=self.nonce,
        )


@dataclass
class SdsCounters:
    """Running totals, shared by every stream of one server (and readable by metrics)."""

    requests: int = 0
    pushes: int = 0
    acks: int = 0
    nacks: int = 0
    stale: int = 0
    unknown_names: int = 0
    wrong_type: int = 0
    last_nack: str | None = None


def _counting_nonces() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: str(next(counter))


class SdsStream:
    """What one SotW ``StreamSecrets`` stream should send next; see the module docstring.

    No sockets, no clock, no randomness: ``nonces`` makes the nonces (a counter by default;
    the server shares one between streams so nonces are unique across the server).
    """

    def __init__(
        self,
        *,
        nonces: Callable[[], str] | None = None,
        counters: SdsCounters | None = None,
        peer: str = "envoy",
    ) -> None:
        self._nonces = nonces or _counting_nonces()
        self.counters = counters if counters is not None else SdsCounters()
        self._peer = peer
        self.names: tuple[str, ...] = ()
        self.last_nonce = ""
        self.acked_version = ""
        #: Digest per name of what this stream last sent (what Envoy has, or refused).
        self._sent: dict[str, bytes] = {}
        #: After a NACK: the generation Envoy refused; nothing is sent until a newer one.
        self._refused_generation: int | None = None
        self._sent_generation = 0
        self._logged_unknown: set[str] = set()
        self._logged_withheld = ""

    @property
    def blocked(self) -> bool:
        """True after a NACK, until a newer secret generation arrives."""
        return self._refused_generation is not None

    def on_request(
        self,
        request: SdsRequest,
        secret: WorkloadSecret | None,
        now: dt.datetime | None = None,
    ) -> SdsPush | None:
        """Take one request from Envoy; return the response to send, if any.

        With ``now``, an expired certificate is withheld (``default`` waits; see the module
        docstring); without it, expiry is not checked (the server always passes it)."""
        self.counters.requests += 1
        if request.type_url and request.type_url != SECRET_TYPE_URL:
            self.counters.wrong_type += 1
            if request.type_url not in self._logged_unknown:
                self._logged_unknown.add(request.type_url)
                log.info(
                    "SDS: %s asked for type %r; we serve only Secret", self._peer, request.type_url
                )
            return None
        # Before our first response, any request is a subscription, whatever nonce it carries:
        # Envoy reconnecting after an agent restart may still quote the old agent's nonce.
        first = not self.last_nonce
        if not first and request.response_nonce and request.response_nonce != self.last_nonce:
            self.counters.stale += 1
            return None

        names = self._dedupe(request.resource_names)
        self._note_unknown(names)
        changed_names = names != self.names
        self.names = names

        if request.error_detail is not None and not first:
            self.counters.nacks += 1
            self.counters.last_nack = request.error_detail[:_MAX_LOGGED_ERROR]
            self._refused_generation = self._sent_generation
            log.warning(
                "SDS: %s rejected %s version %s (keeping version %r): %s",
                self._peer,
                ",".join(names) or "(no names)",
                self._sent_generation,
                request.version_info,
                request.error_detail[:_MAX_LOGGED_ERROR],
            )
            return None

        if request.response_nonce and not first:
            self.counters.acks += 1
            self.acked_version = request.version_info
            if not changed_names:
                return None
        else:
            # A (re)subscription: answer even what we may have sent before on this stream.
            self._sent.clear()
        if secret is None or self.blocked:
            return None
        return self._push(secret, force=True, now=now)

    def acknowledged(self, name: str, secret: WorkloadSecret) -> bool:
        """Whether Envoy runs ``name`` as ``secret`` carries it, or from a newer generation,
        as far as this stream tells: True when the stream does not carry ``name``; else
        Envoy must have ACKed our latest response, and that response must have been built
        from ``secret``'s generation or a later one, or carry the same content (a
        ``ROOTCA`` stream is not woken by a rotation that kept roots and CRL)."""
        if name not in self.names:
            return True
        if self.blocked or not self.last_nonce or self.acked_version != str(self._sent_generation):
            return False
        return self._sent_generation >= secret.generation or self._sent.get(name) == _fingerprint(
            name, secret
        )

    def on_secret(self, secret: WorkloadSecret, now: dt.datetime | None = None) -> SdsPush | None:
        """The cache has a new secret: return a response if it changes what Envoy asked for
        (``now`` as for :meth:`on_request`)."""
        if self._refused_generation is not None:
            if secret.generation <= self._refused_generation:
                return None
            self._refused_generation = None
        return self._push(secret, force=False, now=now)

    def _withheld(self, name: str, secret: WorkloadSecret, now: dt.datetime | None) -> bool:
        """Whether ``name`` must not be handed out from ``secret`` at ``now`` (an expired
        ``default``), logged once per stream and certificate."""
        if name != DEFAULT_SECRET or now is None:
            return False
        decision = handout(secret, now)
        if not isinstance(decision, Refusal):
            return False
        if self._logged_withheld != secret.serial_hex:
            self._logged_withheld = secret.serial_hex
            log.info(
                "SDS: %s asked for %s; not handing out serial %s, expired at %s: waiting for "
                "a fresh certificate",
                self._peer,
                name,
                secret.serial_hex,
                f"{secret.not_after:%Y-%m-%d %H:%M:%SZ}",
            )
        return True

    def _push(
        self, secret: WorkloadSecret, *, force: bool, now: dt.datetime | None
    ) -> SdsPush | None:
        wanted = [
            n for n in self.names if is_known_secret(n) and not self._withheld(n, secret, now)
        ]
        if not wanted:
            return None
        prints = {n: _fingerprint(n, secret) for n in wanted}
        if not force and all(self._sent.get(n) == p for n, p in prints.items()):
            return None
        resources = tuple(secret_resource(n, secret) for n in wanted)
        self._sent.update(prints)
        self._sent_generation = secret.generation
        self.last_nonce = self._nonces()
        self.counters.pushes += 1
        return SdsPush(
            version_info=str(secret.generation),
            nonce=self.last_nonce,
            generation=secret.generation,
            serial_hex=secret.serial_hex,
            secrets=resources,
        )

    @staticmethod
    def _dedupe(names: Iterable[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(names))

    def _note_unknown(self, names: tuple[str, ...]) -> None:
        for name in names:
            if not is_known_secret(name) and name not in self._logged_unknown:
                self._logged_unknown.add(name)
                self.counters.unknown_names += 1
                log.info(
                    "SDS: %s asked for unknown secret %r; only %s and ROOTCA:<td> are served",
                    self._peer,
                    name,
                    ", ".join(sorted(KNOWN_SECRETS)),
                )


# --- the gRPC edge ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SdsStats:
    """A snapshot of an :class:`SdsServer`'s streams and counters."""

    streams_active: int
    streams_total: int
    requests: int
    pushes: int
    acks: int
    nacks: int
    stale: int
    unknown_names: int
    last_nack: str | None


_END = object()  # queued to end a stream
# How long a refused (Delta, Fetch) call may take to send its first request.
_REFUSE_AFTER = 1.0


class SdsServer:
    """Serves SDS from ``cache`` on the Unix socket ``socket_path`` (mode 0600); ``clock``
    says when the certificate has expired (it is then withheld from new subscriptions).

    Use ``await start()`` / ``await stop()``, or ``async with``. Raises
    :class:`~meshtrust.errors.ConfigError` when the path is unusable (a non-socket file is in
    the way, or the path is too long for a Unix socket) and
    :class:`~meshtrust.errors.AddressInUse` when another live server answers on it.
    """

    def __init__(
        self, cache: SecretCache, socket_path: Path, *, clock: Clock | None = None
    ) -> None:
        self.cache = cache
        self.socket_path = Path(socket_path)
        self._clock = clock or SystemClock()
        self._socket = PrivateSocket(self.socket_path, "SDS socket")
        self.counters = SdsCounters()
        self._server: UnixGrpcServer | None = None
        self._stopping = False
        self._nonce_counter = itertools.count(1)
        self._streams_active = 0
        self._streams_total = 0
        self._queues: set[asyncio.Queue[object]] = set()
        self._states: set[SdsStream] = set()
        self._tick = asyncio.Event()

    # -- lifecycle

    def _methods(self) -> dict[str, Handler]:
        def path(method: str) -> str:
            return f"/{SDS_SERVICE}/{method}"

        return {
            path("StreamSecrets"): Handler(
                self.stream_secrets,
                Cardinality.STREAM_STREAM,
                _PROTO.DiscoveryRequest,
                _PROTO.DiscoveryResponse,
            ),
            path("DeltaSecrets"): Handler(
                _refuse("DeltaSecrets"),
                Cardinality.STREAM_STREAM,
                _PROTO.DeltaDiscoveryRequest,
                _PROTO.DeltaDiscoveryResponse,
            ),
            path("FetchSecrets"): Handler(
                _refuse("FetchSecrets"),
                Cardinality.UNARY_UNARY,
                _PROTO.DiscoveryRequest,
                _PROTO.DiscoveryResponse,
            ),
        }

    async def start(self) -> None:
        """Bind the socket (0600) and start serving.

        Raises :class:`ConfigError` for an unusable socket path and :class:`AddressInUse`
        when a live server owns it.
        """
        if self._server is not None:
            raise RuntimeError("SdsServer already started")
        server = UnixGrpcServer(self._methods(), self._socket)
        self._stopping = False
        await server.start()
        self._server = server
        log.info("SDS: serving on %s", self.socket_path)

    async def stop(self, grace: float = 1.0) -> None:
        """End every stream, stop serving within ``grace`` seconds, remove the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        for queue in list(self._queues):
            queue.put_nowait(_END)
        await server.stop(grace)
        log.info("SDS: stopped serving on %s", self.socket_path)

    async def __aenter__(self) -> SdsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- introspection

    @property
    def stats(self) -> SdsStats:
        c = self.counters
        return SdsStats(
            streams_active=self._streams_active,
            streams_total=self._streams_total,
            requests=c.requests,
            pushes=c.pushes,
            acks=c.acks,
            nacks=c.nacks,
            stale=c.stale,
            unknown_names=c.unknown_names,
            last_nack=c.last_nack,
        )

    async def wait_for(self, predicate: Callable[[SdsStats], bool], timeout: float) -> SdsStats:
        """Wait until ``predicate(stats)`` holds; raises :class:`TimeoutError` after
        ``timeout`` seconds. For tests and readiness checks."""
        async with asyncio.timeout(timeout):
            while True:
                snapshot = self.stats
                if predicate(snapshot):
                    return snapshot
                tick = self._tick
                await tick.wait()

    async def wait_acknowledged(self, name: str, secret: WorkloadSecret, timeout: float) -> bool:
        """Wait until every open stream carrying ``name`` has acknowledged it as ``secret``
        has it, or newer (:meth:`SdsStream.acknowledged`): Envoy runs it then. True at once
        when no stream carries it; False after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    tick = self._tick
                    if all(state.acknowledged(name, secret) for state in self._states):
                        return True
                    await tick.wait()
        except TimeoutError:
            return False

    def _changed(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    def _next_nonce(self) -> str:
        return format(next(self._nonce_counter), "x")

    # -- one stream

    async def stream_secrets(self, stream: Stream[Any, Any]) -> None:
        """Run one SotW ``StreamSecrets`` stream (grpclib's server stream: it yields the
        ``DiscoveryRequest``s and sends the ``DiscoveryResponse``s) until Envoy closes it or
        we stop."""
        if self._stopping:
            raise GRPCError(Status.UNAVAILABLE, "the agent is shutting down")
        self._streams_active += 1
        self._streams_total += 1
        peer = f"envoy stream {self._streams_total}"
        state = SdsStream(nonces=self._next_nonce, counters=self.counters, peer=peer)
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._queues.add(queue)
        self._states.add(state)
        self._changed()

        def emit(push: SdsPush | None) -> None:
            if push is not None:
                log.info(
                    "SDS: %s <- %s version %s (serial %s)",
                    peer,
                    ",".join(push.names),
                    push.version_info,
                    push.serial_hex,
                )
                queue.put_nowait(push)
            self._changed()

        async def read() -> None:
            try:
                while (request := await recv_request(stream)) is not None:
                    emit(
                        state.on_request(
                            SdsRequest.from_proto(request), self.cache.current, self._clock.now()
                        )
                    )
            finally:
                queue.put_nowait(_END)

        async def watch() -> None:
            seen = self.cache.generation
            try:
                while True:
                    secret = await self.cache.wait_newer(seen)
                    seen = secret.generation
                    emit(state.on_secret(secret, self._clock.now()))
            finally:
                queue.put_nowait(_END)

        tasks = [asyncio.create_task(read()), asyncio.create_task(watch())]
        try:
            while (item := await queue.get()) is not _END:
                assert isinstance(item, SdsPush)
                await stream.send_message(item.to_proto())
            for task in tasks:
                # A task that failed (rather than reaching the end of the stream) says why.
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.warning("SDS: %s ended: %r", peer, task.exception())
                    _refuse_bad_request(task.exception())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._queues.discard(queue)
            self._states.discard(state)
            self._streams_active -= 1
            self._changed()


def _refuse_bad_request(exc: BaseException | None) -> None:
    """A request that did not decode ends the stream with a status saying so, not OK:
    INVALID_ARGUMENT, or UNIMPLEMENTED for a compressed one (see grpclib_compat)."""
    if isinstance(exc, UnsupportedCompression):
        raise exc
    if isinstance(exc, MalformedRequest):
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed StreamSecrets request: {exc.reason}")


def _refuse(method: str) -> GrpcMethod:
    """Delta and Fetch: UNIMPLEMENTED, as istio-agent answers them.

    The first request is read first (for a while), so that the client learns the status
    when it reads the answer rather than from a failed write of its first request.
    """

    async def refuse(stream: Stream[Any, Any]) -> None:
        with contextlib.suppress(TimeoutError, DecodeError):
            async with asyncio.timeout(_REFUSE_AFTER):
                await stream.recv_message()
        raise GRPCError(Status.UNIMPLEMENTED, f"{method} is not implemented; use StreamSecrets")

    return refuse
