"""Join tokens at a real CA (TLS, gRPC, ledger on disk): a join file for {web, api} obtains
exactly those, from the CSR's URI SAN; anything else is refused before the ledger."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import grpc
import grpc.aio
import jwt
import pytest
from cryptography import x509

from meshtrust.ca import init_ca_dir, load_token_signing_key, mint_token, token_issuer_for
from meshtrust.ca.join import JOIN_TOKEN_TYPE, create_join_file, mint_join_token
from meshtrust.clock import SystemClock
from meshtrust.joinfile import JoinFile, load_join_file
from meshtrust.pki import KeyType, build_csr, generate_key
from meshtrust.spiffe import SpiffeId
from tests.conftest import TD, RunningCa

pytestmark = pytest.mark.asyncio

WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
API = SpiffeId.parse("spiffe://example.org/ns/default/sa/api")
DB = SpiffeId.parse("spiffe://example.org/ns/default/sa/db")


def join_file(
    ca: RunningCa,
    tmp_path: Path,
    *,
    host: str = "h2",
    identities: tuple[SpiffeId, ...] = (WEB, API),
    now: dt.datetime | None = None,
    ttl: dt.timedelta = dt.timedelta(hours=1),
) -> JoinFile:
    out = tmp_path / f"{host}.join"
    create_join_file(
        ca.ca_dir, identities, [ca.address], ttl, now or SystemClock().now(), out, host=host
    )
    return load_join_file(out)


def csr_for(identity: SpiffeId) -> str:
    return build_csr(generate_key(KeyType.EC_P256), identity)


def leaf_id(chain: list[str]) -> str:
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


async def refused(ca: RunningCa, csr: str, token: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ca.call(csr, token)
    assert token not in (info.value.details() or "")
    return info.value


async def test_join_token_obtains_exactly_its_identities(
    running_ca: RunningCa, tmp_path: Path
) -> None:
    jf = join_file(running_ca, tmp_path)
    for identity in (WEB, API, WEB):  # reusable within its TTL: restarts, several services
        assert leaf_id(await running_ca.call(csr_for(identity), jf.token)) == str(identity)
    rows = running_ca.ledger.certificates()
    assert sorted(r.spiffe_id for r in rows) == sorted(map(str, (WEB, API, WEB)))
    assert {r.authenticator for r in rows} == {"join"}
    jti = jwt.decode(jf.token, options={"verify_signature": False})["jti"]
    assert {r.requester for r in rows} == {f"host h2 (join {jti})"}


async def test_identity_outside_the_list_is_denied_and_not_recorded(
    running_ca: RunningCa, tmp_path: Path
) -> None:
    jf = join_file(running_ca, tmp_path)
    err = await refused(running_ca, csr_for(DB), jf.token)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "join file for host h2 does not grant" in (err.details() or "")
    assert running_ca.ledger.certificates() == []


async def test_expired_join_file_is_unauthenticated_saying_so(
    running_ca: RunningCa, tmp_path: Path
) -> None:
    made = SystemClock().now().replace(microsecond=0) - dt.timedelta(hours=2)
    key = load_token_signing_key(running_ca.ca_dir)
    assert key is not None
    token = mint_join_token(key, TD, "h2", [WEB], made, dt.timedelta(hours=1))
    err = await refused(running_ca, csr_for(WEB), token)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    expected = made + dt.timedelta(hours=1)
    assert f"the join file for host h2 expired at {expected:%Y-%m-%d %H:%M:%SZ}" in (
        err.details() or ""
    )
    assert running_ca.ledger.certificates() == []


async def test_csr_without_an_identity_is_invalid(running_ca: RunningCa, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes, serialization

    jf = join_file(running_ca, tmp_path)
    key = generate_key(KeyType.EC_P256)
    bare = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    pem = bare.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    err = await refused(running_ca, pem, jf.token)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert running_ca.ledger.certificates() == []


async def test_a_workload_token_is_not_a_join_token(running_ca: RunningCa) -> None:
    """A service-account token signed by the CA's own key, with the join header: refused."""
    key = load_token_signing_key(running_ca.ca_dir)
    assert key is not None
    claims = jwt.decode(running_ca.token(), options={"verify_signature": False})
    forged = jwt.encode(
        claims, key.key, algorithm="ES256", headers={"kid": key.kid, "typ": JOIN_TOKEN_TYPE}
    )
    err = await refused(running_ca, csr_for(WEB), forged)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "audience" in (err.details() or "")
    # Nor with the join audience: it still lacks the join claim.
    wl = running_ca.token(audience="meshtrust-join")
    forged = jwt.encode(
        jwt.decode(wl, options={"verify_signature": False}),
        key.key,
        algorithm="ES256",
        headers={"kid": key.kid, "typ": JOIN_TOKEN_TYPE},
    )
    err = await refused(running_ca, csr_for(WEB), forged)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert running_ca.ledger.certificates() == []


async def test_a_join_token_is_not_a_workload_token(running_ca: RunningCa) -> None:
    """The join claims under a plain JWT header go to the workload authenticator: refused
    (audience meshtrust-join, subject not a service account)."""
    key = load_token_signing_key(running_ca.ca_dir)
    assert key is not None
    join = mint_join_token(key, TD, "h2", [WEB], SystemClock().now(), dt.timedelta(hours=1))
    claims = jwt.decode(join, options={"verify_signature": False})
    as_workload = jwt.encode(
        claims, key.key, algorithm="ES256", headers={"kid": key.kid, "typ": "JWT"}
    )
    err = await refused(running_ca, csr_for(WEB), as_workload)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    # Even with the workload audience, the subject is no service account.
    claims["aud"] = ["istio-ca"]
    as_workload = jwt.encode(
        claims, key.key, algorithm="ES256", headers={"kid": key.kid, "typ": "JWT"}
    )
    err = await refused(running_ca, csr_for(WEB), as_workload)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "service account" in (err.details() or "")
    assert running_ca.ledger.certificates() == []


async def test_tampered_join_token_is_refused(running_ca: RunningCa, tmp_path: Path) -> None:
    jf = join_file(running_ca, tmp_path, identities=(WEB,))
    header, payload, signature = jf.token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["meshtrust.io/join"]["identities"].append(str(DB))
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = f"{header}.{forged_payload}.{signature}"
    err = await refused(running_ca, csr_for(DB), forged)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signature does not verify" in (err.details() or "")
    flipped = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
    err = await refused(running_ca, csr_for(WEB), f"{header}.{payload}.{flipped}")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert running_ca.ledger.certificates() == []


async def test_join_token_of_another_ca_is_refused(running_ca: RunningCa, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    init_ca_dir(other, TD, SystemClock().now(), KeyType.EC_P256)  # same trust domain, even
    out = tmp_path / "h2.join"
    create_join_file(
        other, [WEB], [running_ca.address], dt.timedelta(hours=1), SystemClock().now(), out
    )
    err = await refused(running_ca, csr_for(WEB), load_join_file(out).token)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert running_ca.ledger.certificates() == []


async def test_workload_tokens_still_work_beside_join(running_ca: RunningCa) -> None:
    key = load_token_signing_key(running_ca.ca_dir)
    assert key is not None
    token = mint_token(
        key, token_issuer_for(TD), "default", "web", SystemClock().now(), dt.timedelta(hours=1)
    )
    chain = await running_ca.call(csr_for(WEB), token)
    assert leaf_id(chain) == str(WEB)
    assert [r.authenticator for r in running_ca.ledger.certificates()] == ["jwt"]
