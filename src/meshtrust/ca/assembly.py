"""Assembling the CA from a :class:`CaServeConfig`: the checked material (:func:`prepare_ca`),
the authority, the books (ledger and metrics), the status server, serving until stopped.

Both ways of running it use these pieces: one process (:mod:`meshtrust.ca.runtime`) and a
supervisor with workers (:mod:`meshtrust.ca.workers`). Start-up checks everything before it
binds anything a client could reach: CA directory, trust domain, JWKS files, ledger. Each
failure is a :class:`MeshTrustError` with a message.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from cryptography.hazmat.primitives.serialization import Encoding

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
    load_root_signer,
    load_token_signing_key,
    token_issuer_for,
)
from meshtrust.ca.config import CaServeConfig
from meshtrust.ca.crl import CRL_VALIDITY, CrlPublisher, CrlService
from meshtrust.ca.federated_push import FederatedWatch
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
from meshtrust.ca.signing import POLL_INTERVAL as SIGNING_POLL
from meshtrust.ca.signing import (
    SigningMaterial,
    SigningWatch,
    SlotLedger,
    chain_expiry_warning,
)
from meshtrust.ca.trust import BundleWatch, ServedRecorder, TrustLedger, TrustService, chains_to
from meshtrust.clock import Clock, SystemClock
from meshtrust.config import parse_host_port
from meshtrust.errors import CADirectoryError, ConfigError, LedgerError
from meshtrust.fileio import load_cert_chain_pem
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import (
    KeyType,
    PrivateKey,
    Signer,
    TrustBundle,
    certs_pem,
    generate_key,
    make_serving_cert,
    private_key_pem,
)
from meshtrust.status_http import StatusHttpServer

if TYPE_CHECKING:
    from meshtrust.ca.federation import FederationRuntime

__all__ = [
    "ISTIOD_SERVER_NAMES",
    "SERVING_CERT_TTL",
    "Books",
    "PreparedCa",
    "Revocations",
    "Signing",
    "build_authority",
    "follow_signing_tls",
    "open_books",
    "prepare_ca",
    "run_loop",
    "serve_until_stopped",
    "start_federation",
    "start_revocations",
    "start_signing",
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
    #: The root's signer when the CA directory holds ``root-key.pem``: the CA then rotates
    #: its own intermediate (:mod:`meshtrust.ca.signing`).
    root_signer: Signer | None = None
    server_names: list[str] = field(default_factory=list)

    def ssl_context(self) -> ssl.SSLContext:
        return server_ssl_context(
            self.serving_chain, self.serving_key, self.material.root_bundle_pem
        )


def _serving_chain(
    root_signer: Signer | None,
    material: CaMaterial | SigningMaterial,
    key: PrivateKey,
    names: Sequence[str],
    now: dt.datetime,
) -> list[x509.Certificate]:
    """The CA port's certificate chain. Signed by the root when the CA holds the root the
    active signer chains to: the intermediate may live minutes (rotation), the serving
    certificate must not expire with it. Otherwise (plugged-in, or after a root rotation to
    a root whose key is elsewhere) by the active signer, expiring with it at the latest."""
    intermediates = list(material.intermediates)
    if root_signer is not None and chains_to(
        intermediates or [material.signer.cert], root_signer.cert
    ):
        return [make_serving_cert(root_signer, key, names, now, SERVING_CERT_TTL)]
    ttl = min(SERVING_CERT_TTL, material.signer.cert.not_valid_after_utc - now)
    return [make_serving_cert(material.signer, key, names, now, ttl), *intermediates]


def _signed_by(chain: Sequence[x509.Certificate]) -> tuple[bytes, ...]:
    return tuple(c.public_bytes(Encoding.DER) for c in chain[1:]) or (
        chain[0].issuer.public_bytes(),
    )


def follow_signing_tls(
    prepared: PreparedCa, ctx: ssl.SSLContext, signing: SigningWatch, clock: Clock
) -> None:
    """Keep the CA port's TLS in step with the signing slots (root rotation): client
    certificates chaining to a new root are accepted (its roots are added to ``ctx``'s
    store) and, once the active signer chains to a root this CA does not hold the key of,
    the serving certificate is re-made under the active signer, so agents that trust only
    the new root still verify the CA. New handshakes use the new material."""
    held = [_signed_by(prepared.serving_chain)]

    def changed() -> None:
        current = signing.current()
        ctx.load_verify_locations(cadata=certs_pem(current.roots).decode())
        chain = _serving_chain(
            prepared.root_signer, current, prepared.serving_key, prepared.server_names, clock.now()
        )
        if _signed_by(chain) == held[0]:
            return
        held[0] = _signed_by(chain)
        load_cert_chain_pem(ctx, certs_pem(chain), private_key_pem(prepared.serving_key))
        log.info("CA port certificate re-made, issued by %s", chain[0].issuer.rfc4514_string())

    signing.on_slots_changed(changed)


def prepare_ca(config: CaServeConfig, clock: Clock) -> PreparedCa:
    """Load and check the CA directory, trust domain and token issuers; then the signing
    slots in the ledger (:mod:`meshtrust.ca.signing`): the material signs with the active
    one. Raises :class:`MeshTrustError` subclasses with a message."""
    now = clock.now()
    holds_root = (config.ca_dir / "root-key.pem").exists()
    material = load_ca_dir(config.ca_dir, now, signer_may_expire=holds_root)
    root_signer = load_root_signer(config.ca_dir, material.roots) if holds_root else None
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
    remote = kube_authenticators(
        config.kube_tokenreview, config.kube_jwks, td, config.audience, clock
    )
    host, _ = parse_host_port(config.listen, what="--listen")
    # Last of the checks (so a refused start leaves no ledger behind): sign with the
    # ledger's active slot, recorded from this directory the first time.
    ledger_url = config.ledger or default_ledger_url(config.ca_dir)
    sql = SqlLedger(ledger_url)
    try:
        active = _signing_watch(config, sql, clock, td.name, root_signer, material).load(material)
    finally:
        sql.close()
    material = _with_signer(material, active)
    serving_key = generate_key(KeyType.EC_P256)
    names = list(dict.fromkeys([*ISTIOD_SERVER_NAMES, *config.server_names]))
    if host not in ("", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost") and host not in names:
        names.append(host)
    serving_chain = _serving_chain(root_signer, material, serving_key, names, now)
    return PreparedCa(
        config=config,
        material=material,
        policy=CaPolicy(td, config.default_ttl, config.max_ttl),
        issuers=issuers,
        ledger_url=ledger_url,
        serving_chain=serving_chain,
        serving_key=serving_key,
        server_names=names,
        remote=remote,
        own_issuer=own_issuer,
        root_signer=root_signer,
    )


def _signing_watch(
    config: CaServeConfig,
    sql: SqlLedger,
    clock: Clock,
    trust_domain: str,
    root: Signer | None,
    material: CaMaterial,
    interval: float = SIGNING_POLL,
) -> SigningWatch:
    return SigningWatch(
        SlotLedger(sql.engine),
        config.ca_dir,
        clock,
        trust_domain=trust_domain,
        root=root,
        bundle=material.roots,
        interval=interval,
    )


def _with_signer(material: CaMaterial, active: SigningMaterial) -> CaMaterial:
    return dataclasses.replace(
        material,
        signer=active.signer,
        intermediates=active.intermediates,
        roots=active.roots,
    )


@dataclass
class Signing:
    """One CA process's signer, following the ledger's slots (:mod:`meshtrust.ca.signing`)."""

    watch: SigningWatch
    task: asyncio.Task[None]

    async def aclose(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def start_signing(
    prepared: PreparedCa, sql: SqlLedger, clock: Clock, interval: float = SIGNING_POLL
) -> Signing:
    """Load the active signing slot now and follow the ledger's slots (preparing and
    activating successors when this CA holds the root key). Raises :class:`SlotError`."""
    watch = _signing_watch(
        prepared.config,
        sql,
        clock,
        prepared.policy.trust_domain.name,
        prepared.root_signer,
        prepared.material,
        interval,
    )
    watch.load(prepared.material)
    return Signing(watch, asyncio.create_task(watch.run()))


@dataclass
class Revocations:
    """One CA process's view of revocations and its CRL (:mod:`meshtrust.ca.revocation`,
    :mod:`meshtrust.ca.crl`): polled from the ledger, served on the CA port."""

    watch: RevocationWatch
    publisher: CrlPublisher
    #: The streams on the CA port: ``WatchCrl``, and ``WatchTrust`` on a ledger (SQL).
    service: CrlService | TrustService
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
    signing: SigningWatch | None = None,
) -> Revocations:
    """Read the revocations now (so the first request is judged by them) and keep following
    the ledger; sign the first CRL. On a :class:`SqlLedger`, also the trust stream
    (:mod:`meshtrust.ca.trust`): the ledger's bundle, version 1 from the CA directory's roots
    when there is none yet, followed and pushed with the CRL. Raises :class:`LedgerError`
    when the ledger is unreadable. With ``signing``, one CRL per live signing slot, re-signed
    when the slots change."""
    watch = RevocationWatch(source, clock, interval)
    watch.load()
    # nextUpdate as far ahead as the longest certificate this CA may sign: Envoy refuses
    # every handshake against an expired CRL, so a CRL must never expire before a valid
    # certificate it covers (agents judge staleness by the CRL's age).
    publisher = CrlPublisher(
        prepared.material.signer,
        watch,
        clock,
        validity=max(CRL_VALIDITY, prepared.policy.max_ttl),
        issuers=signing.issuers if signing is not None else None,
    )
    if signing is not None:
        signing.on_slots_changed(publisher.refresh)
    tasks = [asyncio.create_task(watch.run()), asyncio.create_task(publisher.run())]
    crl_service = CrlService(publisher)
    if not isinstance(source, SqlLedger):
        return Revocations(watch, publisher, crl_service, tasks)
    ledger = TrustLedger(source.engine)

    async def before_change() -> None:  # a slot written before the bundle: its CRL first
        if signing is not None:
            await signing.poll_once()
        await publisher.publish_now()

    bundles = BundleWatch(
        ledger,
        ledger.initialise(prepared.material.roots, clock.now()),
        clock,
        before_change=before_change,
    )
    recorder = ServedRecorder(ledger, clock)
    material = prepared.material

    def revoked_at(serial: str) -> dt.datetime | None:
        found = watch.state.revocation(serial)
        return found.revoked_at if found is not None else None

    def authenticator() -> ClientCertAuthenticator:
        current = signing.current() if signing is not None else None
        return ClientCertAuthenticator(
            TrustBundle(prepared.policy.trust_domain, current.roots if current else material.roots),
            current.known_intermediates if current else material.intermediates,
            revoked_at,
        )

    federated = FederatedWatch(source.engine, prepared.policy.trust_domain, clock)
    federated.load()  # the first update carries them
    trust = TrustService(
        bundles, publisher, recorder, authenticator, clock, crl_service, federated
    )
    tasks += [asyncio.create_task(bundles.run()), asyncio.create_task(recorder.run())]
    tasks.append(asyncio.create_task(federated.run()))
    return Revocations(watch, publisher, trust, tasks)


def build_authority(
    prepared: PreparedCa,
    clock: Clock,
    ledger: LedgerWriter,
    metrics: CaMetricsSink,
    revocations: RevocationWatch | None = None,
    signing: SigningWatch | None = None,
) -> CertificateAuthority:
    """The authority of one CA process; ``signing`` makes it follow the active slot."""
    material = prepared.material

    def revoked_at(serial: str) -> dt.datetime | None:
        assert revocations is not None
        found = revocations.state.revocation(serial)
        return found.revoked_at if found is not None else None

    def cert_authenticator(current: SigningMaterial) -> ClientCertAuthenticator:
        return ClientCertAuthenticator(
            TrustBundle(prepared.policy.trust_domain, current.roots),
            current.known_intermediates,
            revoked_at if revocations is not None else None,
        )

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
        signing=signing,
        cert_authenticator_for=cert_authenticator,
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


def open_books(prepared: PreparedCa, clock: Clock | None = None) -> Books:
    """Open the ledger (group-committing) and the metrics, with the CA's expiry gauges set
    (the chain's read from the ledger's active slot at each scrape)."""
    sql = SqlLedger(prepared.ledger_url)
    metrics_registry = TextRegistry()
    metrics = CaMetrics(metrics_registry)
    m = prepared.material
    metrics.set_expiries(
        min(r.not_valid_after_utc for r in m.roots),
        min(c.not_valid_after_utc for c in (m.signer.cert, *m.intermediates)),
    )
    metrics.follow_signing_chain(
        chain_status_reader(SlotLedger(sql.engine), prepared.root_signer is None, clock)
    )
    health = LedgerHealth()
    ledger = WatchedLedger(GroupCommitLedger(sql), health)
    return Books(sql, ledger, metrics_registry, metrics, health)


def chain_status_reader(
    store: SlotLedger, plugged_in: bool, clock: Clock | None = None
) -> Callable[[], tuple[dt.datetime, int] | None]:
    """For the metrics: the active chain's expiry and warning level (a CA with the root key
    rotates, so it has no warning), read from the ledger; None when that fails."""
    clock = clock or SystemClock()

    def read() -> tuple[dt.datetime, int] | None:
        try:
            active = store.slots().active
        except LedgerError:
            return None
        if active is None:
            return None
        not_after = min(c.not_valid_after_utc for c in active.chain)
        warning = chain_expiry_warning(active.issued_at, not_after, clock.now())
        return not_after, warning.level if plugged_in and warning is not None else 0

    return read


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
    prepared: PreparedCa,
    clock: Clock,
    registry: TextRegistry,
    crls: CrlPublisher | None = None,
) -> FederationRuntime | None:
    """The bundle endpoint and the federated-bundle poller, when ``federation`` is set
    (one per CA process that serves: the single process, or the workers' supervisor).
    ``crls``: the process's CRL publisher, whose CRLs the bundle endpoint serves too."""
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
    runtime.own_crls = crls
    await runtime.start()
    return runtime


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    if uvloop is None:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(coro)
    else:
        uvloop.run(coro)
