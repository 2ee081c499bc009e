"""Who is calling: authenticators for the CA.

Tried in order (DESIGN.md "Certificate authority"): the caller's client certificate (a still
valid SVID of this trust domain renews itself without a token), then the bearer token —
a Kubernetes projected service-account token, verified offline against the JWKS of each
trusted issuer (a cluster's, and the CA's own for hosts outside Kubernetes).

Verified tokens are cached until they expire: a workload fleet presents the same token for
every renewal, and an ECDSA verify costs more than the rest of the request.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshtrust.ca.cadir import TokenSigningKey
from meshtrust.errors import (
    AuthenticationError,
    ConfigError,
    InvalidSpiffeId,
    SvidVerificationError,
)
from meshtrust.pki import TrustBundle, format_serial, verify_svid
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "ALLOWED_ALGORITHMS",
    "Caller",
    "ClientCertAuthenticator",
    "JwtAuthenticator",
    "MAX_NUMERIC_DATE",
    "TrustedIssuer",
    "check_time_claims",
    "load_jwks_file",
    "mint_token",
    "numeric_date",
]

#: Asymmetric algorithms only: ``none`` and HMAC (which would let anyone holding the public
#: key forge tokens) are refused before any key is touched.
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384")
LEEWAY = dt.timedelta(seconds=30)
MAX_TOKEN_BYTES = 16 * 1024
_SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: the identity it may get, and how we know."""

    identity: SpiffeId
    authenticator: str  # "client-cert" | "jwt"
    subject: str  # what the credential said: token sub or certificate serial
    expires: dt.datetime


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    issuer: str
    jwks: jwt.PyJWKSet


def load_jwks_file(issuer: str, path: Path) -> TrustedIssuer:
    """Load a JWKS file for ``issuer``; raises :class:`ConfigError` naming the file."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"JWKS file {path} for issuer {issuer!r}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"JWKS file {path} for issuer {issuer!r} is not JSON: {exc}") from exc
    return trusted_issuer_from_jwks(issuer, data, source=str(path))


def trusted_issuer_from_jwks(issuer: str, data: object, *, source: str) -> TrustedIssuer:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise ConfigError(f"{source}: a JWKS needs a non-empty 'keys' list")
    try:
        jwks = jwt.PyJWKSet.from_dict(data)
    except jwt.PyJWTError as exc:
        raise ConfigError(f"{source}: JWKS has no usable key ({exc})") from exc
    for key in jwks.keys:
        problem = weak_key_problem(key)
        if problem is not None:
            raise ConfigError(f"{source}: key {key.key_id or '(no kid)'!r}: {problem}")
    return TrustedIssuer(issuer=issuer, jwks=jwks)


MIN_RSA_BITS = 2048
#: The curves of ES256 and ES384, the EC algorithms we accept (:data:`ALLOWED_ALGORITHMS`).
ACCEPTED_CURVES = ("secp256r1", "secp384r1")


def weak_key_problem(key: jwt.PyJWK) -> str | None:
    """Why a token issuer's key may not be trusted, or None: symmetric keys (anyone holding
    them forges tokens), RSA below :data:`MIN_RSA_BITS` (512-bit RSA is factored in hours),
    EC on a curve other than P-256/P-384, and any other key type (no accepted algorithm
    could use it)."""
    public = key.key
    if key.key_type == "oct":
        return "symmetric (oct) keys are not accepted"
    if isinstance(public, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if public.key_size < MIN_RSA_BITS:
            return f"RSA key of {public.key_size} bits; at least {MIN_RSA_BITS} are required"
        return None
    if isinstance(public, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if public.curve.name not in ACCEPTED_CURVES:
            return f"EC curve {public.curve.name} is not accepted (P-256 and P-384 are)"
        return None
    return f"{key.key_type} keys are not accepted (RSA of {MIN_RSA_BITS}+ bits, EC P-256/P-384)"


def mint_token(
    signing_key: TokenSigningKey,
    issuer: str,
    namespace: str,
    service_account: str,
    now: dt.datetime,
    ttl: dt.timedelta,
    audience: str = "istio-ca",
) -> str:
    """A Kubernetes-style service-account token signed by the CA's own issuer key."""
    iat = int(now.timestamp())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": f"{_SA_PREFIX}{namespace}:{service_account}",
        "aud": [audience],
        "iat": iat,
        "nbf": iat,
        "exp": iat + int(ttl.total_seconds()),
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
        },
    }
    return jwt.encode(
        claims, signing_key.key, algorithm="ES256", headers={"kid": signing_key.kid, "typ": "JWT"}
    )


