"""The certificate authority's decisions: who is asking, what they may get, and signing.

Pure decisions (:func:`check_ttl`, :func:`decide_identity`) are plain functions; the
:class:`CertificateAuthority` strings them together with the authenticators, the signer,
the ledger and the metrics, all passed in. Transport (gRPC, TLS) lives in
:mod:`meshtrust.ca.server`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import serialization

from meshtrust.ca.authn import Caller, ClientCertAuthenticator, JwtAuthenticator
from meshtrust.ca.cadir import CaMaterial
from meshtrust.ca.join import JoinAuthenticator, JoinGrant, is_join_token
from meshtrust.ca.ledger import IssuedRecord, LedgerWriter
from meshtrust.ca.metrics import CaEvent, CaMetricsSink
from meshtrust.ca.refusals import RefusalLog
from meshtrust.ca.revocation import RevocationState
from meshtrust.ca.signing import SigningMaterial
from meshtrust.clock import Clock
from meshtrust.durations import format_duration
from meshtrust.errors import (
    AuthenticationError,
    InvalidCSR,
    InvalidInput,
    InvalidSpiffeId,
    LedgerError,
    PermissionDenied,
)
from meshtrust.pki import CsrRequest, format_serial, parse_csr
from meshtrust.pki.profile import LeafIssuer
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "CaPolicy",
    "CertificateAuthority",
    "Credentials",
    "InvalidTTL",
    "RemoteTokenAuthenticator",
    "RevocationView",
    "SigningView",
    "check_ttl",
    "decide_identity",
]

log = logging.getLogger("meshtrust.ca")


class InvalidTTL(InvalidInput):
    """A requested certificate lifetime that is negative or above the maximum."""


@dataclass(frozen=True, slots=True)
class CaPolicy:
    trust_domain: TrustDomain
    default_ttl: dt.timedelta = dt.timedelta(hours=24)
    max_ttl: dt.timedelta = dt.timedelta(days=90)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the transport learned about the caller."""

    bearer_token: str | None
    peer_cert_der: bytes | None


class RevocationView(Protocol):
    """What the authority reads of revocations (a :class:`RevocationWatch`)."""

    @property
    def state(self) -> RevocationState: ...


class SigningView(Protocol):
    """What the authority signs with now (a :class:`~meshtrust.ca.signing.SigningWatch`,
    which follows the ledger's active slot)."""

    def current(self) -> SigningMaterial: ...


class RemoteTokenAuthenticator(Protocol):
    """A bearer-token authenticator that may ask someone (the Kubernetes API server)."""

    async def authenticate(self, token: str, now: dt.datetime) -> Caller: ...


def check_ttl(validity_seconds: int, policy: CaPolicy) -> dt.timedelta:
    """The lifetime to issue for a requested ``validity_duration``.

    0 means the default (as in Istio); negative or above ``max_ttl`` is refused, never clamped.
    """
    if validity_seconds < 0:
        raise InvalidTTL(f"requested TTL {validity_seconds}s is negative")
    if validity_seconds == 0:
        return policy.default_ttl
    # Compare as integers first: an int64 from the wire may not fit a timedelta.
    if validity_seconds > policy.max_ttl.total_seconds():
        shown = (
            format_duration(dt.timedelta(seconds=validity_seconds))
            if validity_seconds < 10**12
            else f"{validity_seconds}s"
        )
        raise InvalidTTL(
            f"requested TTL {shown} is above the maximum {format_duration(policy.max_ttl)}"
        )
    return dt.timedelta(seconds=validity_seconds)


def decide_identity(csr: CsrRequest, caller: Caller) -> SpiffeId:
    """The identity to certify: always the caller's. The CSR may only ask for exactly that.

    Raises :class:`PermissionDenied` when the CSR asks for another SPIFFE ID, extra SANs or a
    CA certificate, and :class:`InvalidCSR` for more than one URI SAN or a malformed one.
    """
    if csr.requests_ca:
        raise PermissionDenied("CSR asks for a CA certificate; workloads get leaf certificates")
    if csr.other_sans:
        raise PermissionDenied(
            f"CSR asks for SANs other than a SPIFFE ID ({len(csr.other_sans)} extra); "
            "only the caller's own SPIFFE ID can be certified"
        )
    if len(csr.uri_sans) > 1:
        raise InvalidCSR(f"CSR has {len(csr.uri_sans)} URI SANs; an SVID has exactly one")
    if csr.uri_sans and csr.uri_sans[0] != str(caller.identity):
        # Only a SAN that is not exactly the caller's ID needs parsing, to say what is wrong.
        try:
            asked = SpiffeId.parse(csr.uri_sans[0])
        except InvalidSpiffeId as exc:
            raise InvalidCSR(f"CSR URI SAN is not a valid SPIFFE ID: {exc}") from exc
        if asked != caller.identity:
            raise PermissionDenied(
                f"CSR asks for {asked} but the caller is authenticated as {caller.identity}"
            )
    return caller.identity


