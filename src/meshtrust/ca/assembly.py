"""Assembling the CA from a :class:`CaServeConfig`: the checked material (:func:`prepare_ca`),
the authority, the books (ledger and metrics), the status server, serving until stopped.

Both ways of running it use these pieces: one process (:mod:`meshtrust.ca.runtime`) and a
supervisor with workers (:mod:`meshtrust.ca.workers`). Start-up checks everything before it
binds anything a client could reach: CA directory, trust domain, JWKS files, ledger. Each
failure is a :class:`MeshTrustError` with a message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
    uvloop = None  # type: ignore[assignment]

from cryptography import x509

from meshtrust.ca.authn import (
    ClientCertAuthenticator,
    JwtAuthenticator,
    TrustedIssuer,
    load_jwks_file,
    trusted_issuer_from_jwks,
)
from meshtrust.ca.authority import CaPolicy, CertificateAuthority
from meshtrust.ca.cadir import (
    CaMaterial,
    ensure_token_signing_key,
    load_ca_dir,
    load_token_signing_key,
    token_issuer_for,
)
from meshtrust.ca.config import CaServeConfig
from meshtrust.ca.crl import CrlPublisher, CrlService
from meshtrust.ca.join import JoinAuthenticator
from meshtrust.ca.kube_authn import KubeAuthenticator, kube_authenticators
from meshtrust.ca.ledger import (
    AuditEvent,
    GroupCommitLedger,
    LedgerWriter,
    SqlLedger,
    default_ledger_url,
    display_url,
)
from meshtrust.ca.metrics import CaMetrics, CaMetricsSink
from meshtrust.ca.readiness import LedgerHealth, Readiness, WatchedLedger
from meshtrust.ca.revocation import POLL_INTERVAL, RevocationSource, RevocationWatch
from meshtrust.ca.server import CaGrpcService, GrpcServer, serve_grpc, server_ssl_context
from meshtrust.clock import Clock
from meshtrust.config import parse_host_port
from meshtrust.errors import CADirectoryError, ConfigError
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import KeyType, PrivateKey, TrustBundle, generate_key, make_serving_cert
from meshtrust.status_http import StatusHttpServer

if TYPE_CHECKING:
    from meshtrust.ca.federation import FederationRuntime

__all__ = [
    "ISTIOD_SERVER_NAMES",
    "SERVING_CERT_TTL",
    "Books",
    "PreparedCa",
    "Revocations",
    "build_authority",
    "open_books",
    "prepare_ca",
    "run_loop",
    "serve_until_stopped",
    "start_federation",
    "start_revocations",
    "start_status",
]

log = logging.getLogger("meshtrust.ca")
SERVING_CERT_TTL = dt.timedelta(days=30)

#: Names the serving certificate always covers besides localhost: istiod's. Istio's own CA
#: client (istio-agent's citadel provider) rewrites a ``localhost`` CA address to the server
#: name ``istiod.istio-system.svc``, so Istio's clients connect to this CA unchanged.
ISTIOD_SERVER_NAMES = (
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "istiod",
    "istiod.istio-system",
)


@dataclass
class PreparedCa:
    """Everything checked and loaded, nothing served yet."""

    config: CaServeConfig
    material: CaMaterial
    policy: CaPolicy
    issuers: list[TrustedIssuer]
    ledger_url: str
    serving_chain: list[x509.Certificate]
    serving_key: PrivateKey
    remote: list[KubeAuthenticator] = field(default_factory=list)  # Kubernetes
    own_issuer: TrustedIssuer | None = None  # the CA's token key: join tokens

    def ssl_context(self) -> ssl.SSLContext:
        return server_ssl_context(
            self.serving_chain, self.serving_key, self.material.root_bundle_pem
        )


def prepare_ca(config: CaServeConfig, clock: Clock) -> PreparedCa:
    """Load and check the CA directory, trust domain and token issuers."""
    now = clock.now()
    material = load_ca_dir(config.ca_dir, now)
    for warning in material.warnings:
        log.warning("%s", warning)
    td = config.trust_domain or material.trust_domain_hint()
    if td is None:
        raise ConfigError(
            "cannot tell the trust domain from the root certificate's O; pass --trust-domain"
        )
    issuers = [load_jwks_file(iss, path) for iss, path in config.jwt_issuers]
    # A token key that is there but unusable stops start-up (it names the file); only one
    # that cannot be *made* (a read-only secret mount) leaves the CA's own issuer off.
    own = load_token_signing_key(config.ca_dir)
    if own is None:
        try:
            own = ensure_token_signing_key(config.ca_dir)
        except CADirectoryError as exc:
            log.warning("%s: the CA's own token issuer is off", exc)
    own_issuer = None
    if own is not None:
        own_issuer = trusted_issuer_from_jwks(
            token_issuer_for(td), own.jwks, source=str(config.ca_dir / "token-key.pem")
        )
        issuers.append(own_issuer)
    serving_key = generate_key(KeyType.EC_P256)
    names = list(dict.fromkeys([*ISTIOD_SERVER_NAMES, *config.server_names]))
    host, _ = parse_host_port(config.listen, what="--listen")
    if host not in ("", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost") and host not in names:
        names.append(host)
    serving = make_serving_cert(material.signer, serving_key, names, now, SERVING_CERT_TTL)
    remote = kube_authenticators(
        config.kube_tokenreview, config.kube_jwks, td, config.audience, clock
    )
    return PreparedCa(
        config=config,
        material=material,
        policy=CaPolicy(td, config.default_ttl, config.max_ttl),
        issuers=issuers,
        ledger_url=config.ledger or default_ledger_url(config.ca_dir),
        serving_chain=[serving, *material.intermediates],
        serving_key=serving_key,
        remote=remote,
        own_issuer=own_issuer,
    )


@dataclass
class Revocations:
    """One CA process's view of revocations and its CRL (:mod:`meshtrust.ca.revocation`,
    :mod:`meshtrust.ca.crl`): polled from the ledger, served on the CA port."""

    watch: RevocationWatch
    publisher: CrlPublisher
    service: CrlService
    tasks: list[asyncio.Task[None]]

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def start_revocations(
    prepared: PreparedCa,
    source: RevocationSource,
    clock: Clock,
    interval: float = POLL_INTERVAL,
) -> Revocations:
    """Read the revocations now (so the first request is judged by them) and keep following
    the ledger; sign the first CRL. Raises :class:`LedgerError` when the ledger is unreadable."""
    watch = RevocationWatch(source, clock, interval)
    watch.load()
    publisher = CrlPublisher(prepared.material.signer, watch, clock)
    tasks = [asyncio.create_task(watch.run()), asyncio.create_task(publisher.run())]
    return Revocations(watch, publisher, CrlService(publisher), tasks)


def build_authority(
    prepared: PreparedCa,
    clock: Clock,
    ledger: LedgerWriter,
    metrics: CaMetricsSink,
    revocations: RevocationWatch | None = None,
) -> CertificateAuthority:
    material = prepared.material

    def revoked_at(serial: str) -> dt.datetime | None:
        assert revocations is not None
        found = revocations.state.revocation(serial)
        return found.revoked_at if found is not None else None

    return CertificateAuthority(
        material=material,
        policy=prepared.policy,
        clock=clock,
        ledger=ledger,
        metrics=metrics,
        jwt_authenticator=JwtAuthenticator(
            prepared.policy.trust_domain, prepared.issuers, prepared.config.audience
        ),
        cert_authenticator=ClientCertAuthenticator(
            TrustBundle(prepared.policy.trust_domain, material.roots),
            material.intermediates,
            revoked_at if revocations is not None else None,
        ),
        remote_authenticators=prepared.remote,
        join_authenticator=(
            JoinAuthenticator(prepared.policy.trust_domain, prepared.own_issuer)
            if prepared.own_issuer is not None
            else None
        ),
        revocations=revocations,
    )


async def serve_until_stopped(
    service: CaGrpcService,
    sock: socket.socket,
    ssl_ctx: ssl.SSLContext,
    stop: asyncio.Event,
    drain_grace: float,
    also: Sequence[object] = (),
) -> None:
    """Serve on ``sock`` until ``stop`` is set, then drain in-flight requests and close.
    ``also``: more grpclib services on the port (the CRL's)."""
    if also:
        server = GrpcServer([service, *also])
        await server.start(sock=sock, ssl=ssl_ctx)
    else:
        server = await serve_grpc(service, sock, ssl_ctx)
    await stop.wait()
    drained = await service.drain(drain_grace)
    if not drained:
        log.warning(
            "shutdown: %d requests still in flight after the grace period", service.in_flight
        )
    await server.shutdown()


@dataclass
class Books:
    """What the process that owns them keeps: the ledger and the metrics registry."""

    sql: SqlLedger
    ledger: WatchedLedger  # group commit, reporting every outcome to ``health``
    registry: TextRegistry
    metrics: CaMetrics
    health: LedgerHealth

    def started(self, prepared: PreparedCa, clock: Clock, workers: int) -> None:
        """Audit and log the start of the CA."""
        config = prepared.config
        self.sql.add_audit(
            AuditEvent(
                clock.now(),
                "meshtrust ca serve",
                "ca-start",
                f"listen={config.listen} workers={workers} "
                f"trust_domain={prepared.policy.trust_domain}",
            )
        )
        log.info(
            "CA for trust domain %s serving on %s with %d worker(s) (ledger %s)",
            prepared.policy.trust_domain,
            config.listen,
            workers,
            display_url(prepared.ledger_url),
        )


def open_books(prepared: PreparedCa) -> Books:
    """Open the ledger (group-committing) and the metrics, with the CA's expiry gauges set."""
    sql = SqlLedger(prepared.ledger_url)
    metrics_registry = TextRegistry()
    metrics = CaMetrics(metrics_registry)
    m = prepared.material
    metrics.set_expiries(
        min(r.not_valid_after_utc for r in m.roots),
        min(c.not_valid_after_utc for c in (m.signer.cert, *m.intermediates)),
    )
    health = LedgerHealth()
    ledger = WatchedLedger(GroupCommitLedger(sql), health)
    return Books(sql, ledger, metrics_registry, metrics, health)


def start_status(
    config: CaServeConfig, registry: TextRegistry, ready: Callable[[], Readiness]
) -> StatusHttpServer | None:
    """``/metrics`` and ``/ready`` (503 with the reason when ``ready()`` says not ready)."""
    if not config.metrics_listen:
        return None
    host, port = parse_host_port(config.metrics_listen, what="--metrics-listen")

    def answer() -> tuple[bool, str]:
        readiness = ready()
        return readiness.ready, readiness.reason

    status = StatusHttpServer(host, port, registry, answer)
    status.start()
    return status


async def start_federation(
    prepared: PreparedCa, clock: Clock, registry: TextRegistry
) -> FederationRuntime | None:
    """The bundle endpoint and the federated-bundle poller, when ``federation`` is set
    (one per CA process that serves: the single process, or the workers' supervisor)."""
    if prepared.config.federation is None:
        return None
    from meshtrust.ca.federation import build_federation

    runtime = build_federation(
        prepared.config.federation,
        prepared.material,
        prepared.policy.trust_domain,
        prepared.ledger_url,
        clock,
    )
    registry.register(runtime.poller.metrics)
    await runtime.start()
    return runtime


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    if uvloop is None:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(coro)
    else:
        uvloop.run(coro)
