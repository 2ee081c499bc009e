"""Following the CA's trust stream: the mesh bundle and the CRL, verified, handed on, reported.

Theory of operation. :class:`TrustFollower` keeps one ``TrustService/WatchTrust`` stream
open to the CA (:mod:`meshtrust.ca.trust`), authenticated both ways: the CA's certificate
must chain to the bundle the agent holds *now* (a new bundle only ever arrives over a
channel the current one vouched for), and the agent presents its workload certificate.
Each update carries the bundle version, its roots and the CRL:

- the bundle goes through :func:`verify_bundle` (pure): at least one root, every root a
  parsable CA certificate, no version older than the one held, no other roots under the
  version held. Refused: logged, counted, the last good bundle stays.
- A new version is published as one generation (:meth:`SecretCache.publish_bundle`): SDS
  ``ROOTCA`` with every root, the Workload API bundle, ``root-cert.pem``/``bundle.pem``.
  When the *roots* changed, the certificate is re-issued at once (as Istio does since
  istio#47424), so a workload never waits its whole rotation period to move to a new chain.
- Once the generation was handed on (``handed_on``: the files written; SDS and the Workload
  API push from the cache as it changes), the agent reports ``serving_version`` on the
  stream: what ``meshtrust ca rotation status`` shows.
- The CRL goes to :class:`~meshtrust.agent.crl.CrlFollower` (verified the same way as ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.encoding.proto import ProtoCodec

from meshtrust.agent.cache import SecretCache
from meshtrust.agent.crl import CrlFollower, crl_number, trusted_issuers
from meshtrust.agent.federated import FederatedIntake
from meshtrust.agent.rotation import backoff_delay
from meshtrust.caapi.client import client_ssl_context
from meshtrust.caapi.trust import trust_pb2
from meshtrust.clock import Clock
from meshtrust.config import parse_host_port
from meshtrust.errors import CAUnavailable, SvidVerificationError

__all__ = [
    "GrpcTrustSource",
    "TrustFollower",
    "TrustSource",
    "TrustUpdate",
    "verify_bundle",
]

log = logging.getLogger("meshtrust.agent")

#: How long a new bundle may take to reach every output (files) before it is reported served.
HANDED_ON_WAIT = 30.0
#: Root rotation: re-issues until our certificate chains to the new root, and the pause
#: before each retry (a CA process follows a new signing slot within a second).
MOVE_ATTEMPTS = 20
MOVE_RETRY = 1.0
#: The CA's trust stream (:data:`meshtrust.ca.trust.WATCH_TRUST`).
WATCH_TRUST = "/meshtrust.trust.v1.TrustService/WatchTrust"


@dataclass(frozen=True)
class TrustUpdate:
    """One message of the stream, as received (nothing verified yet)."""

    bundle_version: int
    roots: tuple[bytes, ...]  # DER
    crl: bytes  # DER, or empty: unchanged
    crls: tuple[bytes, ...] = ()  # every live issuing CA's CRL, DER
    crl_issuers: tuple[bytes, ...] = ()  # their certificates, DER; the active one's first
    federated: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)  # name -> DERs
    #: name -> (its CRLs, their issuers), DER: what its CA publishes with its bundle.
    federated_revocation: Mapping[str, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = field(
        default_factory=dict
    )


def verify_bundle(
    version: int,
    roots_der: Sequence[bytes],
    held: tuple[int, tuple[x509.Certificate, ...]] | None,
    now: dt.datetime,
) -> tuple[x509.Certificate, ...]:
    """The roots of bundle ``version`` if they may be used. Raises
    :class:`SvidVerificationError` saying why not: version 0, no roots, a root that does not
    parse, is not a CA (BasicConstraints CA=true) or has expired, the same root twice, a
    version older than the one ``held``, or other roots under the version held."""
    if version <= 0:
        raise SvidVerificationError(f"trust bundle version {version} is not a version")
    if not roots_der:
        raise SvidVerificationError(f"trust bundle version {version} has no roots")
    roots: list[x509.Certificate] = []
    for i, der in enumerate(roots_der, 1):
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise SvidVerificationError(
                f"trust bundle version {version}: root {i} is not a DER certificate"
            ) from None
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        name = cert.subject.rfc4514_string()
        if not ca:
            raise SvidVerificationError(
                f"trust bundle version {version}: root {i} ({name}) is not a CA certificate"
            )
        if cert.not_valid_after_utc <= now:
            raise SvidVerificationError(
                f"trust bundle version {version}: root {i} ({name}) expired at "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
            )
        if cert in roots:
            raise SvidVerificationError(f"trust bundle version {version}: root {i} is repeated")
        roots.append(cert)
    if held is not None:
        held_version, held_roots = held
        if version < held_version:
            raise SvidVerificationError(
                f"trust bundle version {version} is older than the one held ({held_version})"
            )
        if version == held_version and set(roots) != set(held_roots):
            raise SvidVerificationError(
                f"trust bundle version {version} has other roots than the version {version} held"
            )
    return tuple(roots)


def _root_of(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The root of ``roots`` that the top of ``chain`` is issued by, or None."""
    top = chain[-1]
    for root in roots:
        if top == root:
            return root
        if top.issuer != root.subject:
            continue
        try:
            top.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return root
    return None


