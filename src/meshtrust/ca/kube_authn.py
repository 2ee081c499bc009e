"""Authenticating Kubernetes workloads with the cluster's help.

Two authenticators of bearer tokens (Kubernetes projected service-account tokens, audience
``istio-ca``), each built from a :class:`~meshtrust.kube.KubeClient`:

* :class:`TokenReviewAuthenticator` asks the API server (``TokenReview``, as istiod does by
  default). The API server knows what offline verification cannot: a token bound to a pod
  (``kubernetes.io.pod``) stops working once that pod is deleted, and a deleted service
  account's tokens stop at once. Answers are cached briefly (:data:`TOKENREVIEW_CACHE_TTL`).
* :class:`ClusterJwksAuthenticator` verifies offline against the issuer's keys, fetched from
  the cluster's OIDC discovery document (``/.well-known/openid-configuration`` ->
  ``jwks_uri``) and refreshed every :data:`JWKS_REFRESH`; a failed refresh keeps the last good
  key set. No API call per token, but a bound token stays valid until its ``exp``.

Both are *asynchronous* (the API server is a network peer): the HTTP call runs in a thread so
the CA's event loop keeps serving. API server unreachable -> :class:`KubeUnavailable`
(UNAVAILABLE to the caller, who retries); a token the server says no to ->
:class:`AuthenticationError` (UNAUTHENTICATED) with the server's reason. Tokens are never
logged and never part of a message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt

from meshtrust.ca.authn import (
    MAX_TOKEN_BYTES,
    Caller,
    JwtAuthenticator,
    trusted_issuer_from_jwks,
)
from meshtrust.clock import Clock
from meshtrust.errors import AuthenticationError, ConfigError, InvalidSpiffeId
from meshtrust.kube import KubeApiError, KubeClient, KubeUnavailable, load_kube_source
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "JWKS_REFRESH",
    "KubeAuthenticator",
    "TOKENREVIEW_CACHE_TTL",
    "ClusterJwksAuthenticator",
    "KubeRequester",
    "TokenReviewAuthenticator",
    "caller_from_review",
    "kube_authenticators",
]

log = logging.getLogger("meshtrust.ca")

#: How long a positive TokenReview answer is reused. An agent presents the same token for
#: every renewal and retry, and a restart storm presents thousands at once: caching spares the
#: API server a call per request. Short, because it is also how long a token the cluster has
#: just revoked (its pod or service account deleted) may still get a certificate.
TOKENREVIEW_CACHE_TTL = dt.timedelta(seconds=30)
#: How often the cluster's JWKS is fetched again (the API server's key rarely changes; a
#: token with an unknown ``kid`` triggers an early refresh, at most every JWKS_MIN_REFRESH).
JWKS_REFRESH = dt.timedelta(minutes=5)
JWKS_MIN_REFRESH = dt.timedelta(seconds=30)
_SA_PREFIX = "system:serviceaccount:"


class KubeRequester(Protocol):
    """What these authenticators need of a Kubernetes client (a :class:`KubeClient`)."""

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]: ...


def _identity(td: TrustDomain, username: object) -> tuple[SpiffeId, str]:
    if not isinstance(username, str) or not username.startswith(_SA_PREFIX):
        raise AuthenticationError(
            f"the token authenticates {str(username)[:100]!r}, not a service account"
        )
    parts = username[len(_SA_PREFIX) :].split(":")
    if len(parts) != 2 or not all(parts):
        raise AuthenticationError("token user is not system:serviceaccount:<ns>:<sa>")
    try:
        return SpiffeId.for_workload(td, parts[0], parts[1]), username
    except InvalidSpiffeId as exc:
        raise AuthenticationError(f"token names an invalid identity: {exc}") from None


def _token_exp(token: str) -> float | None:
    """The token's ``exp``, read *unverified* (only to bound a cache entry; the API server
    has already said the token is good)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def caller_from_review(
    review: Mapping[str, Any],
    td: TrustDomain,
    audience: str,
    now: dt.datetime,
    cache_ttl: dt.timedelta,
    token_exp: float | None,
) -> Caller:
    """The caller a TokenReview answer authenticates. Raises :class:`AuthenticationError`.

    ``expires`` (how long the answer may be reused) is ``now + cache_ttl``, never past the
    token's own ``exp``.
    """
    status = review.get("status")
    if not isinstance(status, Mapping):
        raise AuthenticationError("the API server's TokenReview answer has no status")
    if status.get("authenticated") is not True:
        error = str(status.get("error") or "no reason given")[:300]
        raise AuthenticationError(f"Kubernetes TokenReview refused the token: {error}")
    audiences = status.get("audiences")
    if not isinstance(audiences, list) or audiences and audience not in audiences:
        raise AuthenticationError(f"token audience is not {audience!r} (TokenReview)")
    user = status.get("user")
    identity, username = _identity(td, user.get("username") if isinstance(user, Mapping) else None)
    expires = now + cache_ttl
    if token_exp is not None:
        expires = min(expires, dt.datetime.fromtimestamp(token_exp, dt.UTC))
    return Caller(identity=identity, authenticator="kube-tokenreview", subject=username,
                  expires=expires)  # fmt: skip


