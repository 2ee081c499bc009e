"""Odd and forged bearer tokens, and weak issuer keys: what anyone who can reach the CA port
can send (no key needed), and what a careless JWKS would let through.

Every token here is refused with :class:`AuthenticationError` (UNAUTHENTICATED on the wire),
never an ``UNKNOWN`` from an exception nobody expected; a weak issuer key stops start-up with
a message naming the file and the key.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from meshtrust.ca import (
    CaServeConfig,
    JwtAuthenticator,
    load_jwks_file,
    load_token_signing_key,
    prepare_ca,
    token_issuer_for,
)
from meshtrust.ca.authn import MAX_NUMERIC_DATE
from meshtrust.clock import SystemClock
from meshtrust.errors import AuthenticationError, CADirectoryError, ConfigError
from meshtrust.pki import build_csr, generate_key
from meshtrust.pki.keys import private_key_pem
from tests.badcerts import NOW
from tests.conftest import TD, RunningCa
from tests.jwt_issuers import (
    HOUR,
    K8S_ISSUER,
    K8S_KID,
    WEB,
    Issuers,
    auth,
    hs256_with_public_key,
    intruder_key,
    issuers,
    sa_claims,
    swap_claims,
    ts,
    unsigned_token,
)
from tests.processes import run_cli

__all__ = ["auth", "intruder_key", "issuers"]  # fixtures, from tests.jwt_issuers

# --- forged and malformed tokens ------------------------------------------------------------

FORGED: list[tuple[str, Callable[[Issuers, rsa.RSAPrivateKey], str], str]] = [
    ("garbage", lambda i, x: "not-a-jwt", "not a well-formed JWT"),
    ("empty", lambda i, x: "", "not a well-formed JWT"),
    ("three-garbage-parts", lambda i, x: "a.b.c", "not a well-formed JWT"),
    ("too-large", lambda i, x: "a" * (16 * 1024 + 1), "too large"),
    (
        "alg-none",
        lambda i, x: unsigned_token({"alg": "none", "typ": "JWT"}, sa_claims()),
        "algorithm 'none' is not accepted",
    ),
    (
        "alg-none-own-issuer",
        lambda i, x: unsigned_token({"alg": "none"}, sa_claims(iss=i.own_issuer)),
        "algorithm 'none' is not accepted",
    ),
    (
        "hs256-with-public-key",
        lambda i, x: hs256_with_public_key(i, sa_claims()),
        "algorithm 'HS256' is not accepted",
    ),
    (
        "signed-by-another-key",
        lambda i, x: i.k8s(sa_claims(), key=x),
        "signature does not verify",
    ),
    (
        "tampered-claims",
        lambda i, x: swap_claims(
            i.k8s(sa_claims("default", "web")), sa_claims("kube-system", "admin")
        ),
        "signature does not verify",
    ),
    (
        "unknown-kid",
        lambda i, x: i.k8s(sa_claims(), kid="rotated-away"),
        "no key 'rotated-away'",
    ),
]


@pytest.mark.parametrize(
    ("make", "keyword"),
    [pytest.param(make, keyword, id=name) for name, make, keyword in FORGED],
)
def test_forged_and_malformed_tokens_are_refused_saying_why(
    issuers: Issuers,
    intruder_key: rsa.RSAPrivateKey,
    auth: JwtAuthenticator,
    make: Callable[[Issuers, rsa.RSAPrivateKey], str],
    keyword: str,
) -> None:
    token = make(issuers, intruder_key)
    with pytest.raises(AuthenticationError, match=keyword) as info:
        auth.authenticate(token, NOW)
    message = str(info.value)
    for part in token.split("."):
        if len(part) > 8:
            assert part not in message, "a refusal must not echo the token"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda i: unsigned_token({"alg": "PS256"}, sa_claims(iss=i.own_issuer), b"x" * 64),
            id="PS256-against-the-own-EC-key",
        ),
        pytest.param(
            lambda i: unsigned_token({"alg": "ES256", "kid": K8S_KID}, sa_claims(), b"x" * 64),
            id="ES256-against-the-cluster-RSA-key",
        ),
    ],
)
def test_algorithm_that_does_not_fit_the_issuer_key_is_refused(
    issuers: Issuers, auth: JwtAuthenticator, make: Callable[[Issuers], str]
) -> None:
    """Anyone can send such a token (no key needed): it must be a clean refusal."""
    with pytest.raises(AuthenticationError):
        auth.authenticate(make(issuers), NOW)


# --- numeric claims: every JSON value a signed token can carry in exp, nbf, iat --------------

YEAR_10000 = 253402300800  # 10000-01-01T00:00:00Z: datetime cannot hold it


def signed_with_literal(issuers: Issuers, claim: str, literal: str) -> str:
    """A token the cluster's key really signed, with ``claim`` set to the JSON ``literal``
    as written (PyJWT's encoder cannot write some of them: a 5000-digit integer)."""
    claims = {**sa_claims(), claim: "@@"}
    payload = json.dumps(claims).replace('"@@"', literal).encode()
    return jwt.api_jws.encode(payload, issuers.k8s_key, "RS256", headers={"kid": K8S_KID})


NOT_A_NUMERIC_DATE = [
    ("year-10000", str(YEAR_10000)),
    ("past-datetime-range", "10000000000000"),
    ("int64-max", str(2**63 - 1)),
    ("2^64", str(2**64)),
    ("1e300", "1e300"),
    ("1e400-is-infinity", "1e400"),
    ("Infinity", "Infinity"),
    ("-Infinity", "-Infinity"),
    ("NaN", "NaN"),
    ("negative", "-1"),
    ("negative-float", "-0.5"),
    ("true", "true"),
    ("false", "false"),
    ("string", '"1700000000"'),
    ("list", "[1700000000]"),
    ("object", '{"seconds": 1700000000}'),
]


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "literal", [v for _, v in NOT_A_NUMERIC_DATE], ids=[n for n, _ in NOT_A_NUMERIC_DATE]
)
def test_a_time_claim_that_is_not_a_numeric_date_is_refused(
    issuers: Issuers, auth: JwtAuthenticator, claim: str, literal: str
) -> None:
    token = signed_with_literal(issuers, claim, literal)
    with pytest.raises(AuthenticationError, match=f"token '{claim}' claim is not a valid"):
        auth.authenticate(token, NOW)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_a_5000_digit_time_claim_is_refused(
    issuers: Issuers, auth: JwtAuthenticator, claim: str
) -> None:
    """Past Python's int-from-text limit (4300 digits) the payload does not parse."""
    token = signed_with_literal(issuers, claim, "9" * 5000)
    with pytest.raises(AuthenticationError, match="not a well-formed JWT"):
        auth.authenticate(token, NOW)


