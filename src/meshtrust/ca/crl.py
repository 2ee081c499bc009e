"""The CA's certificate revocation lists: built, re-signed, and pushed to agents.

One CRL per live issuing CA (every signing slot: active, prepared, old), each signed by that
CA's key: Envoy and ``openssl -crl_check`` look a leaf's CRL up by its issuer's name and
key, so a new intermediate needs its own CRL in every sidecar before its first leaf.

Theory of operation. :func:`build_crl` is pure: an X.509 v2 CRL of a
:class:`~meshtrust.ca.revocation.RevocationState`, signed by the issuing CA (the key that
signs workload certificates, so the CRL's issuer is every leaf's issuer), ``thisUpdate`` now,
``nextUpdate`` :data:`CRL_VALIDITY` later, a :func:`crl_number` that grows with the ledger's
revision and, within one revision, with time. :class:`CrlPublisher` re-signs it whenever
the revision changes (the :class:`~meshtrust.ca.revocation.RevocationWatch` tells it) and
every :data:`RESIGN_PERIOD`, so a CRL an agent holds is never older than that while the CA
is up, and ``nextUpdate`` leaves :data:`CRL_VALIDITY` − :data:`RESIGN_PERIOD` of CA outage
before it goes stale.

Distribution: agents keep one server-streaming call open on the CA's own gRPC port,
``meshtrust.revocation.v1.CrlService/WatchCrl`` (request: ``google.protobuf.StringValue``,
the CRL number the agent holds, in hex, or empty; answers: ``google.protobuf.BytesValue``,
each a whole DER CRL). The CA sends the current CRL at once unless the agent holds it, then
every new one. Why a stream rather than polling with ETag: a revocation reaches an agent as
soon as its CA process reads it (no poll interval to wait out), and an idle stream costs the
CA nothing per second, where 10,000 agents polling every 5 s would be 2,000 requests/s
(each a TLS connection with meshtrust's connection-per-request client): more than the CA
spends signing. The numbers are in docs/revocation.md. The CRL is public and signed, so the
call needs no client authentication; agents check the signature against the CA they trust.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import wrappers_pb2
from grpclib.const import Cardinality, Handler
from grpclib.server import Stream

from meshtrust.ca.revocation import RevocationState, RevocationWatch
from meshtrust.clock import Clock
from meshtrust.pki.keys import signature_hash
from meshtrust.pki.profile import Signer

__all__ = [
    "CRL_SERVICE",
    "CRL_VALIDITY",
    "RESIGN_PERIOD",
    "WATCH_CRL",
    "CrlPublisher",
    "CrlService",
    "build_crl",
    "crl_number",
]

log = logging.getLogger("meshtrust.ca")

#: How long a CRL is valid (``nextUpdate`` − ``thisUpdate``).
CRL_VALIDITY = dt.timedelta(hours=24)
#: How often the CRL is re-signed when nothing changed.
RESIGN_PERIOD = dt.timedelta(hours=1)
CRL_SERVICE = "meshtrust.revocation.v1.CrlService"
WATCH_CRL = f"/{CRL_SERVICE}/WatchCrl"
_MS_BITS = 48
_DER = serialization.Encoding.DER


def crl_number(revision: int, now: dt.datetime) -> int:
    """The CRLNumber: the revision in the high bits, milliseconds since the epoch in the low
    48. A newer revision always has a higher number, whichever replica signed it; within a
    revision a later re-signing has a higher one."""
    ms = int(now.timestamp() * 1000) & ((1 << _MS_BITS) - 1)
    return (revision << _MS_BITS) | ms


def build_crl(
    signer: Signer,
    state: RevocationState,
    now: dt.datetime,
    validity: dt.timedelta = CRL_VALIDITY,
) -> x509.CertificateRevocationList:
    """The CRL of ``state`` signed by ``signer`` at ``now`` (pure but for the signature)."""
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            signer.cert.public_key()  # type: ignore[arg-type]
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(signer.cert.subject)
        .last_update(now)
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(crl_number(state.revision, now)), critical=False)
        .add_extension(aki, critical=False)
    )
    for rev in sorted(state.revoked.values(), key=lambda r: r.serial):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(rev.serial, 16))
            .revocation_date(min(rev.revoked_at, now))
        )
        if rev.reason is not x509.ReasonFlags.unspecified:  # RFC 5280: absent, not "0"
            entry = entry.add_extension(x509.CRLReason(rev.reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(signer.key, signature_hash(signer.key))


def number_of(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


#: Every live issuing CA: its signer and its chain (signing CA first), the active one first.
Issuers = Callable[[], Sequence[tuple[Signer, Sequence[x509.Certificate]]]]


def _issuer_key(signer: Signer) -> tuple[bytes, bytes]:
    public = signer.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return signer.cert.subject.public_bytes(), public


class CrlPublisher:
    """Holds the current signed CRLs, one per live issuing CA; re-signs them on a new
    revision, when the issuing CAs change (:meth:`refresh`) and every period.

    :attr:`crl`/:attr:`der` are the active issuer's (what ``WatchCrl`` serves to agents of
    earlier releases); :attr:`ders` every issuer's, active first, and :attr:`issuer_ders`
    their certificates, for the trust stream. Envoy finds a leaf's CRL by its issuer's name
    *and* key, so each issuer needs its own: a prepared signing CA's CRL is published from
    the moment the slot exists, before its first leaf. Issuers with the same name and key
    (a successor that kept the key) share one CRL. All CRLs of one signing have the same
    CRLNumber."""

    def __init__(
        self,
        signer: Signer,
        watch: RevocationWatch,
        clock: Clock,
        resign: dt.timedelta = RESIGN_PERIOD,
        validity: dt.timedelta = CRL_VALIDITY,
        issuers: Issuers | None = None,
    ) -> None:
        self._signer = signer
        self._issuers = issuers
        self._watch = watch
        self._clock = clock
        self._resign = resign
        self._validity = validity
        self._changed = asyncio.Condition()
        self._refresh = asyncio.Event()
        self._updates = watch.subscribe()
        self.crl, self.der, self.ders, self.issuer_ders = self._sign(watch.state)
        self.number = number_of(self.crl)

    def _live(self) -> list[tuple[Signer, Sequence[x509.Certificate]]]:
        found = list(self._issuers()) if self._issuers is not None else []
        if not found:
            found = [(self._signer, (self._signer.cert,))]
        seen: set[tuple[bytes, bytes]] = set()
        out = []
        for signer, chain in found:
            key = _issuer_key(signer)
            if key not in seen:
                seen.add(key)
                out.append((signer, chain))
        return out

    def _sign(
        self, state: RevocationState
    ) -> tuple[x509.CertificateRevocationList, bytes, tuple[bytes, ...], tuple[bytes, ...]]:
        now = self._clock.now()
        live = self._live()
        crls = [build_crl(signer, state, now, self._validity) for signer, _ in live]
        certs: dict[bytes, None] = {}
        for _, chain in live:
            for cert in chain:
                certs.setdefault(cert.public_bytes(_DER))
        ders = tuple(c.public_bytes(_DER) for c in crls)
        return crls[0], ders[0], ders, tuple(certs)

    def refresh(self) -> None:
        """The issuing CAs changed: re-sign now (from the event loop)."""
        self._refresh.set()

    async def publish_now(self) -> None:
        """Re-sign at once with the issuers and revocations known now."""
        await self._publish(self._watch.state)

    async def _publish(self, state: RevocationState) -> None:
        crl, der, ders, issuer_ders = self._sign(state)
        async with self._changed:
            self.crl, self.der, self.number = crl, der, number_of(crl)
            self.ders, self.issuer_ders = ders, issuer_ders
            self._changed.notify_all()
        log.info(
            "CRL %x signed by %d issuer(s): %d revoked", self.number, len(ders), len(state.revoked)
        )

    async def wait_newer(self, number: int) -> None:
        """Return once the current CRL's number is not ``number``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.number != number)

    async def run(self) -> None:
        """Forever: re-sign on each new state from the watch, or when the period is up."""
        while True:
            update = asyncio.ensure_future(self._updates.get())
            sleep = asyncio.ensure_future(self._clock.sleep(self._resign.total_seconds()))
            refresh = asyncio.ensure_future(self._refresh.wait())
            try:
                await asyncio.wait((update, sleep, refresh), return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleep.cancel()
                refresh.cancel()
                self._refresh.clear()
                if not update.done():
                    update.cancel()
            state = update.result() if update.done() and not update.cancelled() else None
            while not self._updates.empty():  # several revisions at once: sign the last
                state = self._updates.get_nowait()
            await self._publish(state or self._watch.state)


class CrlService:
    """``CrlService/WatchCrl`` on the CA port (see the module docstring)."""

    def __init__(self, publisher: CrlPublisher) -> None:
        self._publisher = publisher

    def __mapping__(self) -> dict[str, Handler]:
        return {
            WATCH_CRL: Handler(
                self.watch_crl,
                Cardinality.UNARY_STREAM,
                wrappers_pb2.StringValue,
                wrappers_pb2.BytesValue,
            )
        }

    async def watch_crl(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        held = request.value.strip().lower() if request is not None else ""
        publisher = self._publisher
        while True:
            number, der = publisher.number, publisher.der
            if format(number, "x") != held:
                await stream.send_message(wrappers_pb2.BytesValue(value=der))
                held = format(number, "x")
            await publisher.wait_newer(number)
