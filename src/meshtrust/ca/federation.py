"""SPIFFE federation, the CA's side: fetch the bundles of federated trust domains, keep the
last good one of each in the ledger, and serve the mesh's own versioned bundle.

Theory of operation. For each ``federatesWith`` entry a poller fetches the bundle document
from the entry's bundle endpoint, then sleeps for the refresh hint of the last good bundle
(the document's ``spiffe_refresh_hint``; the configured default when it has none). An
``https_spiffe`` endpoint is authenticated by its SVID: the TLS chain must lead to a root of
the last good bundle of *that* trust domain (at first the operator's ``bootstrapBundle``)
and the leaf must carry exactly ``endpointSpiffeId``. An ``https_web`` endpoint is checked
as a browser would (Web PKI roots or ``caFile``, host name). A document that fails any check
of :mod:`meshtrust.spiffe.bundle`, an endpoint that is down or slow: the last good bundle is
kept, the failure logged (once while it repeats) and counted; the next attempt comes at
the next refresh. Foreign bundles are stored apart and never merged into the CA's own.

Pure parts: :func:`poll_delay`, :func:`bundle_changed`, :func:`load_bootstrap_bundle`'s
parsing; the rest moves data between sockets, the ledger and the pure parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from meshtrust.ca.bundle_endpoint import BundleEndpoint
from meshtrust.ca.cadir import CaMaterial
from meshtrust.ca.crl import CrlPublisher
from meshtrust.ca.schema import federated_bundles
from meshtrust.ca.trust import BundleWatch, TrustLedger
from meshtrust.clock import Clock
from meshtrust.config.federation import (
    DEFAULT_REFRESH_HINT,
    EndpointProfile,
    FederatedTrustDomain,
    FederationConfig,
)
from meshtrust.errors import (
    ConfigError,
    EnvironmentFault,
    InvalidCertificate,
    LedgerError,
    MeshTrustError,
)
from meshtrust.metrics_text import MetricFamily, Sample
from meshtrust.pki import certs_pem, load_certs_pem
from meshtrust.spiffe import SpiffeId, TrustDomain
from meshtrust.spiffe.bundle import (
    MAX_DOCUMENT_BYTES,
    InvalidBundle,
    SpiffeBundle,
    bundle_document,
    parse_bundle_document,
)

__all__ = [
    "FETCH_TIMEOUT",
    "BundleFetchError",
    "FederationMetrics",
    "FederationPoller",
    "FederationRuntime",
    "FederationStore",
    "StoredBundle",
    "build_federation",
    "check_bootstrap_bundles",
    "bundle_changed",
    "fetch_bundle",
    "load_bootstrap_bundle",
    "poll_delay",
    "read_bootstrap_file",
]

log = logging.getLogger("meshtrust.ca.federation")

FETCH_TIMEOUT = 10.0  # seconds for connect + TLS + the whole response
MIN_POLL = dt.timedelta(seconds=1)
MAX_POLL = dt.timedelta(days=1)


class BundleFetchError(EnvironmentFault):
    """A bundle endpoint could not be reached, authenticated, or read."""


# --- pure decisions ----------------------------------------------------------------------------


def poll_delay(last_good: SpiffeBundle | None, default: dt.timedelta) -> dt.timedelta:
    """How long to wait before the next fetch: the last good bundle's refresh hint, else
    ``default``; never below 1 s (a hint of 0 must not spin) nor above a day."""
    hint = last_good.refresh_hint if last_good and last_good.refresh_hint else default
    return max(MIN_POLL, min(MAX_POLL, hint))


def bundle_changed(old: SpiffeBundle | None, new: SpiffeBundle) -> bool:
    """True if ``new`` differs from ``old`` in what it trusts, its sequence, its hint or
    its CRLs (a revocation at the peer changes only those)."""
    if old is None:
        return True
    return (
        not old.same_authorities(new)
        or old.sequence != new.sequence
        or old.refresh_hint != new.refresh_hint
        or not old.same_revocation(new)
    )


def authorities_digest(roots: Iterable[x509.Certificate]) -> str:
    """A digest of a set of certificates (order aside)."""
    ders = sorted(c.public_bytes(serialization.Encoding.DER) for c in roots)
    return hashlib.sha256(b"".join(hashlib.sha256(d).digest() for d in ders)).hexdigest()


def load_bootstrap_bundle(data: bytes, trust_domain: TrustDomain, source: str) -> SpiffeBundle:
    """A bundle from a file an operator brought: a SPIFFE bundle document or PEM roots.

    Raises :class:`InvalidBundle` naming ``source``.
    """
    if data.lstrip().startswith(b"{"):
        return parse_bundle_document(data, trust_domain, source=source)
    try:
        certs = load_certs_pem(data, source=source)
    except InvalidCertificate as exc:
        raise InvalidBundle(f"{exc} (expected PEM certificates or a bundle document)") from None
    # The same checks as a document's: one CA certificate per key, of this trust domain.
    return parse_bundle_document(
        bundle_document(SpiffeBundle(trust_domain, tuple(certs))), trust_domain, source=source
    )


# --- the ledger's side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredBundle:
    bundle: SpiffeBundle
    source: str
    updated_at: dt.datetime


class FederationStore:
    """The federated bundles, in the ledger's table (migration 5). Opens its own connection
    pool on the ledger URL; the ledger must have been opened (migrated) by
    :class:`~meshtrust.ca.ledger.SqlLedger` first."""

    def __init__(self, url: str) -> None:
        try:
            self._engine: Engine = sa.create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise LedgerError(f"ledger URL cannot be used: {exc.__class__.__name__}") from exc
        if self._engine.dialect.name == "sqlite":
            sa.event.listen(self._engine, "connect", _sqlite_busy_timeout)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._engine.dispose()

    @property
    def engine(self) -> Engine:
        return self._engine

    def save(self, bundle: SpiffeBundle, source: str, now: dt.datetime) -> None:
        """Record ``bundle`` as the last good bundle of its trust domain."""
        td = bundle.trust_domain.name
        values = {
            "document": bundle_document(bundle).decode(),
            "sequence": bundle.sequence,
            "source": source[:2048],
            "updated_at": now,
        }
        table = federated_bundles
        try:
            with self._engine.begin() as conn:
                found = conn.execute(
                    sa.select(table.c.trust_domain).where(table.c.trust_domain == td)
                ).first()
                if found is None:
                    conn.execute(table.insert().values(trust_domain=td, **values))
                else:
                    conn.execute(table.update().where(table.c.trust_domain == td).values(**values))
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger write failed: {exc.__class__.__name__}") from exc

    def delete(self, trust_domain: TrustDomain) -> bool:
        try:
            with self._engine.begin() as conn:
                result = conn.execute(
                    federated_bundles.delete().where(
                        federated_bundles.c.trust_domain == trust_domain.name
                    )
                )
                return bool(result.rowcount)
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger write failed: {exc.__class__.__name__}") from exc

    def load(self, trust_domain: TrustDomain) -> StoredBundle | None:
        return self.load_all().get(trust_domain)

    def load_all(self) -> dict[TrustDomain, StoredBundle]:
        """Every stored federated bundle. A row that no longer parses (hand-edited) is
        skipped with a warning rather than trusted."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(federated_bundles)).mappings().all()
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger read failed: {exc.__class__.__name__}") from exc
        out: dict[TrustDomain, StoredBundle] = {}
        for row in rows:
            try:
                td = TrustDomain.parse(row["trust_domain"])
                bundle = parse_bundle_document(
                    row["document"].encode(), td, source=f"ledger row {row['trust_domain']}"
                )
            except MeshTrustError as exc:
                log.warning("ignoring a stored federated bundle: %s", exc)
                continue
            updated = row["updated_at"]
            if updated.tzinfo is None:
                updated = updated.replace(tzinfo=dt.UTC)
            out[td] = StoredBundle(bundle, row["source"], updated)
        return out