#: The last NumericDate a time claim may hold: the start of 9999-12-31 UTC. A datetime ends
#: with year 9999, and the cache adds the leeway to an expiry, so a day's margin stays.
MAX_NUMERIC_DATE = 253402214400


def numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """The claim ``name`` as a NumericDate (RFC 7519: seconds since the epoch), or None when
    absent. Raises :class:`AuthenticationError` for anything else a JSON payload can hold
    there: a bool (``true`` is an int to Python), a string, NaN or an infinity (Python's JSON
    reads ``NaN``/``Infinity``), a negative number, or one past :data:`MAX_NUMERIC_DATE`
    (a huge ``exp`` would otherwise end in ``ValueError: year 10000 is out of range``)."""
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_NUMERIC_DATE  # False for NaN too
    ):
        raise AuthenticationError(f"token {name!r} claim is not a valid NumericDate")
    return float(value)


def check_time_claims(claims: Mapping[str, Any], now: dt.datetime) -> dt.datetime:
    """When the token's validity ends, checking ``exp``, ``nbf`` and ``iat`` against ``now``
    with :data:`LEEWAY`. ``exp`` is required; each present time claim must be a valid
    NumericDate (:func:`numeric_date`); ``iat`` is checked for its form only (Kubernetes and
    we both set ``nbf`` for "not before"). Raises :class:`AuthenticationError` saying why."""
    exp = numeric_date(claims, "exp")
    nbf = numeric_date(claims, "nbf")
    numeric_date(claims, "iat")
    if exp is None:
        raise AuthenticationError("token lacks the 'exp' claim")
    ts, leeway = now.timestamp(), LEEWAY.total_seconds()
    if ts > exp + leeway:
        raise AuthenticationError("token has expired")
    if nbf is not None and ts + leeway < nbf:
        raise AuthenticationError("token is not valid yet (nbf in the future)")
    return dt.datetime.fromtimestamp(exp, dt.UTC)


