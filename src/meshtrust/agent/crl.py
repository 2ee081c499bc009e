"""Following the CA's CRL: received over the CA port, verified, handed to every output.

Theory of operation. The CRLs (one per live issuing CA: Envoy looks a leaf's CRL up by its
issuer's name and key) arrive on the trust stream (:mod:`meshtrust.agent.trust`,
which hands each one to :meth:`CrlFollower.offer`; ``GrpcCrlSource`` and :meth:`CrlFollower.
run` follow the older ``CrlService/WatchCrl`` stream, which the CA still serves). Every CRL
goes through
:func:`verify_crl` (pure) before :meth:`SecretCache.publish_crl` makes it part of the next
generation: SDS ``ROOTCA`` (``crl``, with ``only_verify_leaf_cert_crl``), the Workload API
(``X509SVIDResponse.crl``) and ``crl.pem``. A CRL that does not parse, is not signed by an
issuing CA this agent trusts, is past its ``nextUpdate`` or is older (lower CRLNumber) than
the one held is refused: logged, counted, and the last good one stays. When the CRL lists
the agent's own certificate, the rotator renews at once, authenticating with its token.

A held CRL older than :data:`MAX_CRL_AGE` (three of the CA's hourly re-signings missed) or
past its ``nextUpdate`` is reported as stale (status, metric, a log line); it is kept — its
revocations stay enforced, and its ``nextUpdate`` outlasts every certificate it could
matter for — and it does not stop rotation.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from google.protobuf import wrappers_pb2
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.encoding.proto import ProtoCodec

from meshtrust.agent.cache import SecretCache
from meshtrust.agent.rotation import backoff_delay
from meshtrust.caapi.client import client_ssl_context
from meshtrust.clock import Clock
from meshtrust.config import parse_host_port
from meshtrust.errors import CAUnavailable, InvalidCertificate, SvidVerificationError
from meshtrust.pki import TrustBundle

__all__ = [
    "MAX_CRL_AGE",
    "CrlFollower",
    "CrlSource",
    "GrpcCrlSource",
    "crl_number",
    "stale_at",
    "trusted_issuers",
    "verify_crl",
]

log = logging.getLogger("meshtrust.agent")

#: The CA's CRL stream (:data:`meshtrust.ca.crl.WATCH_CRL`; the agent imports nothing of ca).
WATCH_CRL = "/meshtrust.revocation.v1.CrlService/WatchCrl"


#: A CRL older than this is stale even before its ``nextUpdate``: the CA re-signs every hour
#: (:data:`meshtrust.ca.crl.RESIGN_PERIOD`), so three missed are an alert. Its ``nextUpdate``
#: lies as far ahead as the longest certificate the CA may issue, so that Envoy, which
#: refuses every handshake against an expired CRL, never meets one a valid certificate
#: could still need; staleness is judged by age instead.
MAX_CRL_AGE = dt.timedelta(hours=3)


def stale_at(crl: x509.CertificateRevocationList) -> dt.datetime:
    """When ``crl`` goes stale: :data:`MAX_CRL_AGE` after its ``thisUpdate``, or at its
    ``nextUpdate`` if that is sooner."""
    aged = crl.last_update_utc + MAX_CRL_AGE
    return aged if crl.next_update_utc is None else min(aged, crl.next_update_utc)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return -1


def verify_crl(
    der: bytes,
    issuers: Sequence[x509.Certificate],
    held: x509.CertificateRevocationList | None,
    now: dt.datetime,
) -> x509.CertificateRevocationList:
    """The CRL in ``der`` if it may be used: signed by one of ``issuers`` (the CA
    certificates of the agent's own chain and its trusted roots), not past ``nextUpdate``,
    a CRLNumber not below ``held``'s. Raises :class:`InvalidCertificate` (unparsable) or
    :class:`SvidVerificationError` saying why not."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise InvalidCertificate(f"the CA sent a CRL that cannot be parsed: {exc}") from None
    signer = next(
        (
            c
            for c in issuers
            if c.subject == crl.issuer and crl.is_signature_valid(c.public_key())  # type: ignore[arg-type]
        ),
        None,
    )
    if signer is None:
        raise SvidVerificationError(
            f"CRL issued by {crl.issuer.rfc4514_string()!r} is not signed by a CA this agent trusts"
        )
    if crl.next_update_utc is None or crl.next_update_utc <= now:
        raise SvidVerificationError(
            f"CRL {crl_number(crl):x} is past its nextUpdate ({crl.next_update_utc})"
        )
    if held is not None and crl_number(crl) < crl_number(held):
        raise SvidVerificationError(
            f"CRL {crl_number(crl):x} is older than the one held ({crl_number(held):x})"
        )
    return crl


def _aki(crl: x509.CertificateRevocationList) -> bytes | None:
    try:
        return crl.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier
        ).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def trusted_issuers(
    ders: Sequence[bytes], roots: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """The CA certificates among ``ders`` that chain to one of ``roots`` (directly, or
    through another of them); the others are left out."""
    pending: list[x509.Certificate] = []
    for der in ders:
        try:
            pending.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue
    good: list[x509.Certificate] = []
    anchors = list(roots)
    progress = True
    while pending and progress:
        progress = False
        for cert in list(pending):
            for parent in anchors:
                if cert.issuer != parent.subject:
                    continue
                try:
                    cert.verify_directly_issued_by(parent)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                good.append(cert)
                anchors.append(cert)
                pending.remove(cert)
                progress = True
                break
    return good


class CrlSource(Protocol):
    """A stream of DER CRLs from the CA, starting after ``held`` (a hex CRLNumber, or "")."""

    def watch(self, held: str) -> AsyncIterator[bytes]: ...


class GrpcCrlSource:
    """``CrlService/WatchCrl`` on the CA over TLS verified with ``root_pem`` (no client
    certificate: the CRL is public). With several CA addresses (replicas), a stream that
    fails moves the next :meth:`watch` to the next address; the follower's backoff paces
    the attempts. Raises :class:`CAUnavailable`."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        root_pem: bytes,
        *,
        server_name: str | None = None,
    ) -> None:
        self.addresses = (addresses,) if isinstance(addresses, str) else tuple(addresses)
        if not self.addresses:
            raise ValueError("GrpcCrlSource needs at least one CA address")
        for address in self.addresses:
            parse_host_port(address.removeprefix("dns:///"), what="CA address", zero=False)
        self._next = 0
        self._root_pem = root_pem
        self._server_name = server_name

    @property
    def address(self) -> str:
        """The address the next stream goes to."""
        return self.addresses[self._next]

    async def watch(self, held: str) -> AsyncIterator[bytes]:
        address = self.address
        host, port = parse_host_port(address.removeprefix("dns:///"), what="CA address")
        config = Configuration(ssl_target_name_override=self._server_name)
        channel = Channel(
            host,
            port,
            ssl=client_ssl_context(self._root_pem),
            config=config,
            codec=ProtoCodec(),
        )
        try:
            async with channel.request(
                WATCH_CRL,
                Cardinality.UNARY_STREAM,
                wrappers_pb2.StringValue,
                wrappers_pb2.BytesValue,
            ) as stream:
                await stream.send_message(wrappers_pb2.StringValue(value=held), end=True)
                while (message := await stream.recv_message()) is not None:
                    yield message.value
        except Exception as exc:  # OSError, TLS, grpclib's GRPCError, StreamTerminatedError
            self._next = (self._next + 1) % len(self.addresses)
            raise CAUnavailable(f"CRL stream from {address}: {exc}") from None
        finally:
            channel.close()


class CrlFollower:
    """Runs the CRL stream into ``cache``; calls ``renew`` when the CRL lists our own
    certificate. Run :meth:`run` as a task."""

    def __init__(
        self,
        source: CrlSource | None,
        cache: SecretCache,
        anchors: TrustBundle,
        clock: Clock,
        renew: Callable[[], None],
        rng: random.Random | None = None,
    ) -> None:
        self._source = source
        self._cache = cache
        self._anchors = anchors
        self._clock = clock
        self._renew = renew
        self._rng = rng or random.Random()
        self.accepted = 0
        self.refused = 0
        self.stale_alerts = 0
        self.last_error: str | None = None
        #: Set by :meth:`Agent.stop` before it cancels the task (grpclib may turn the
        #: cancellation into its own error, which would read as "reconnect").
        self.stopping = False

    async def watch_staleness(self) -> None:
        """Forever: at the held CRL's ``nextUpdate``, if no newer one came, log an error (once
        per CRL). The CRL is kept and rotation goes on (istio#61075: a bad CRL must not stop
        rotation); :meth:`stale` reports it in the status."""
        warned: int | None = None
        while True:
            crl = self._cache.crl
            if crl is None or crl_number(crl) == warned:
                await self._clock.sleep(60)
                continue
            left = (stale_at(crl) - self._clock.now()).total_seconds()
            if left > 0:
                await self._clock.sleep(min(left, 60))
                continue
            warned = crl_number(crl)
            self.stale_alerts += 1
            log.error(
                "CRL %x from the CA went stale at %s (no newer one received: %s); still using it",
                warned,
                f"{stale_at(crl):%Y-%m-%d %H:%M:%SZ}",
                self.last_error or "the CA sent none",
            )

    def stale(self, now: dt.datetime) -> bool:
        crl = self._cache.crl
        return crl is not None and stale_at(crl) <= now

    async def run(self) -> None:
        """Follow ``CrlService/WatchCrl`` (the source given); the trust stream calls
        :meth:`offer` instead."""
        if self._source is None:
            raise RuntimeError("CrlFollower.run needs a CrlSource")
        await self._cache.wait_newer(0)  # the issuing CA comes with the first certificate
        attempt = 0
        while True:
            held = self._cache.crl
            try:
                async for der in self._source.watch(
                    format(crl_number(held), "x") if held is not None else ""
                ):
                    attempt = 0
                    await self.offer(der)
            except CAUnavailable as exc:
                if self.stopping:  # grpclib may turn the cancellation into its own error
                    return
                self.last_error = str(exc)
                log.warning("CRL stream lost (%s); reconnecting", exc)
            delay = backoff_delay(attempt, 0.5, 30.0, rand=self._rng.uniform(-1, 1))
            attempt += 1
            await self._clock.sleep(delay)

    async def offer(
        self, der: bytes, others: Sequence[bytes] = (), issuer_ders: Sequence[bytes] = ()
    ) -> bool:
        """Verify and hand on the active issuer's CRL ``der`` with the other live issuers'
        (``others``; the CA sends one per issuing CA, signed by that CA, whose certificates
        are ``issuer_ders``: each is used only once it chains to a root we trust). True when
        ``der`` was accepted; another issuer's CRL that fails is left out (logged,
        counted)."""
        secret = self._cache.current
        bundle = self._cache.bundle
        roots = bundle[1] if bundle is not None else self._anchors.roots
        issuers = [
            *(secret.chain[1:] if secret is not None else ()),
            *roots,
            *trusted_issuers(issuer_ders, roots),
        ]
        now = self._clock.now()
        try:
            crl = verify_crl(der, issuers, self._cache.crl, now)
        except (InvalidCertificate, SvidVerificationError) as exc:
            self.refused += 1
            self.last_error = str(exc)
            log.error("refusing a CRL, keeping the last good one: %s", exc)
            return False
        held = {(c.issuer, _aki(c)): c for c in self._cache.crls}
        known = {_ski(c) for c in issuers}
        more: list[x509.CertificateRevocationList] = []
        for other in others:
            if other == der:
                continue
            try:
                found = x509.load_der_x509_crl(other)
                key = (found.issuer, _aki(found))
                if key[1] is not None and key[1] not in known:
                    continue  # an issuer not under our roots (the old root's, after it left)
                if key == (crl.issuer, _aki(crl)) or key in {(m.issuer, _aki(m)) for m in more}:
                    continue
                more.append(verify_crl(other, issuers, held.get(key), now))
            except (ValueError, InvalidCertificate, SvidVerificationError) as exc:
                self.refused += 1
                self.last_error = str(exc)
                log.error("refusing the CRL of another issuing CA: %s", exc)
        self.accepted += 1
        self.last_error = None
        published = await self._cache.publish_crl(crl, tuple(more))
        log.info(
            "CRL %x: %d revoked certificates (%d issuing CA(s))",
            crl_number(crl),
            len(crl),
            1 + len(more),
        )
        if published is not None and published.revoked:
            log.warning(
                "our certificate %s is revoked; renewing now with the token",
                published.serial_hex,
            )
            self._renew()
        return True
