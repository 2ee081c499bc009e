"""The Kubernetes authenticators' decisions, with a fake API server (the real one is in
tests/test_kube.py): TokenReview answers to callers, the short positive cache, and the
cluster JWKS refreshed on schedule, keeping the last good set when a refresh fails."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from meshtrust.ca import init_ca_dir
from meshtrust.ca.config import load_config_file
from meshtrust.ca.kube_authn import (
    TOKENREVIEW_CACHE_TTL,
    ClusterJwksAuthenticator,
    TokenReviewAuthenticator,
    caller_from_review,
)
from meshtrust.clock import FakeClock, SystemClock
from meshtrust.errors import AuthenticationError, ConfigError
from meshtrust.kube import KubeUnavailable
from meshtrust.pki import KeyType
from meshtrust.spiffe import TrustDomain
from tests.processes import run_cli

TD = TrustDomain.parse("cluster.local")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _review(authenticated: bool = True, user: str = "system:serviceaccount:shop:web",
            audiences: list[str] | None = None, error: str = "") -> dict[str, Any]:  # fmt: skip
    status: dict[str, Any] = {"authenticated": authenticated, "error": error}
    if authenticated:
        status["user"] = {"username": user, "uid": "u1", "groups": []}
        status["audiences"] = ["istio-ca"] if audiences is None else audiences
    return {"status": status}


@pytest.mark.parametrize(
    ("review", "message"),
    [
        (_review(False, error="token has been invalidated"),
         "TokenReview refused the token: token has been invalidated"),
        (_review(user="alice"), "authenticates 'alice', not a service account"),
        (_review(user="system:serviceaccount:shop"), "not system:serviceaccount:<ns>:<sa>"),
        (_review(user="system:serviceaccount:sh op:web"), "invalid identity"),
        (_review(audiences=["other"]), "audience is not 'istio-ca'"),
        ({"kind": "Status"}, "has no status"),
    ],
)  # fmt: skip
def test_tokenreview_refusals_say_why(review: dict[str, Any], message: str) -> None:
    with pytest.raises(AuthenticationError, match=message):
        caller_from_review(review, TD, "istio-ca", NOW, TOKENREVIEW_CACHE_TTL, None)


def test_tokenreview_answer_names_the_identity_and_is_reused_no_longer_than_the_token() -> None:
    caller = caller_from_review(_review(), TD, "istio-ca", NOW, dt.timedelta(seconds=30), None)
    assert str(caller.identity) == "spiffe://cluster.local/ns/shop/sa/web"
    assert (caller.authenticator, caller.subject) == ("kube-tokenreview",
                                                      "system:serviceaccount:shop:web")  # fmt: skip
    assert caller.expires == NOW + dt.timedelta(seconds=30)
    soon = (NOW + dt.timedelta(seconds=5)).timestamp()
    short = caller_from_review(_review(), TD, "istio-ca", NOW, dt.timedelta(seconds=30), soon)
    assert short.expires == NOW + dt.timedelta(seconds=5)


class FakeApi:
    """Answers by path; counts calls; can be "down"."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, Any]] = []
        self.down = False

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        self.calls.append((method, path, body))
        if self.down:
            raise KubeUnavailable(f"{method} {path}: cannot reach the API server")
        answer: dict[str, Any] = self.answers[path]
        return answer


TR = "/apis/authentication.k8s.io/v1/tokenreviews"