class CertificateAuthority:
    """Authenticate, decide, sign, record. One instance per process."""

    def __init__(
        self,
        material: CaMaterial,
        policy: CaPolicy,
        clock: Clock,
        ledger: LedgerWriter,
        metrics: CaMetricsSink,
        jwt_authenticator: JwtAuthenticator | None,
        cert_authenticator: ClientCertAuthenticator | None,
        remote_authenticators: Sequence[RemoteTokenAuthenticator] = (),
        join_authenticator: JoinAuthenticator | None = None,
        revocations: RevocationView | None = None,
        signing: SigningView | None = None,
        cert_authenticator_for: Callable[[SigningMaterial], ClientCertAuthenticator] | None = None,
    ) -> None:
        """``signing``: follow the active signing slot (intermediate rotation); each new
        signer is also handed to ``cert_authenticator_for``, which makes the client
        certificate authenticator that knows every live intermediate."""
        self.material = material
        self.policy = policy
        self._clock = clock
        self._ledger = ledger
        self._metrics = metrics
        self._jwt = jwt_authenticator
        self._certauth = cert_authenticator
        self._remote = tuple(remote_authenticators)
        self._join = join_authenticator
        self._revocations = revocations
        # Refusals are logged through a throttle: a flood of bad requests cannot fill the log.
        self.refusals = RefusalLog(log, clock)
        self._ledger_errors = RefusalLog(log, clock)
        self._issuer = LeafIssuer(material.signer)
        # The tail of every response: intermediates one per element, the root bundle last.
        self._chain_tail: list[str] = [
            c.public_bytes(serialization.Encoding.PEM).decode() for c in material.intermediates
        ] + [material.root_bundle_pem]
        self._signing = signing
        self._certauth_for = cert_authenticator_for
        self._signing_now: SigningMaterial | None = None
        self._follow_signing()

    def _follow_signing(self) -> None:
        """Sign with the signing view's current material (one identity check per request:
        the watch replaces the object when the active slot changes)."""
        if self._signing is None:
            return
        current = self._signing.current()
        if current is self._signing_now:
            return
        self._signing_now = current
        self._issuer = LeafIssuer(current.signer)
        self._chain_tail = current.chain_tail
        if self._certauth_for is not None:
            self._certauth = self._certauth_for(current)

    @property
    def trust_domain(self) -> TrustDomain:
        return self.policy.trust_domain

    def authenticate(self, creds: Credentials) -> Caller | JoinGrant:
        """Client certificate first, then bearer token (a join token gives a
        :class:`JoinGrant`, turned into a caller once the CSR says which of its identities).
        Raises :class:`AuthenticationError`."""
        now = self._clock.now()
        reasons: list[str] = []
        if creds.peer_cert_der is not None and self._certauth is not None:
            try:
                return self._certauth.authenticate(creds.peer_cert_der, now)
            except AuthenticationError as exc:
                reasons.append(str(exc))
        if creds.bearer_token is not None and is_join_token(creds.bearer_token):
            if self._join is None:
                raise AuthenticationError("this CA does not accept join tokens")
            return self._join.authenticate(creds.bearer_token, now)  # after any cert reason
        if creds.bearer_token is not None and self._jwt is not None:
            try:
                return self._jwt.authenticate(creds.bearer_token, now)
            except AuthenticationError as exc:
                reasons.append(str(exc))
        if not reasons:
            reasons.append("no bearer token and no client certificate")
        raise AuthenticationError("; ".join(reasons))

    async def _authenticate(self, creds: Credentials) -> Caller | JoinGrant:
        """:meth:`authenticate`, then each remote authenticator (TokenReview, cluster JWKS)
        for a bearer token the local ones refused (never a join token: it is ours alone, and
        must not travel to an API server)."""
        try:
            return self.authenticate(creds)
        except AuthenticationError as exc:
            token = creds.bearer_token
            if token is None or not self._remote or is_join_token(token):
                raise
            reasons = [str(exc)]
        for remote in self._remote:
            try:
                return await remote.authenticate(token, self._clock.now())
            except AuthenticationError as exc:
                reasons.append(str(exc))
        raise AuthenticationError("; ".join(reasons))

    async def create_certificate(
        self, csr_pem: str, validity_seconds: int, creds: Credentials
    ) -> list[str]:
        """Handle one CreateCertificate: returns ``[leaf, intermediates..., root bundle]``.

        Raises :class:`AuthenticationError`, :class:`InvalidCSR`, :class:`InvalidTTL`,
        :class:`PermissionDenied` or :class:`LedgerError`; each is counted and logged.
        """
        self._metrics.observe(CaEvent.CSR)
        self._follow_signing()
        try:
            caller = await self._authenticate(creds)
        except AuthenticationError as exc:
            self._metrics.observe(CaEvent.AUTHN_FAILURE)
            self.refusals.warning("refused: unauthenticated: %s", exc)
            raise
        try:
            csr = parse_csr(csr_pem)
        except InvalidCSR as exc:
            self._metrics.observe(CaEvent.CSR_PARSE_ERROR)
            self.refusals.warning("refused %s: bad CSR: %s", caller.identity, exc)
            raise
        if isinstance(caller, JoinGrant):
            try:
                caller = caller.caller_for(csr)
            except PermissionDenied as exc:
                self._metrics.observe(CaEvent.PERMISSION_DENIED)
                self.refusals.warning("refused %s: %s", caller.identity, exc)
                raise
            except InvalidCSR as exc:
                self._metrics.observe(CaEvent.CSR_PARSE_ERROR)
                self.refusals.warning("refused %s: bad CSR: %s", caller.identity, exc)
                raise
        try:
            ttl = check_ttl(validity_seconds, self.policy)
        except InvalidTTL as exc:
            self._metrics.observe(CaEvent.INVALID_TTL)
            self.refusals.warning("refused %s: %s", caller.identity, exc)
            raise
        try:
            identity = decide_identity(csr, caller)
        except PermissionDenied as exc:
            self._metrics.observe(CaEvent.PERMISSION_DENIED)
            self.refusals.warning(
                "refused %s (%s %s): %s", caller.identity, caller.authenticator, caller.subject, exc
            )
            raise
        except InvalidCSR as exc:
            self._metrics.observe(CaEvent.CSR_PARSE_ERROR)
            self.refusals.warning("refused %s: bad CSR: %s", caller.identity, exc)
            raise

        self._refuse_blocked(identity, caller)
        now = self._clock.now()
        leaf = self._issuer.issue(csr.public_key, identity, now, ttl)
        leaf_pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
        serial = format_serial(leaf.serial_number)
        record = IssuedRecord(
            serial=serial,
            spiffe_id=str(identity),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            key_type=csr.key_type,
            requester=caller.subject,
            authenticator=caller.authenticator,
            issued_at=now,
            cert_pem=leaf_pem,
        )
        try:
            await self._ledger.record(record)
        except LedgerError as exc:
            self._metrics.observe(CaEvent.LEDGER_ERROR)
            self._ledger_errors.error("not issuing %s: %s", identity, exc)
            raise
        self._metrics.observe(CaEvent.ISSUED)
        log.info(
            "issued serial=%s to %s via %s (%s) key=%s ttl=%s",
            serial,
            identity,
            caller.authenticator,
            caller.subject,
            csr.key_type,
            format_duration(ttl),
        )
        return [leaf_pem, *self._chain_tail]

    def _refuse_blocked(self, identity: SpiffeId, caller: Caller) -> None:
        """Raise :class:`PermissionDenied` (counted, logged) when ``identity`` is blocked."""
        block = self._revocations.state.block(identity) if self._revocations else None
        if block is None:
            return
        self._metrics.observe(CaEvent.BLOCKED)
        self.refusals.warning(
            "refused %s (%s %s): identity blocked", identity, caller.authenticator, caller.subject
        )
        raise PermissionDenied(
            f"issuance for {identity} is blocked since {block.blocked_at:%Y-%m-%d %H:%M:%SZ}"
            f" by {block.actor}{': ' + block.why if block.why else ''}; "
            f"`meshtrust ca unblock --spiffe-id {identity}` lifts it"
        )