@pytest.mark.parametrize(
    ("overrides", "expires"),
    [
        ({"exp": float(ts(NOW + HOUR)) + 0.5}, NOW + HOUR + dt.timedelta(seconds=0.5)),
        ({"exp": MAX_NUMERIC_DATE}, dt.datetime(9999, 12, 31, tzinfo=dt.UTC)),
        ({"nbf": 0, "iat": 0}, NOW + HOUR),
        ({"nbf": float(ts(NOW)), "iat": float(ts(NOW)) + 0.25}, NOW + HOUR),
    ],
    ids=["fractional-exp", "last-accepted-exp", "epoch-nbf-iat", "float-nbf-iat"],
)
def test_numeric_dates_at_the_edges_are_accepted(
    issuers: Issuers, auth: JwtAuthenticator, overrides: dict[str, Any], expires: dt.datetime
) -> None:
    token = issuers.k8s({**sa_claims(), **overrides})
    caller = auth.authenticate(token, NOW)
    assert (caller.identity, caller.expires) == (WEB, expires)
    assert auth.authenticate(token, NOW) == caller  # and from the cache


@pytest.mark.asyncio
async def test_a_token_expiring_in_year_10000_is_unauthenticated_on_the_wire(
    running_ca: RunningCa,
) -> None:
    """The reported case: UNKNOWN ("year 10000 is out of range") before, through the real CA."""
    key = load_token_signing_key(running_ca.ca_dir)
    assert key is not None
    claims = sa_claims(iss=token_issuer_for(TD), iat=SystemClock().now(), exp=YEAR_10000)
    token = jwt.encode(claims, key.key, algorithm="ES256", headers={"kid": key.kid})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running_ca.call(build_csr(generate_key(), WEB), token)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "'exp' claim is not a valid NumericDate" in (info.value.details() or "")
    assert running_ca.ledger.certificates() == []


# --- weak issuer keys: refused at start-up, naming the file and the key ---------------------


