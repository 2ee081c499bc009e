"""Join tokens: the credential that starts a host (SPIRE join tokens, Istio VM onboarding).

A join token is a JWT of the CA's own token issuer (``token-key.pem``), told apart from a
workload token by three things at once, each checked: the header ``typ`` is
:data:`JOIN_TOKEN_TYPE`, the audience is :data:`JOIN_AUDIENCE` (never ``istio-ca``), and the
subject is ``join:host:<name>`` (never ``system:serviceaccount:...``, so the workload
authenticator refuses it). Its claim :data:`JOIN_CLAIM` lists the SPIFFE IDs it may obtain,
those of the services placed on one host, with the host's name; ``iat``/``nbf``/``exp`` and a
``jti`` as usual.

Theory of operation:

* ``join create`` mints it (default TTL :data:`DEFAULT_JOIN_TTL`, refused above
  :data:`MAX_JOIN_TTL` unless the caller raises the bound) into a join file
  (:mod:`meshtrust.joinfile`).
* The CA authenticates it (:class:`JoinAuthenticator`) into a :class:`JoinGrant`; the identity
  is then taken from the CSR's URI SAN, allowed only when it is in the grant
  (:meth:`JoinGrant.caller_for`), else PERMISSION_DENIED before anything is signed.
* The token may be used any number of times while it is valid: a host has several services,
  and agents restart. Its reach is bounded by the list and the TTL instead. Every
  certificate issued with it names the host and the ``jti`` in the ledger's ``requester``
  column (``authenticator`` = ``join``); that row is the audit record (no separate
  first-use event, which a CA replica set could not agree on without another write).
* After the first certificate the agents renew with it (the client-certificate path).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from meshtrust.ca.authn import (
    LEEWAY,
    MAX_TOKEN_BYTES,
    Caller,
    TrustedIssuer,
    check_time_claims,
    numeric_date,
)
from meshtrust.ca.cadir import (
    TokenSigningKey,
    ensure_token_signing_key,
    load_ca_dir,
    token_issuer_for,
)
from meshtrust.config import check_host_port
from meshtrust.durations import format_duration
from meshtrust.errors import (
    AuthenticationError,
    ConfigError,
    InvalidCSR,
    InvalidSpiffeId,
    PermissionDenied,
)
from meshtrust.fileio import write_private_file
from meshtrust.joinfile import check_host_name, render_join_document
from meshtrust.pki import CsrRequest
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "DEFAULT_JOIN_TTL",
    "JOIN_AUDIENCE",
    "JOIN_CLAIM",
    "JOIN_TOKEN_TYPE",
    "MAX_JOIN_TTL",
    "JoinAuthenticator",
    "JoinGrant",
    "create_join_file",
    "is_join_token",
    "mint_join_token",
]

JOIN_TOKEN_TYPE = "meshtrust-join+jwt"
JOIN_AUDIENCE = "meshtrust-join"
JOIN_CLAIM = "meshtrust.io/join"
DEFAULT_JOIN_TTL = dt.timedelta(hours=1)
MAX_JOIN_TTL = dt.timedelta(hours=24)
MAX_JOIN_IDENTITIES = 1000
_SUB_PREFIX = "join:host:"


@dataclass(frozen=True, slots=True)
class JoinGrant:
    """An authenticated join token: which host, what it may obtain, until when."""

    host: str
    identities: frozenset[SpiffeId]
    expires: dt.datetime
    jti: str

    @property
    def subject(self) -> str:
        """The ledger's ``requester`` for certificates issued with this grant."""
        return f"host {self.host} (join {self.jti})"

    @property
    def identity(self) -> str:  # for refusal logs before the CSR names one
        return f"(join file of host {self.host})"

    def caller_for(self, csr: CsrRequest) -> Caller:
        """The caller this grant makes of ``csr``: the identity its URI SAN names, if that is
        in the grant. Raises :class:`PermissionDenied` otherwise, :class:`InvalidCSR` when the
        CSR names no single valid SPIFFE ID."""
        if len(csr.uri_sans) != 1:
            raise InvalidCSR(
                f"CSR has {len(csr.uri_sans)} URI SANs; with a join token the CSR names "
                "exactly one of the host's identities"
            )
        try:
            asked = SpiffeId.parse(csr.uri_sans[0])
        except InvalidSpiffeId as exc:
            raise InvalidCSR(f"CSR URI SAN is not a valid SPIFFE ID: {exc}") from exc
        if asked not in self.identities:
            raise PermissionDenied(
                f"the join file for host {self.host} does not grant {asked} "
                f"({len(self.identities)} identities are placed on that host)"
            )
        return Caller(
            identity=asked, authenticator="join", subject=self.subject, expires=self.expires
        )