def _sqlite_busy_timeout(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


# --- fetching ----------------------------------------------------------------------------------


def _client_context(peer: FederatedTrustDomain, trusted: SpiffeBundle | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if peer.profile is EndpointProfile.HTTPS_SPIFFE:
        if trusted is None or not trusted.x509_authorities:
            raise BundleFetchError(
                f"no bundle of {peer.trust_domain} to authenticate its endpoint with"
            )
        context.check_hostname = False  # the SVID names a SPIFFE ID, checked after
        context.load_verify_locations(cadata=certs_pem(trusted.x509_authorities).decode())
    elif peer.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(peer.ca_file))
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise BundleFetchError(f"cannot use caFile {peer.ca_file}: {reason}") from None
    else:
        context.load_default_certs()
    return context


def _check_endpoint_id(der: bytes | None, expected: SpiffeId | None) -> None:
    if expected is None:
        raise BundleFetchError("no endpointSpiffeId to check the endpoint against")
    if der is None:
        raise BundleFetchError("the endpoint sent no certificate")
    cert = x509.load_der_x509_certificate(der)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [str(expected)]:
        raise BundleFetchError(
            f"the endpoint's certificate names {', '.join(uris) or 'no SPIFFE ID'}, not {expected}"
        )


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    """The body of one HTTP/1.1 response, refused past :data:`MAX_DOCUMENT_BYTES`."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise BundleFetchError(f"not an HTTP response: {status_line[:60]!r}")
    if parts[1] != "200":
        raise BundleFetchError(f"the endpoint answered {' '.join(parts[1:])[:80]}")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if len(body) + size > MAX_DOCUMENT_BYTES:
                raise InvalidBundle(f"document larger than {MAX_DOCUMENT_BYTES // 1024} KiB")
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                return body
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_DOCUMENT_BYTES:
            raise InvalidBundle(
                f"document of {length} bytes, over {MAX_DOCUMENT_BYTES // 1024} KiB"
            )
        return await reader.readexactly(length)
    body = await reader.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise InvalidBundle(f"document larger than {MAX_DOCUMENT_BYTES // 1024} KiB")
    return body


async def fetch_bundle(
    peer: FederatedTrustDomain,
    trusted: SpiffeBundle | None,
    timeout: float = FETCH_TIMEOUT,
) -> SpiffeBundle:
    """Fetch and check ``peer``'s bundle document from its endpoint.

    ``trusted`` is the last good bundle of ``peer``'s trust domain (``https_spiffe`` only).
    Raises :class:`BundleFetchError` (unreachable, TLS or SPIFFE ID refused, HTTP error) or
    :class:`InvalidBundle` (the document).
    """
    context = _client_context(peer, trusted)
    host, port, path = peer.host_port_path
    source = peer.bundle_endpoint_url

    async def exchange() -> bytes:
        server_hostname = host if peer.profile is EndpointProfile.HTTPS_WEB else None
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=server_hostname or ""
        )
        try:
            if peer.profile is EndpointProfile.HTTPS_SPIFFE:
                ssl_object = writer.get_extra_info("ssl_object")
                _check_endpoint_id(
                    ssl_object.getpeercert(binary_form=True), peer.endpoint_spiffe_id
                )
            host_header = f"[{host}]" if ":" in host else host
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host_header}:{port}\r\n"
                "Accept: application/json\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            return await _read_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    try:
        body = await asyncio.wait_for(exchange(), timeout)
    except TimeoutError:
        raise BundleFetchError(f"{source}: no answer within {timeout:g}s") from None
    except ssl.SSLError as exc:
        detail = getattr(exc, "verify_message", None) or exc.reason or str(exc)
        raise BundleFetchError(f"{source}: TLS refused: {detail}") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise BundleFetchError(f"{source}: {exc.__class__.__name__}: {exc}"[:300]) from None
    except BundleFetchError as exc:
        raise BundleFetchError(f"{source}: {exc}") from None
    except InvalidBundle as exc:
        raise InvalidBundle(f"{source}: {exc}") from None
    return parse_bundle_document(body, peer.trust_domain, source=source)


# --- metrics ----------------------------------------------------------------------------------


@dataclass
class _PeerStats:
    fetches: dict[str, int] = field(default_factory=dict)  # result -> count
    updates: int = 0
    last_success: float | None = None
    sequence: int | None = None


class FederationMetrics:
    """``meshtrust_federation_*``: fetches by result, updates, last success, sequence."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: dict[str, _PeerStats] = {}

    def _peer(self, td: TrustDomain) -> _PeerStats:
        return self._peers.setdefault(td.name, _PeerStats())

    def fetched(self, td: TrustDomain, result: str, at: dt.datetime | None = None) -> None:
        with self._lock:
            peer = self._peer(td)
            peer.fetches[result] = peer.fetches.get(result, 0) + 1
            if at is not None:
                peer.last_success = at.timestamp()

    def updated(self, td: TrustDomain, sequence: int | None) -> None:
        with self._lock:
            peer = self._peer(td)
            peer.updates += 1
            peer.sequence = sequence

    def count(self, td: TrustDomain, result: str) -> int:
        with self._lock:
            return self._peer(td).fetches.get(result, 0)

    def families(self) -> Iterable[MetricFamily]:
        with self._lock:
            peers = {
                k: (dict(v.fetches), v.updates, v.last_success, v.sequence)
                for k, v in self._peers.items()
            }
        fetches, updates, success, sequence = [], [], [], []
        for td, (results, ups, last, seq) in sorted(peers.items()):
            for result, n in sorted(results.items()):
                fetches.append(
                    Sample(
                        "meshtrust_federation_bundle_fetches_total",
                        {"trust_domain": td, "result": result},
                        n,
                    )
                )
            updates.append(
                Sample("meshtrust_federation_bundle_updates_total", {"trust_domain": td}, ups)
            )
            if last is not None:
                success.append(
                    Sample(
                        "meshtrust_federation_last_success_timestamp_seconds",
                        {"trust_domain": td},
                        last,
                    )
                )
            if seq is not None:
                sequence.append(
                    Sample("meshtrust_federation_bundle_sequence", {"trust_domain": td}, seq)
                )
        return [
            MetricFamily(
                "meshtrust_federation_bundle_fetches",
                "Bundle endpoint fetches by trust domain and result (ok, unchanged, "
                "unreachable, invalid).",
                "counter",
                tuple(fetches),
            ),
            MetricFamily(
                "meshtrust_federation_bundle_updates",
                "Times a federated trust domain's bundle changed.",
                "counter",
                tuple(updates),
            ),
            MetricFamily(
                "meshtrust_federation_last_success_timestamp_seconds",
                "When the last good fetch of a federated bundle ended.",
                "gauge",
                tuple(success),
            ),
            MetricFamily(
                "meshtrust_federation_bundle_sequence",
                "spiffe_sequence of the federated bundle in use.",
                "gauge",
                tuple(sequence),
            ),
        ]


# --- the poller ------------------------------------------------------------------------------

Fetcher = Callable[[FederatedTrustDomain, SpiffeBundle | None], Any]  # async -> SpiffeBundle


class FederationPoller:
    """Keeps the last good bundle of each federated trust domain (see the module docs).

    ``bootstrap`` holds each ``https_spiffe`` entry's operator-given bundle; a bundle stored
    in the ledger (a previous run's last good one) is preferred to it. ``on_change`` is
    called with the trust domain and its new bundle after it is stored.
    """

    def __init__(
        self,
        peers: Sequence[FederatedTrustDomain],
        store: FederationStore,
        clock: Clock,
        *,
        bootstrap: Mapping[TrustDomain, SpiffeBundle],
        metrics: FederationMetrics | None = None,
        default_refresh: dt.timedelta = dt.timedelta(minutes=5),
        fetcher: Fetcher = fetch_bundle,
        on_change: Callable[[TrustDomain, SpiffeBundle], None] | None = None,
    ) -> None:
        self._peers = list(peers)
        self._store = store
        self._clock = clock
        self._metrics = metrics or FederationMetrics()
        self._default = default_refresh
        self._fetch = fetcher
        self._on_change = on_change
        stored = store.load_all()
        self._good: dict[TrustDomain, SpiffeBundle] = {}
        for peer in self._peers:
            td = peer.trust_domain
            if td in stored:
                self._good[td] = stored[td].bundle
            elif td in bootstrap:
                self._good[td] = bootstrap[td]
        self._tasks: list[asyncio.Task[None]] = []
        self._last_problem: dict[TrustDomain, str] = {}

    @property
    def metrics(self) -> FederationMetrics:
        return self._metrics

    def bundles(self) -> dict[TrustDomain, SpiffeBundle]:
        """The last good bundle of each federated trust domain (a copy)."""
        return dict(self._good)

    def start(self) -> None:
        for peer in self._peers:
            self._tasks.append(
                asyncio.create_task(self._run(peer), name=f"federation-{peer.trust_domain}")
            )

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def poll_once(self, peer: FederatedTrustDomain) -> bool:
        """One fetch of ``peer``; True if its bundle changed. Never raises for the
        endpoint's faults (they are logged and counted)."""
        td = peer.trust_domain
        last = self._good.get(td)
        try:
            new = await self._fetch(peer, last)
        except InvalidBundle as exc:
            self._problem(td, "invalid", str(exc))
            return False
        except (BundleFetchError, MeshTrustError) as exc:
            self._problem(td, "unreachable", str(exc))
            return False
        now = self._clock.now()
        if self._last_problem.pop(td, None) is not None:
            log.info("bundle endpoint of %s answers again", td)
        if not bundle_changed(last, new):
            self._metrics.fetched(td, "unchanged", now)
            return False
        try:
            self._store.save(new, peer.bundle_endpoint_url, now)
        except LedgerError as exc:
            # Still use it: the ledger only keeps it across restarts; try again next time.
            log.warning("federated bundle of %s not stored: %s", td, exc)
        self._good[td] = new
        self._metrics.fetched(td, "ok", now)
        self._metrics.updated(td, new.sequence)
        log.info(
            "federated bundle of %s: sequence %s, %d authorities, %d CRL(s), refresh hint %s",
            td,
            new.sequence,
            len(new.x509_authorities),
            len(new.crls),
            new.refresh_hint,
        )
        if self._on_change is not None:
            self._on_change(td, new)
        return True

    def _problem(self, td: TrustDomain, kind: str, message: str) -> None:
        self._metrics.fetched(td, kind)
        if self._last_problem.get(td) != message:  # once in a row, not at every poll
            log.warning("federated bundle of %s kept (last good one): %s", td, message)
        self._last_problem[td] = message

    async def _run(self, peer: FederatedTrustDomain) -> None:
        while True:
            try:
                await self.poll_once(peer)
            except Exception:  # a bug must not end this trust domain's polling for good
                log.exception("polling the bundle endpoint of %s failed", peer.trust_domain)
            delay = poll_delay(self._good.get(peer.trust_domain), self._default)
            await self._clock.sleep(delay.total_seconds())


def bundle_pem(bundle: SpiffeBundle) -> bytes:
    return certs_pem(bundle.x509_authorities)


def read_bootstrap_file(path: Path, trust_domain: TrustDomain) -> SpiffeBundle:
    """:func:`load_bootstrap_bundle` of a file; raises :class:`InvalidBundle` or
    :class:`BundleFetchError` (unreadable) naming it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleFetchError(f"cannot read {path}: {exc.strerror}") from None
    return load_bootstrap_bundle(data, trust_domain, str(path))


# --- assembly ------------------------------------------------------------------------------


class FederationRuntime:
    """The bundle endpoint and the poller of one CA process (the single process, or the
    supervisor of workers), started by :func:`start_federation`."""

    def __init__(
        self,
        store: FederationStore,
        endpoint: BundleEndpoint | None,
        poller: FederationPoller,
        clock: Clock,
    ) -> None:
        self.store = store
        self.endpoint = endpoint
        self.poller = poller
        self._clock = clock
        self._upkeep: asyncio.Task[None] | None = None
        #: The mesh's versioned bundle the endpoint serves (followed while it runs).
        self.own_bundle: BundleWatch | None = None
        #: The CA's CRLs the endpoint serves with it (followed while it runs).
        self.own_crls: CrlPublisher | None = None
        self._follow: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.start()
            self._upkeep = asyncio.create_task(self._renew_svid())
            if self.own_bundle is not None:
                self._follow = [
                    asyncio.create_task(self.own_bundle.run()),
                    asyncio.create_task(serve_own_bundle(self.own_bundle, self.endpoint)),
                ]
            if self.own_crls is not None:
                self._follow.append(
                    asyncio.create_task(serve_own_crls(self.own_crls, self.endpoint))
                )
        self.poller.start()

    async def _renew_svid(self) -> None:
        assert self.endpoint is not None
        while True:
            await self._clock.sleep(60)
            try:
                self.endpoint.maybe_renew(self._clock.now())
            except MeshTrustError as exc:  # keeps serving the current one meanwhile
                log.warning("bundle endpoint SVID not renewed: %s", exc)

    async def aclose(self) -> None:
        for task in self._follow:
            task.cancel()
        await asyncio.gather(*self._follow, return_exceptions=True)
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
        await self.poller.aclose()
        if self.endpoint is not None:
            await self.endpoint.aclose()
        self.store.close()


async def serve_own_crls(crls: CrlPublisher, endpoint: BundleEndpoint) -> None:
    """Serve each CRL set the CA signs (one CRL per live issuer, with the issuers) in the
    bundle document's revocation member, for federated meshes' sidecars."""
    while True:
        endpoint.set_revocation(crls.ders, crls.issuer_ders)
        await crls.wait_newer(crls.number)


async def serve_own_bundle(watch: BundleWatch, endpoint: BundleEndpoint) -> None:
    """Serve each new version of the mesh's bundle at ``endpoint`` (a root rotation A ->
    A+B -> B reaches federated peers as it happens), numbered by its version."""
    while True:
        version = watch.bundle.version
        await watch.wait_newer(version)
        endpoint.set_bundle(watch.bundle.roots, watch.bundle.version)
        log.info(
            "bundle endpoint serves bundle version %d (%d root(s))",
            watch.bundle.version,
            len(watch.bundle.roots),
        )


def check_bootstrap_bundles(config: FederationConfig | None) -> None:
    """Read every ``bootstrapBundle`` and ``caFile`` once, so a bad one stops ``ca serve``
    before it binds anything. Raises :class:`InvalidBundle` / :class:`BundleFetchError`
    naming it."""
    for peer in config.federates_with if config is not None else ():
        if peer.bootstrap_bundle is not None:
            read_bootstrap_file(peer.bootstrap_bundle, peer.trust_domain)
        if peer.ca_file is not None:
            _client_context(peer, None)  # an unreadable caFile stops start-up too


def build_federation(
    config: FederationConfig,
    material: CaMaterial,
    trust_domain: TrustDomain,
    ledger_url: str,
    clock: Clock,
) -> FederationRuntime:
    """Read what federation needs from disk and the ledger (bootstrap bundles, the stored
    bundles, the mesh's versioned bundle) and build, not start, its pieces.

    Raises :class:`InvalidBundle` / :class:`BundleFetchError` for a bad bootstrap bundle
    (naming the file), :class:`ConfigError` for an unusable endpoint certificate, and
    :class:`LedgerError`.
    """
    now = clock.now()
    bootstrap: dict[TrustDomain, SpiffeBundle] = {}
    for peer in config.federates_with:
        if peer.trust_domain == trust_domain:
            raise ConfigError(
                f"{trust_domain} is this CA's own trust domain; it cannot federate with itself",
                field="federation.federatesWith",
            )
        if peer.bootstrap_bundle is not None:
            bootstrap[peer.trust_domain] = read_bootstrap_file(
                peer.bootstrap_bundle, peer.trust_domain
            )
    store = FederationStore(ledger_url)
    try:
        endpoint = None
        own = None
        if config.bundle_endpoint is not None:
            # The mesh's versioned bundle (ca/trust.py), its version as spiffe_sequence.
            own = TrustLedger(store.engine).initialise(material.roots, now)
            endpoint = BundleEndpoint(
                config.bundle_endpoint, material, trust_domain, own.version, now
            )
            endpoint.set_bundle(own.roots, own.version)
        refresh = (
            config.bundle_endpoint.refresh_hint if config.bundle_endpoint else DEFAULT_REFRESH_HINT
        )
        poller = FederationPoller(
            config.federates_with, store, clock, bootstrap=bootstrap, default_refresh=refresh
        )
    except BaseException:
        store.close()
        raise
    runtime = FederationRuntime(store, endpoint, poller, clock)
    if endpoint is not None and own is not None:
        runtime.own_bundle = BundleWatch(TrustLedger(store.engine), own, clock)
    return runtime