class JwtAuthenticator:
    """Verifies bearer tokens offline against trusted issuers' JWKS."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        issuers: Sequence[TrustedIssuer],
        audience: str = "istio-ca",
        cache_size: int = 65536,
    ) -> None:
        self._td = trust_domain
        self._issuers: Mapping[str, TrustedIssuer] = {i.issuer: i for i in issuers}
        self._audience = audience
        self._cache: OrderedDict[bytes, Caller] = OrderedDict()
        self._cache_size = cache_size

    def authenticate(self, token: str, now: dt.datetime) -> Caller:
        """Verify ``token`` at ``now``; raises :class:`AuthenticationError` saying why."""
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError("bearer token is too large")
        if not token.isascii():
            raise AuthenticationError("bearer token is not a well-formed JWT")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if now <= cached.expires + LEEWAY:
                self._cache.move_to_end(digest)
                return cached
            del self._cache[digest]
        caller = self._verify(token, now)
        self._cache[digest] = caller
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return caller

    def _verify(self, token: str, now: dt.datetime) -> Caller:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthenticationError("bearer token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthenticationError(
                f"token algorithm {str(alg)[:16]!r} is not accepted "
                f"(allowed: {', '.join(ALLOWED_ALGORITHMS)})"
            )
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthenticationError(f"token issuer {str(iss)[:100]!r} is not trusted")
        kid = header.get("kid")
        keys = [k for k in issuer.jwks.keys if kid is None or k.key_id in (None, kid)]
        if not keys:
            raise AuthenticationError(f"no key {str(kid)[:64]!r} in the JWKS of issuer {iss!r}")
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                # Time claims are checked against the injected clock in _caller_from_claims.
                claims = jwt.decode(
                    token,
                    key=key.key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=iss,
                    options={
                        "require": ["exp", "sub", "iss", "aud"],
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                    },
                )
                break
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError, TypeError, ValueError):
                # TypeError/ValueError: PyJWT's answer to a key of the wrong family for the
                # token's alg (an RSA key for ES256, ...): that key cannot have signed it.
                continue
            except jwt.InvalidAudienceError:
                raise AuthenticationError(f"token audience is not {self._audience!r}") from None
            except jwt.MissingRequiredClaimError as exc:
                raise AuthenticationError(f"token lacks the {exc.claim!r} claim") from None
            except jwt.PyJWTError as exc:
                raise AuthenticationError(f"token rejected: {type(exc).__name__}") from None
        if claims is None:
            raise AuthenticationError("token signature does not verify")
        return self._caller_from_claims(claims, now)

    def _caller_from_claims(self, claims: Mapping[str, Any], now: dt.datetime) -> Caller:
        expires = check_time_claims(claims, now)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.startswith(_SA_PREFIX):
            raise AuthenticationError(
                "token subject is not a service account (system:serviceaccount:<ns>:<sa>)"
            )
        parts = sub[len(_SA_PREFIX) :].split(":")
        if len(parts) != 2 or not all(parts):
            raise AuthenticationError("token subject is not system:serviceaccount:<ns>:<sa>")
        namespace, service_account = parts
        k8s = claims.get("kubernetes.io")
        if isinstance(k8s, Mapping):
            sa = k8s.get("serviceaccount")
            if k8s.get("namespace", namespace) != namespace or (
                isinstance(sa, Mapping) and sa.get("name", service_account) != service_account
            ):
                raise AuthenticationError("token kubernetes.io claim disagrees with its subject")
        try:
            identity = SpiffeId.for_workload(self._td, namespace, service_account)
        except InvalidSpiffeId as exc:
            raise AuthenticationError(f"token names an invalid identity: {exc}") from None
        return Caller(
            identity=identity,
            authenticator="jwt",
            subject=sub,
            expires=expires,
        )


class ClientCertAuthenticator:
    """Accepts a still-valid SVID of this trust domain, issued under the CA's roots.

    The TLS layer already checked the chain; we check it again with the SVID rules, since the
    TLS layer knows nothing of SPIFFE IDs. ``revoked_at`` (serial -> when it was revoked, or
    None) refuses a revoked certificate (:mod:`meshtrust.ca.revocation`): its holder must
    come back with a token.
    """

    def __init__(
        self,
        bundle: TrustBundle,
        intermediates: Sequence[x509.Certificate],
        revoked_at: Callable[[str], dt.datetime | None] | None = None,
    ) -> None:
        self._bundle = bundle
        self._intermediates = list(intermediates)
        self._revoked_at = revoked_at

    def authenticate(self, leaf_der: bytes, now: dt.datetime) -> Caller:
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
            verified = verify_svid([leaf, *self._intermediates], self._bundle, now)
        except ValueError:
            raise AuthenticationError("client certificate cannot be parsed") from None
        except SvidVerificationError as exc:
            raise AuthenticationError(f"client certificate is not a valid SVID: {exc}") from None
        serial = format_serial(leaf.serial_number)
        revoked = self._revoked_at(serial) if self._revoked_at is not None else None
        if revoked is not None:
            raise AuthenticationError(
                f"certificate {serial} was revoked at {revoked:%Y-%m-%d %H:%M:%SZ}"
            )
        return Caller(
            identity=verified.spiffe_id,
            authenticator="client-cert",
            subject=f"serial {serial}",
            expires=leaf.not_valid_after_utc,
        )