@pytest.mark.asyncio
async def test_tokenreview_asks_with_the_audience_and_caches_positive_answers_briefly() -> None:
    api = FakeApi({TR: _review()})
    auth = TokenReviewAuthenticator(TD, api)
    token = jwt.encode({"exp": int((NOW + dt.timedelta(hours=1)).timestamp())}, "k" * 32)
    assert str((await auth.authenticate(token, NOW)).identity).endswith("/ns/shop/sa/web")
    assert api.calls[0][2]["spec"] == {"token": token, "audiences": ["istio-ca"]}
    await auth.authenticate(token, NOW + TOKENREVIEW_CACHE_TTL - dt.timedelta(seconds=1))
    assert len(api.calls) == 1  # cached
    api.answers[TR] = _review(False, error="pod deleted")
    with pytest.raises(AuthenticationError, match="pod deleted"):
        await auth.authenticate(token, NOW + TOKENREVIEW_CACHE_TTL)
    with pytest.raises(AuthenticationError):  # refusals are not cached: asked again
        await auth.authenticate(token, NOW + TOKENREVIEW_CACHE_TTL)
    assert len(api.calls) == 3
    api.down = True
    with pytest.raises(KubeUnavailable, match="cannot reach"):
        await auth.authenticate(token, NOW)


def _jwks(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]}


def _sa_token(key: rsa.RSAPrivateKey, kid: str, iss: str = "https://k8s.example") -> str:
    claims = {"iss": iss, "sub": "system:serviceaccount:shop:web", "aud": ["istio-ca"],
              "exp": int((NOW + dt.timedelta(hours=1)).timestamp())}  # fmt: skip
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


@pytest.mark.asyncio
async def test_cluster_jwks_is_refreshed_on_schedule_and_the_last_good_set_kept() -> None:
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    discovery = {"issuer": "https://k8s.example",
                 "jwks_uri": "https://kubernetes.default.svc/openid/v1/jwks"}  # fmt: skip
    api = FakeApi(
        {"/.well-known/openid-configuration": discovery, "/openid/v1/jwks": _jwks(k1, "a")}
    )
    clock = FakeClock(NOW)
    auth = ClusterJwksAuthenticator(TD, api, clock, refresh_every=dt.timedelta(minutes=5))
    auth.refresh()
    assert auth.issuer == "https://k8s.example"
    caller = await auth.authenticate(_sa_token(k1, "a"), NOW)
    assert str(caller.identity) == "spiffe://cluster.local/ns/shop/sa/web"
    with pytest.raises(AuthenticationError, match="not trusted"):
        await auth.authenticate(_sa_token(k1, "a", iss="https://evil"), NOW)
    # The cluster rotates its key: a token with the new kid makes the CA look again (once
    # the minimum interval has passed), without waiting for the schedule.
    api.answers["/openid/v1/jwks"] = _jwks(k2, "b")
    await clock.advance(31)
    await auth.authenticate(_sa_token(k2, "b"), NOW)
    # The API server goes away: the last good set keeps working.
    api.down = True
    await clock.advance(301)
    await auth.authenticate(_sa_token(k2, "b"), NOW)
    with pytest.raises(AuthenticationError, match="signature|no key"):
        await auth.authenticate(_sa_token(k1, "b"), NOW)


def test_ca_settings_file_takes_the_kubernetes_sources(tmp_path: Path) -> None:
    (tmp_path / "ca.yaml").write_text("kube-tokenreview: in-cluster\nkube-jwks: kube/config\n")
    settings = load_config_file(tmp_path / "ca.yaml")
    assert settings == {"kube_tokenreview": "in-cluster",
                        "kube_jwks": str(tmp_path / "kube" / "config")}  # fmt: skip
    (tmp_path / "ca.yaml").write_text("workers: 1\nkube-jwks: 5\n")
    with pytest.raises(ConfigError, match=r"ca.yaml:2: kube-jwks: expected a string"):
        load_config_file(tmp_path / "ca.yaml")


def test_ca_serve_with_a_broken_kubeconfig_stops_with_one_line(tmp_path: Path) -> None:
    init_ca_dir(tmp_path / "ca", TD, SystemClock().now(), KeyType.EC_P256)
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nclusters: []\ncurrent-context: x\n")
    kubeconfig = str(tmp_path / "kubeconfig")
    done = run_cli("ca", "serve", "--ca-dir", str(tmp_path / "ca"), "--listen", "127.0.0.1:0",
                   "--metrics-listen", "off", "--kube-tokenreview", kubeconfig)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().endswith("contexts: expected a list of contexts"), done.stderr
    assert "Traceback" not in done.stderr