def is_join_token(token: str) -> bool:
    """Whether ``token``'s (unverified) header says it is a join token: only which
    authenticator judges it depends on this, never what it grants.

    Asked of every bearer token the CA sees, so it decodes the header segment alone (PyJWT's
    ``get_unverified_header`` decodes all three: ~4 % of a worker's time under load)."""
    header, dot, _ = token.partition(".")
    if not dot or len(header) > 4096:
        return False
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, UnicodeDecodeError):  # binascii.Error and JSONDecodeError included
        return False
    return isinstance(decoded, dict) and decoded.get("typ") == JOIN_TOKEN_TYPE


def mint_join_token(
    signing_key: TokenSigningKey,
    trust_domain: TrustDomain,
    host: str,
    identities: Sequence[SpiffeId],
    now: dt.datetime,
    ttl: dt.timedelta,
) -> str:
    """A join token for ``host`` granting ``identities``, signed by the CA's issuer key."""
    iat = int(now.timestamp())
    claims: dict[str, Any] = {
        "iss": token_issuer_for(trust_domain),
        "sub": f"{_SUB_PREFIX}{host}",
        "aud": [JOIN_AUDIENCE],
        "iat": iat,
        "nbf": iat,
        "exp": iat + int(ttl.total_seconds()),
        "jti": str(uuid.uuid4()),
        JOIN_CLAIM: {"host": host, "identities": [str(i) for i in identities]},
    }
    return jwt.encode(
        claims,
        signing_key.key,
        algorithm="ES256",
        headers={"kid": signing_key.kid, "typ": JOIN_TOKEN_TYPE},
    )