def _rsa_512() -> rsa.RSAPublicKey:
    """A real 512-bit RSA key (cryptography refuses to make one below 1024 bits)."""
    pem = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:512"],
        capture_output=True,
        check=True,
    ).stdout
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.public_key()


def _jwk(public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, kid: str) -> dict[str, Any]:
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    jwk["kid"] = kid
    return jwk


WEAK_KEYS: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("rsa-512", lambda: _jwk(_rsa_512(), "weak-512"), "RSA key of 512 bits"),
    (
        "rsa-1024",
        lambda: _jwk(rsa.generate_private_key(65537, 1024).public_key(), "weak-1024"),
        "RSA key of 1024 bits",
    ),
    (
        "ec-p521",
        lambda: _jwk(ec.generate_private_key(ec.SECP521R1()).public_key(), "p521"),
        "EC curve secp521r1 is not accepted",
    ),
    (
        "ec-secp256k1",
        lambda: _jwk(ec.generate_private_key(ec.SECP256K1()).public_key(), "k1"),
        "EC curve secp256k1 is not accepted",
    ),
    (
        "okp-ed25519",
        lambda: {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
            "kid": "ed",
        },
        "OKP keys are not accepted",
    ),
]


@pytest.mark.parametrize(
    ("make", "reason"), [w[1:] for w in WEAK_KEYS], ids=[w[0] for w in WEAK_KEYS]
)
def test_a_jwks_with_a_weak_key_is_refused_naming_file_and_key(
    tmp_path: Path, make: Callable[[], dict[str, Any]], reason: str
) -> None:
    strong = _jwk(rsa.generate_private_key(65537, 2048).public_key(), "good")
    weak = make()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [strong, weak]}))
    with pytest.raises(ConfigError) as info:
        load_jwks_file(K8S_ISSUER, path)
    assert str(info.value).startswith(f"{path}: key {weak['kid']!r}: {reason}")


@pytest.mark.parametrize(
    "public",
    [
        pytest.param(lambda: rsa.generate_private_key(65537, 2048).public_key(), id="rsa-2048"),
        pytest.param(lambda: rsa.generate_private_key(65537, 3072).public_key(), id="rsa-3072"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()).public_key(), id="p256"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()).public_key(), id="p384"),
    ],
)
def test_strong_issuer_keys_are_accepted(
    tmp_path: Path, public: Callable[[], rsa.RSAPublicKey | ec.EllipticCurvePublicKey]
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_jwk(public(), "k")]}))
    assert [k.key_id for k in load_jwks_file(K8S_ISSUER, path).jwks.keys] == ["k"]


def test_the_ca_refuses_to_start_with_a_weak_issuer_key(ca_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "cluster-jwks.json"
    path.write_text(json.dumps({"keys": [_jwk(_rsa_512(), "sa-key-2019")]}))
    config = CaServeConfig(ca_dir=ca_dir, metrics_listen=None, jwt_issuers=((K8S_ISSUER, path),))
    with pytest.raises(ConfigError, match=f"{path}: key 'sa-key-2019': RSA key of 512 bits"):
        prepare_ca(config, SystemClock())


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), id="rsa-1024"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP521R1()), id="p521"),
    ],
)
def test_the_ca_refuses_to_start_with_a_weak_own_token_key(
    ca_dir: Path, key: Callable[[], rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]
) -> None:
    """Before, a token key it could not use turned the CA's own issuer off with a warning."""
    (ca_dir / "token-key.pem").write_bytes(private_key_pem(key()))
    with pytest.raises(CADirectoryError, match="token-key.pem: the token key must be"):
        prepare_ca(CaServeConfig(ca_dir=ca_dir, metrics_listen=None), SystemClock())


@pytest.mark.slow
def test_ca_serve_with_a_weak_issuer_key_exits_with_a_message(ca_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "cluster-jwks.json"
    path.write_text(json.dumps({"keys": [_jwk(_rsa_512(), "sa-key-2019")]}))
    out = run_cli(
        "ca", "serve", "--ca-dir", str(ca_dir), "--listen", "127.0.0.1:0",
        "--jwt-issuer", f"{K8S_ISSUER}={path}",
    )  # fmt: skip
    assert out.returncode != 0
    assert "key 'sa-key-2019': RSA key of 512 bits" in out.stderr
    assert "Traceback" not in out.stderr