class TrustSource(Protocol):
    """The stream: :meth:`watch` yields updates; :meth:`report` says what we serve on it."""

    def watch(self, serving: int, held_crl: str) -> AsyncIterator[TrustUpdate]: ...

    async def report(self, serving: int) -> None: ...


class GrpcTrustSource:
    """``TrustService/WatchTrust`` over TLS verified with ``roots_pem()`` (the bundle held
    when the stream opens), presenting ``client_cert()`` (chain PEM, key PEM). With several CA
    addresses, a stream that fails moves the next :meth:`watch` to the next address. Raises
    :class:`CAUnavailable`."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        roots_pem: Callable[[], bytes],
        client_cert: Callable[[], tuple[bytes, bytes] | None],
        *,
        server_name: str | None = None,
    ) -> None:
        self.addresses = (addresses,) if isinstance(addresses, str) else tuple(addresses)
        if not self.addresses:
            raise ValueError("GrpcTrustSource needs at least one CA address")
        for address in self.addresses:
            parse_host_port(address.removeprefix("dns:///"), what="CA address", zero=False)
        self._next = 0
        self._roots_pem = roots_pem
        self._client_cert = client_cert
        self._server_name = server_name
        self._stream: Stream[Any, Any] | None = None

    async def watch(self, serving: int, held_crl: str) -> AsyncIterator[TrustUpdate]:
        address = self.addresses[self._next]
        host, port = parse_host_port(address.removeprefix("dns:///"), what="CA address")
        cert = self._client_cert()
        if cert is None:
            raise CAUnavailable("the trust stream needs our certificate, and there is none yet")
        try:
            ssl = client_ssl_context(self._roots_pem(), cert)
        except (ValueError, OSError) as exc:
            raise CAUnavailable(f"trust stream: unusable TLS material: {exc}") from None
        channel = Channel(
            host,
            port,
            ssl=ssl,
            config=Configuration(ssl_target_name_override=self._server_name),
            codec=ProtoCodec(),
        )
        try:
            async with channel.request(
                WATCH_TRUST,
                Cardinality.STREAM_STREAM,
                trust_pb2.TrustReport,
                trust_pb2.TrustUpdate,
            ) as stream:
                await stream.send_message(
                    trust_pb2.TrustReport(serving_version=serving, held_crl=held_crl)
                )
                self._stream = stream
                while (message := await stream.recv_message()) is not None:
                    yield TrustUpdate(
                        message.bundle_version,
                        tuple(message.roots),
                        message.crl,
                        tuple(message.crls),
                        tuple(message.crl_issuers),
                        {td: tuple(b.roots) for td, b in message.federated.items()},
                        {
                            td: (tuple(b.crls), tuple(b.crl_issuers))
                            for td, b in message.federated.items()
                            if b.crls
                        },
                    )
                self._stream = None
                # The CA ended it (its status is raised on leaving the block): end ours too,
                # or grpclib calls it a protocol error and hides the CA's reason.
                with contextlib.suppress(Exception):
                    await stream.end()
        except Exception as exc:  # OSError, TLS, grpclib's GRPCError, StreamTerminatedError
            self._next = (self._next + 1) % len(self.addresses)
            raise CAUnavailable(f"trust stream from {address}: {exc}") from None
        finally:
            self._stream = None
            channel.close()
        self._next = (self._next + 1) % len(self.addresses)
        raise CAUnavailable(f"trust stream from {address}: the CA ended it")

    async def report(self, serving: int) -> None:
        stream = self._stream
        if stream is not None:
            await stream.send_message(trust_pb2.TrustReport(serving_version=serving))


class TrustFollower:
    """Runs the trust stream into ``cache``; run :meth:`run` as a task. ``renew`` re-issues
    the certificate at once; ``handed_on(generation)`` returns once every output has that
    generation; ``on_roots(roots)`` hears of every accepted bundle."""

    def __init__(
        self,
        source: TrustSource,
        cache: SecretCache,
        crl: CrlFollower,
        clock: Clock,
        renew: Callable[[], None],
        handed_on: Callable[[int], Awaitable[None]],
        initial_roots: tuple[x509.Certificate, ...],
        rng: random.Random | None = None,
        on_roots: Callable[[tuple[x509.Certificate, ...]], None] | None = None,
    ) -> None:
        self._source = source
        self._cache = cache
        self._crl = crl
        self._clock = clock
        self._renew = renew
        self._handed_on = handed_on
        self._initial_roots = initial_roots
        self._on_roots = on_roots
        self.federated = FederatedIntake(cache)  # federated trust domains' bundles
        self._rng = rng or random.Random()
        self.accepted = 0
        self.refused = 0
        self.serving = 0
        #: Set by :meth:`Agent.stop` before it cancels the task (see :meth:`_run`).
        self.stopping = False
        self.last_error: str | None = None
        self._moved_to: x509.Certificate | None = None
        self._confirming: asyncio.Future[None] | None = None
        self._last_leaf: x509.Certificate | None = None

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._confirming is not None:
                self._confirming.cancel()

    async def _run(self) -> None:
        await self._cache.wait_newer(0)  # the stream is authenticated by our certificate
        attempt = 0
        while True:
            held = self._cache.crl
            try:
                async for update in self._source.watch(
                    self.serving, format(crl_number(held), "x") if held is not None else ""
                ):
                    attempt = 0
                    if await self.offer(update):
                        await self._source.report(self.serving)
            except CAUnavailable as exc:
                if self.stopping:  # grpclib may turn the cancellation into its own error
                    return
                self.last_error = str(exc)
                log.warning("trust stream lost (%s); reconnecting", exc)
            delay = backoff_delay(attempt, 0.5, 30.0, rand=self._rng.uniform(-1, 1))
            attempt += 1
            await self._clock.sleep(delay)

    async def offer(self, update: TrustUpdate) -> bool:
        """Verify and hand on one update; True when a new bundle version is now served."""
        if update.crl:
            await self._crl.offer(update.crl, update.crls, update.crl_issuers)
            self._reissue_for_new_root(update)
        await self.federated.offer(
            update.federated, self._clock.now(), update.federated_revocation
        )
        held = self._cache.bundle
        if held is not None and held[0] == update.bundle_version:
            try:
                verify_bundle(update.bundle_version, update.roots, held, self._clock.now())
            except SvidVerificationError as exc:
                self._refuse(exc)
            return False
        try:
            roots = verify_bundle(update.bundle_version, update.roots, held, self._clock.now())
        except SvidVerificationError as exc:
            self._refuse(exc)
            return False
        self.accepted += 1
        self.last_error = None
        before = held[1] if held is not None else self._initial_roots
        published = await self._cache.publish_bundle(update.bundle_version, roots)
        if self._on_roots is not None:
            self._on_roots(roots)  # e.g. the CA client: renewals trust the bundle too
        log.info("trust bundle version %d: %d root(s)", update.bundle_version, len(roots))
        if set(roots) != set(before):
            log.warning(
                "the mesh's roots changed (bundle version %d); re-issuing our certificate now",
                update.bundle_version,
            )
            self._renew()
        if published is not None:
            try:
                await asyncio.wait_for(self._handed_on(published.generation), HANDED_ON_WAIT)
            except TimeoutError:
                # Not serving it everywhere (a full disk?): say so, and do not claim it. The
                # stream goes on (CRLs must still arrive); the next change tries again.
                log.error(
                    "bundle version %d not written to every output within %.0f s; "
                    "not reporting it as served",
                    update.bundle_version,
                    HANDED_ON_WAIT,
                )
                return False
        self.serving = update.bundle_version
        return True

    def _reissue_for_new_root(self, update: TrustUpdate) -> None:
        """Root rotation, phase 2: the CA's active issuer (the first of ``crl_issuers``)
        chains to another root than our certificate does: re-issue now, so the whole mesh
        moves to the new root at once instead of at each workload's next renewal. (An
        intermediate rotation under the same root changes nothing here.)"""
        secret = self._cache.current
        if secret is None or not update.crl_issuers:
            return
        try:
            active = x509.load_der_x509_certificate(update.crl_issuers[0])
        except ValueError:
            return
        if active in secret.chain[1:]:
            return
        bundle = self._cache.bundle
        roots = bundle[1] if bundle is not None else self._initial_roots
        if not trusted_issuers([update.crl_issuers[0]], roots):
            return  # not chaining to a root we trust (yet): nothing to move to
        ours = _root_of(secret.chain, roots)
        theirs = _root_of((active,), roots)
        if ours is None or theirs is None or ours == theirs or self._moved_to == theirs:
            return
        self._moved_to = theirs
        log.warning(
            "the CA signs under another root now (%s); re-issuing our certificate now",
            theirs.subject.rfc4514_string(),
        )
        self._renew()
        self._last_leaf = secret.leaf
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.ensure_future(self._confirm_move(secret.generation))

    async def _confirm_move(self, generation: int) -> None:
        """Renew again until our certificate chains to the root the CA moved to: the CA
        replica (or worker) that answers the renewal may not have followed the new signing
        slot yet (each follows the ledger within a second)."""
        for _ in range(MOVE_ATTEMPTS):
            secret = await self._cache.wait_newer(generation)
            generation = secret.generation
            target = self._moved_to
            bundle = self._cache.bundle
            roots = bundle[1] if bundle is not None else self._initial_roots
            if target is None or _root_of(secret.chain, roots) == target:
                return
            if secret.leaf == self._last_leaf:
                continue  # the same certificate re-published (a bundle or CRL change)
            self._last_leaf = secret.leaf
            await self._clock.sleep(MOVE_RETRY)
            log.warning("our new certificate still chains to the old root; re-issuing again")
            self._renew()

    def _refuse(self, exc: SvidVerificationError) -> None:
        self.refused += 1
        self.last_error = str(exc)
        log.error("refusing a trust bundle, keeping the last good one: %s", exc)
