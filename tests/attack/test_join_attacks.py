"""Hostile uses of join tokens: a host's join file used for another host's identities,
forged identity lists, algorithm tricks, and the token leaking (to logs, to an API server).

Each is refused before anything is signed: nothing reaches the ledger.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshtrust.ca import CaMetrics, CaServeConfig, load_token_signing_key, prepare_ca
from meshtrust.ca.assembly import build_authority
from meshtrust.ca.authn import Caller
from meshtrust.ca.authority import Credentials
from meshtrust.ca.join import JOIN_CLAIM, JOIN_TOKEN_TYPE, create_join_file, mint_join_token
from meshtrust.ca.ledger import IssuedRecord
from meshtrust.clock import SystemClock
from meshtrust.errors import AuthenticationError
from meshtrust.joinfile import load_join_file
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import KeyType, build_csr, generate_key
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.conftest import TD, RunningCa

pytestmark = pytest.mark.asyncio

H2_WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
H2_API = SpiffeId.parse("spiffe://example.org/ns/default/sa/api")
H3_DB = SpiffeId.parse("spiffe://example.org/ns/default/sa/db")


def csr_for(identity: SpiffeId) -> str:
    return build_csr(generate_key(KeyType.EC_P256), identity)


def h2_token(ca: RunningCa, tmp_path: Path) -> str:
    out = tmp_path / "h2.join"
    now = SystemClock().now()
    create_join_file(ca.ca_dir, [H2_WEB, H2_API], [ca.address], dt.timedelta(hours=1), now, out)
    return load_join_file(out).token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def refused_code(ca: RunningCa, csr: str, token: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ca.call(csr, token)
    assert token not in (info.value.details() or "")
    code = info.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


async def test_h2_join_file_cannot_obtain_h3_identity(
    running_ca: RunningCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = h2_token(running_ca, tmp_path)
    with caplog.at_level(logging.DEBUG, logger="meshtrust"):
        code = await refused_code(running_ca, csr_for(H3_DB), token)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert running_ca.ledger.certificates() == []
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("meshtrust"))
    assert token not in ours
    assert "does not grant spiffe://example.org/ns/default/sa/db" in ours


def _forged_unsigned(token: str) -> str:
    claims = claims_of(token)
    claims[JOIN_CLAIM]["identities"].append(str(H3_DB))
    header = b64(json.dumps({"alg": "none", "typ": JOIN_TOKEN_TYPE}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}."


def _forged_list_same_signature(token: str) -> str:
    header, _, signature = token.split(".")
    claims = claims_of(token)
    claims[JOIN_CLAIM]["identities"] = [str(H3_DB)]
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}"


def _forged_by_intruder(token: str) -> str:
    claims = claims_of(token)
    claims[JOIN_CLAIM]["identities"] = [str(H3_DB)]
    kid = jwt.get_unverified_header(token)["kid"]  # our kid, the intruder's key
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, "typ": JOIN_TOKEN_TYPE})


def _hs256_with_our_public_jwk(ca_dir: Path) -> Any:
    def forge(token: str) -> str:
        claims = claims_of(token)
        claims[JOIN_CLAIM]["identities"] = [str(H3_DB)]
        jwks = json.loads((ca_dir / "token-jwks.json").read_text())
        secret = json.dumps(jwks["keys"][0]).encode()
        header = {"alg": "HS256", "typ": JOIN_TOKEN_TYPE}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}"

    return forge


@pytest.mark.parametrize(
    "forgery", ["alg none", "edited list, old signature", "intruder key, our kid", "HS256"]
)
async def test_forged_identity_lists_are_unauthenticated(
    running_ca: RunningCa, tmp_path: Path, forgery: str
) -> None:
    token = h2_token(running_ca, tmp_path)
    forge = {
        "alg none": _forged_unsigned,
        "edited list, old signature": _forged_list_same_signature,
        "intruder key, our kid": _forged_by_intruder,
        "HS256": _hs256_with_our_public_jwk(running_ca.ca_dir),
    }[forgery]
    code = await refused_code(running_ca, csr_for(H3_DB), forge(token))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert running_ca.ledger.certificates() == []


@pytest.mark.parametrize(
    "edit",
    [
        "foreign trust domain",
        "host disagrees with subject",
        "no jti",
        "empty list",
        "list not a list",
    ],
)
async def test_malformed_join_claims_even_signed_by_our_key(
    running_ca: RunningCa, edit: str
) -> None:
    """Defence in depth: a join token only this CA could sign, with bad claims, is refused
    (a bug in `join create` must not become a certificate)."""
    key = load_token_signing_key(running_ca.ca_dir)
    assert key is not None
    good = mint_join_token(key, TD, "h2", [H2_WEB], SystemClock().now(), dt.timedelta(hours=1))
    claims = claims_of(good)
    if edit == "foreign trust domain":
        claims[JOIN_CLAIM]["identities"] = ["spiffe://other.org/ns/default/sa/web"]
    elif edit == "host disagrees with subject":
        claims["sub"] = "join:host:h3"
    elif edit == "no jti":
        del claims["jti"]
    elif edit == "empty list":
        claims[JOIN_CLAIM]["identities"] = []
    else:
        claims[JOIN_CLAIM]["identities"] = str(H2_WEB)
    token = jwt.encode(
        claims, key.key, algorithm="ES256", headers={"kid": key.kid, "typ": JOIN_TOKEN_TYPE}
    )
    identity = "spiffe://other.org/ns/default/sa/web" if "foreign" in edit else str(H2_WEB)
    code = await refused_code(running_ca, csr_for(SpiffeId.parse(identity)), token)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert running_ca.ledger.certificates() == []


class _RecordingRemote:
    """A TokenReview stand-in that records which tokens it was shown."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def authenticate(self, token: str, now: dt.datetime) -> Caller:
        self.seen.append(token)
        raise AuthenticationError("TokenReview says no")