class TokenReviewAuthenticator:
    """Bearer tokens checked by the API server's TokenReview, answers cached briefly."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        client: KubeRequester,
        audience: str = "istio-ca",
        cache_ttl: dt.timedelta = TOKENREVIEW_CACHE_TTL,
        cache_size: int = 65536,
    ) -> None:
        self._td = trust_domain
        self._client = client
        self._audience = audience
        self._cache_ttl = cache_ttl
        self._cache: OrderedDict[bytes, Caller] = OrderedDict()
        self._cache_size = cache_size

    async def authenticate(self, token: str, now: dt.datetime) -> Caller:
        """Raises :class:`AuthenticationError`, or :class:`KubeUnavailable` /
        :class:`KubeApiError` when the API server cannot answer (or refuses *us*)."""
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise AuthenticationError("bearer token is not a well-formed JWT")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if now < cached.expires:
                self._cache.move_to_end(digest)
                return cached
            del self._cache[digest]
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self._audience]},
        }
        try:
            review = await asyncio.to_thread(
                self._client.request, "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body
            )
        except KubeApiError as exc:
            # 401/403 here are about the CA's own credential (RBAC: system:auth-delegator).
            raise KubeApiError(f"TokenReview failed: {exc}", exc.status, exc.reason) from None
        caller = caller_from_review(
            review, self._td, self._audience, now, self._cache_ttl, _token_exp(token)
        )
        self._cache[digest] = caller
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return caller


class ClusterJwksAuthenticator:
    """Offline verification against the cluster issuer's JWKS from OIDC discovery.

    :meth:`refresh` fetches the discovery document and its ``jwks_uri`` (its *path*, from the
    same API server: an issuer such as ``https://kubernetes.default.svc`` need not resolve
    where the CA runs) and swaps in the new key set; :meth:`authenticate` calls it when the
    set is older than ``refresh_every`` or the token names a key it does not have, and keeps
    the last good set when that fails.
    """

    def __init__(
        self,
        trust_domain: TrustDomain,
        client: KubeRequester,
        clock: Clock,
        audience: str = "istio-ca",
        refresh_every: dt.timedelta = JWKS_REFRESH,
    ) -> None:
        self._td = trust_domain
        self._client = client
        self._clock = clock
        self._audience = audience
        self._refresh_every = refresh_every
        self._jwt: JwtAuthenticator | None = None
        self._kids: frozenset[str | None] = frozenset()
        self.issuer: str | None = None
        self._fetched = -1e18  # monotonic time of the last attempt
        self._lock = asyncio.Lock()

    def refresh(self) -> None:
        """Fetch discovery + JWKS now. Raises :class:`KubeUnavailable`, :class:`KubeApiError`
        or :class:`ConfigError` (a discovery document or key set we cannot use)."""
        self._fetched = self._clock.monotonic()
        discovery = self._client.request("GET", "/.well-known/openid-configuration")
        issuer, jwks_uri = discovery.get("issuer"), discovery.get("jwks_uri")
        if not isinstance(issuer, str) or not issuer or not isinstance(jwks_uri, str):
            raise ConfigError("the cluster's OIDC discovery document lacks issuer or jwks_uri")
        path = urlsplit(jwks_uri).path or "/openid/v1/jwks"
        keys = self._client.request("GET", path)
        trusted = trusted_issuer_from_jwks(issuer, keys, source=f"JWKS of {issuer}")
        self._jwt = JwtAuthenticator(self._td, [trusted], self._audience)
        self._kids = frozenset(k.key_id for k in trusted.jwks.keys)
        if issuer != self.issuer:
            log.info("trusting the cluster's token issuer %s (%d keys)", issuer, len(self._kids))
        self.issuer = issuer

    async def _maybe_refresh(self, kid: object) -> None:
        age = self._clock.monotonic() - self._fetched
        stale = age >= self._refresh_every.total_seconds()
        unknown = kid not in self._kids and None not in self._kids
        if not (stale or (unknown and age >= JWKS_MIN_REFRESH.total_seconds())):
            return
        async with self._lock:
            if self._clock.monotonic() - self._fetched < JWKS_MIN_REFRESH.total_seconds():
                return  # another request refreshed while we waited
            try:
                await asyncio.to_thread(self.refresh)
            except (KubeUnavailable, KubeApiError, ConfigError) as exc:
                log.warning("refreshing the cluster JWKS failed, keeping the last set: %s", exc)

    async def authenticate(self, token: str, now: dt.datetime) -> Caller:
        """Raises :class:`AuthenticationError`."""
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise AuthenticationError("bearer token is not a well-formed JWT")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise AuthenticationError("bearer token is not a well-formed JWT") from None
        await self._maybe_refresh(kid)
        if self._jwt is None:
            raise AuthenticationError("the cluster's JWKS could not be fetched yet")
        return self._jwt.authenticate(token, now)


KubeAuthenticator = TokenReviewAuthenticator | ClusterJwksAuthenticator


def kube_authenticators(
    tokenreview: str | None,
    jwks: str | None,
    trust_domain: TrustDomain,
    audience: str,
    clock: Clock,
) -> list[KubeAuthenticator]:
    """The authenticators ``ca serve --kube-tokenreview/--kube-jwks`` ask for (each source
    ``"in-cluster"`` or a kubeconfig path). The JWKS is fetched once here, so a CA that cannot
    reach its cluster fails at start with the reason. Raises :class:`ConfigError`,
    :class:`KubeUnavailable` or :class:`KubeApiError`."""
    out: list[KubeAuthenticator] = []
    if tokenreview is not None:
        client = KubeClient(load_kube_source(tokenreview, os.environ))
        out.append(TokenReviewAuthenticator(trust_domain, client, audience))
    if jwks is not None:
        cluster = ClusterJwksAuthenticator(
            trust_domain, KubeClient(load_kube_source(jwks, os.environ)), clock, audience
        )
        cluster.refresh()
        out.append(cluster)
    return out