class JoinAuthenticator:
    """Verifies join tokens against the CA's own issuer key (and no other issuer's)."""

    def __init__(self, trust_domain: TrustDomain, own_issuer: TrustedIssuer) -> None:
        self._td = trust_domain
        self._issuer = own_issuer

    def authenticate(self, token: str, now: dt.datetime) -> JoinGrant:
        """Raises :class:`AuthenticationError` saying why, never echoing the token."""
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise AuthenticationError("join token is not a well-formed JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("join token is not a well-formed JWT") from None
        if header.get("typ") != JOIN_TOKEN_TYPE or header.get("alg") != "ES256":
            raise AuthenticationError("join token must be an ES256 meshtrust join token")
        claims = self._verify(token, header.get("kid"))
        return self._grant(claims, now)

    def _verify(self, token: str, kid: object) -> dict[str, Any]:
        keys = [k for k in self._issuer.jwks.keys if kid is None or k.key_id in (None, kid)]
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key=key.key,
                    algorithms=["ES256"],
                    audience=JOIN_AUDIENCE,
                    issuer=self._issuer.issuer,
                    options={
                        "require": ["exp", "iat", "sub", "iss", "aud", "jti"],
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                    },
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError, TypeError, ValueError):
                continue
            except jwt.InvalidAudienceError:
                raise AuthenticationError(f"join token audience is not {JOIN_AUDIENCE!r}") from None
            except jwt.InvalidIssuerError:
                raise AuthenticationError("join token is not from this CA's issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise AuthenticationError(f"join token lacks the {exc.claim!r} claim") from None
            except jwt.PyJWTError as exc:
                raise AuthenticationError(f"join token rejected: {type(exc).__name__}") from None
        raise AuthenticationError(
            "join token signature does not verify (not made by this CA's token key)"
        )

    def _grant(self, claims: Mapping[str, Any], now: dt.datetime) -> JoinGrant:
        body = claims.get(JOIN_CLAIM)
        sub, jti = claims.get("sub"), claims.get("jti")
        if not isinstance(body, Mapping) or not isinstance(jti, str):
            raise AuthenticationError(f"join token lacks a valid {JOIN_CLAIM!r} claim")
        host, listed = body.get("host"), body.get("identities")
        if not isinstance(host, str) or sub != f"{_SUB_PREFIX}{host}":
            raise AuthenticationError("join token's host disagrees with its subject")
        if not isinstance(listed, list) or not 0 < len(listed) <= MAX_JOIN_IDENTITIES:
            raise AuthenticationError("join token's identity list is missing or too long")
        try:
            if not all(isinstance(i, str) for i in listed):
                raise InvalidSpiffeId("not a string")
            identities = frozenset(SpiffeId.parse(i) for i in listed)
        except InvalidSpiffeId:
            raise AuthenticationError("join token lists an invalid SPIFFE ID") from None
        if any(i.trust_domain != self._td for i in identities):
            raise AuthenticationError(f"join token lists identities outside {self._td}")
        exp = numeric_date(claims, "exp")
        if exp is not None and now.timestamp() > exp + LEEWAY.total_seconds():
            when = dt.datetime.fromtimestamp(exp, dt.UTC)
            raise AuthenticationError(
                f"the join file for host {host} expired at {when:%Y-%m-%d %H:%M:%SZ}; "
                "make a new one with `meshtrust join create`"
            )
        expires = check_time_claims(claims, now)
        return JoinGrant(host=host, identities=identities, expires=expires, jti=jti)


def create_join_file(
    ca_dir: Path,
    identities: Sequence[SpiffeId],
    ca_addresses: Sequence[str],
    ttl: dt.timedelta,
    now: dt.datetime,
    out: Path,
    *,
    host: str | None = None,
    max_ttl: dt.timedelta = MAX_JOIN_TTL,
) -> None:
    """Write a join file granting ``identities`` to ``out`` (0600, atomically).

    ``host`` defaults to ``out``'s name without its suffix (``h2.join`` -> ``h2``). Raises
    :class:`ConfigError` for an empty or foreign identity list, a bad address or host name,
    a TTL that is not positive or above ``max_ttl``; :class:`CADirectoryError` for the CA
    directory; :class:`OSError` when ``out`` cannot be written.
    """
    host = check_host_name(host if host is not None else Path(out).stem, "host")
    if not identities:
        raise ConfigError("a join file needs at least one identity", field="--identity")
    if len(identities) > MAX_JOIN_IDENTITIES:
        raise ConfigError(f"at most {MAX_JOIN_IDENTITIES} identities", field="--identity")
    if not ca_addresses:
        raise ConfigError("a join file needs the CA's address", field="--ca-address")
    for address in ca_addresses:
        check_host_port(address, "--ca-address", zero=False)
    if ttl <= dt.timedelta(0):
        raise ConfigError("must be positive", field="--ttl")
    if ttl > max_ttl:
        raise ConfigError(
            f"{format_duration(ttl)} is above the bound of {format_duration(max_ttl)} for a "
            "join file (a join file is a bearer credential; make a new one per host start)",
            field="--ttl",
        )
    material = load_ca_dir(ca_dir, now)
    td = material.trust_domain_hint() or identities[0].trust_domain
    foreign = [str(i) for i in identities if i.trust_domain != td]
    if foreign:
        raise ConfigError(f"{foreign[0]} is not in this CA's trust domain {td}", field="--identity")
    unique = tuple(dict.fromkeys(identities))
    key = ensure_token_signing_key(ca_dir)
    token = mint_join_token(key, td, host, unique, now, ttl)
    document = render_join_document(
        host=host,
        identities=unique,
        ca_addresses=tuple(ca_addresses),
        expires_at=dt.datetime.fromtimestamp(
            int(now.timestamp()) + int(ttl.total_seconds()), dt.UTC
        ),
        bundle_pem=material.root_bundle_pem.encode("ascii"),
        token=token,
    )
    write_private_file(Path(out), document)