class _NoLedger:
    async def record(self, rec: IssuedRecord) -> None:
        raise AssertionError("nothing may be recorded")


async def test_a_join_token_never_travels_to_an_api_server(ca_dir: Path) -> None:
    """A refused join token is not handed to TokenReview (a cluster would see our host
    credential); a refused workload token still is."""
    clock = SystemClock()
    prepared = prepare_ca(CaServeConfig(ca_dir=ca_dir, metrics_listen=None), clock)
    remote = _RecordingRemote()
    prepared.remote = [remote]  # type: ignore[list-item]
    authority = build_authority(prepared, clock, _NoLedger(), CaMetrics(TextRegistry()))
    key = load_token_signing_key(ca_dir)
    assert key is not None
    expired = mint_join_token(
        key, TD, "h2", [H2_WEB], clock.now() - dt.timedelta(hours=2), dt.timedelta(hours=1)
    )
    with pytest.raises(AuthenticationError, match="join file for host h2 expired"):
        await authority.create_certificate(csr_for(H2_WEB), 0, Credentials(expired, None))
    assert remote.seen == []
    with pytest.raises(AuthenticationError):
        await authority.create_certificate(csr_for(H2_WEB), 0, Credentials("a.b.c", None))
    assert remote.seen == ["a.b.c"]


async def test_join_token_for_another_trust_domain_ca(tmp_path: Path) -> None:
    """A CA of another trust domain never accepts ours, even if it somehow had our key's
    public half as a trusted workload issuer: the join authenticator trusts only its own."""
    from meshtrust.ca import init_ca_dir

    other_td = TrustDomain.parse("other.org")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    now = SystemClock().now()
    init_ca_dir(ours, TD, now, KeyType.EC_P256)
    init_ca_dir(theirs, other_td, now, KeyType.EC_P256)
    key = load_token_signing_key(ours)
    assert key is not None
    token = mint_join_token(key, TD, "h2", [H2_WEB], now, dt.timedelta(hours=1))
    prepared = prepare_ca(
        CaServeConfig(
            ca_dir=theirs,
            metrics_listen=None,
            jwt_issuers=(("meshtrust://example.org/ca", ours / "token-jwks.json"),),
        ),
        SystemClock(),
    )
    authority = build_authority(prepared, SystemClock(), _NoLedger(), CaMetrics(TextRegistry()))
    with pytest.raises(AuthenticationError):
        await authority.create_certificate(csr_for(H2_WEB), 0, Credentials(token, None))
