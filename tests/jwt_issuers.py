"""Token issuers for the tests of bearer-token authentication (tests/test_authn.py and the
attack tier's tests/attack/test_tokens.py): the CA's own issuer (ES256, key made by
``init_ca_dir``) and a "Kubernetes cluster" with an RSA service-account signing key, each
trusted through its JWKS file, and ways to mint, assemble by hand and forge their tokens.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from meshtrust.ca import (
    JwtAuthenticator,
    init_ca_dir,
    load_jwks_file,
    load_token_signing_key,
    mint_token,
    token_issuer_for,
)
from meshtrust.ca.cadir import TokenSigningKey
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.badcerts import NOW

TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "default", "web")
OTHER = SpiffeId.for_workload(TD, "default", "db")
HOUR = dt.timedelta(hours=1)
SECOND = dt.timedelta(seconds=1)
LEEWAY = dt.timedelta(seconds=30)
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
K8S_KID = "k8s-sa-key-1"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ts(when: dt.datetime) -> int:
    return int(when.timestamp())


@dataclass(frozen=True)
class Issuers:
    """The two trusted token issuers, with what it takes to mint (and forge) their tokens."""

    own_key: TokenSigningKey
    own_issuer: str
    own_jwks: Path
    k8s_key: rsa.RSAPrivateKey
    k8s_jwks: Path

    def authenticator(self, cache_size: int = 65536) -> JwtAuthenticator:
        """A fresh authenticator (fresh cache) trusting both issuers through their JWKS files."""
        return JwtAuthenticator(
            TD,
            [
                load_jwks_file(self.own_issuer, self.own_jwks),
                load_jwks_file(K8S_ISSUER, self.k8s_jwks),
            ],
            cache_size=cache_size,
        )

    def own(
        self,
        namespace: str = "default",
        service_account: str = "web",
        *,
        now: dt.datetime = NOW,
        ttl: dt.timedelta = HOUR,
        audience: str = "istio-ca",
    ) -> str:
        """A token from the CA's own issuer, as ``meshtrust token create`` makes it."""
        return mint_token(
            self.own_key, self.own_issuer, namespace, service_account, now, ttl, audience
        )

    def k8s(
        self,
        claims: dict[str, Any],
        alg: str = "RS256",
        *,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = K8S_KID,
    ) -> str:
        """``claims`` signed by the cluster's key (or ``key``) with ``alg``."""
        headers = {"kid": kid} if kid is not None else None
        return jwt.encode(claims, key or self.k8s_key, algorithm=alg, headers=headers)

    def k8s_public_pem(self) -> bytes:
        return self.k8s_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def sa_claims(
    namespace: str = "default",
    service_account: str = "web",
    *,
    iss: str = K8S_ISSUER,
    iat: dt.datetime = NOW,
    ttl: dt.timedelta = HOUR,
    **overrides: Any,
) -> dict[str, Any]:
    """Claims of a Kubernetes projected service-account token; ``overrides`` replace claims,
    and an override of ``None`` removes the claim."""
    claims: dict[str, Any] = {
        "iss": iss,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
        "aud": ["istio-ca"],
        "iat": ts(iat),
        "nbf": ts(iat),
        "exp": ts(iat + ttl),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": "5b8c7a3e"},
        },
    }
    for name, value in overrides.items():
        name = name.replace("kubernetes_io", "kubernetes.io")
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT assembled by hand (PyJWT refuses to make the forgeries below)."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{b64url(signature)}"


def hs256_with_public_key(issuers: Issuers, claims: dict[str, Any]) -> str:
    """The key-confusion forgery: HMAC-SHA256 keyed with the issuer's *public* key PEM."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": K8S_KID}).encode())
    body = b64url(json.dumps(claims).encode())
    mac = hmac.new(issuers.k8s_public_pem(), f"{head}.{body}".encode(), hashlib.sha256)
    return f"{head}.{body}.{b64url(mac.digest())}"


@pytest.fixture(scope="module")
def issuers(tmp_path_factory: pytest.TempPathFactory) -> Issuers:
    base = tmp_path_factory.mktemp("issuers")
    ca_dir = base / "ca"
    init_ca_dir(ca_dir, TD, NOW)
    own_key = load_token_signing_key(ca_dir)
    assert own_key is not None

    k8s_key = rsa.generate_private_key(65537, 2048)
    jwk = RSAAlgorithm.to_jwk(k8s_key.public_key(), as_dict=True)
    jwk.update(kid=K8S_KID, use="sig", alg="RS256")
    k8s_jwks = base / "k8s-jwks.json"
    k8s_jwks.write_text(json.dumps({"keys": [jwk]}))
    return Issuers(own_key, token_issuer_for(TD), ca_dir / "token-jwks.json", k8s_key, k8s_jwks)


@pytest.fixture(scope="module")
def intruder_key() -> rsa.RSAPrivateKey:
    """An RSA key nobody trusts."""
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture
def auth(issuers: Issuers) -> JwtAuthenticator:
    return issuers.authenticator()


def swap_claims(token: str, claims: dict[str, Any]) -> str:
    """``token`` with its payload replaced, keeping the original header and signature."""
    head, _, sig = token.split(".")
    return f"{head}.{b64url(json.dumps(claims).encode())}.{sig}"
