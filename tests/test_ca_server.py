"""The CA over real gRPC + TLS on loopback, with grpcio (C-core) clients."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import subprocess
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509

from meshtrust.ca import CaEvent, init_ca_dir, load_token_signing_key, mint_token
from meshtrust.ca.cadir import token_issuer_for
from meshtrust.clock import SystemClock
from meshtrust.pki import KeyType, build_csr, format_serial, generate_key, private_key_pem
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests import badcerts
from tests.conftest import TD, RunningCa

WEB = SpiffeId.for_workload(TD, "default", "web")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _leaf(chain: list[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain[0].encode())


@pytest.mark.asyncio
@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048])
async def test_issues_verifiable_chain_and_records_it(
    running_ca: RunningCa, key_type: KeyType, tmp_path: Path
) -> None:
    key = generate_key(key_type)
    chain = await running_ca.call(build_csr(key, WEB), running_ca.token(), ttl=3600)

    # [leaf, intermediate, root bundle]; root bundle last, as one element.
    assert len(chain) == 3
    assert chain[-1] == (running_ca.ca_dir / "root-cert.pem").read_text()
    leaf = _leaf(chain)
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert life == dt.timedelta(hours=1, minutes=2)

    # openssl agrees the chain leads to the root.
    (tmp_path / "leaf.pem").write_text(chain[0])
    (tmp_path / "inter.pem").write_text("".join(chain[1:-1]))
    (tmp_path / "root.pem").write_text(chain[-1])
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "inter.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "leaf.pem: OK" in out.stdout

    # Durably in the ledger, with who asked and how.
    (rec,) = running_ca.ledger.certificates()
    assert rec.serial == format_serial(leaf.serial_number)
    assert rec.spiffe_id == str(WEB)
    assert rec.key_type == key_type.value
    assert rec.authenticator == "jwt"
    assert rec.requester == "system:serviceaccount:default:web"
    assert running_ca.metrics.count(CaEvent.ISSUED) == 1


@pytest.mark.asyncio
async def test_zero_ttl_means_default_and_short_ttls_work(running_ca: RunningCa) -> None:
    key = generate_key()
    default = _leaf(await running_ca.call(build_csr(key, WEB), running_ca.token(), ttl=0))
    short = _leaf(await running_ca.call(build_csr(key, WEB), running_ca.token(), ttl=5))
    assert default.not_valid_after_utc - default.not_valid_before_utc == dt.timedelta(
        hours=24, minutes=2
    )
    assert short.not_valid_after_utc - short.not_valid_before_utc == dt.timedelta(
        seconds=5, minutes=2
    )


@pytest.mark.asyncio
async def test_renewal_with_client_certificate_needs_no_token(running_ca: RunningCa) -> None:
    key = generate_key()
    first = await running_ca.call(build_csr(key, WEB), running_ca.token())
    client_cert = ("".join(first[:-1]).encode(), private_key_pem(key))

    new_key = generate_key()
    renewed = await running_ca.call(build_csr(new_key, WEB), None, client_cert=client_cert)
    leaf = _leaf(renewed)
    assert leaf.public_key() == new_key.public_key()
    records = {r.serial: r for r in running_ca.ledger.certificates()}
    rec = records[format_serial(leaf.serial_number)]
    assert rec.authenticator == "client-cert"
    assert rec.spiffe_id == str(WEB)

    # The certificate authenticates its own identity only.
    other = SpiffeId.for_workload(TD, "default", "db")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running_ca.call(build_csr(new_key, other), None, client_cert=client_cert)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert str(other) in (err.value.details() or "")


@pytest.mark.asyncio
async def test_client_certificate_from_another_root_is_refused(
    running_ca: RunningCa, tmp_path: Path
) -> None:
    # A certificate from a CA this one does not trust fails the TLS handshake itself.
    leaf = badcerts.leaf_from_another_root(WEB, now=SystemClock().now())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running_ca.call(
            build_csr(leaf.key, WEB), None, client_cert=(leaf.chain_pem, leaf.key_pem)
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert running_ca.ledger.serials() == set()


def _alg_none_token(claims: dict[str, object]) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def _hs256_with_public_key(ca_dir: Path, claims: dict[str, object]) -> str:
    # The classic key-confusion attack: HMAC keyed with the issuer's *public* key.
    secret = (ca_dir / "token-jwks.json").read_bytes()
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(sig)}"


def _claims(ca: RunningCa) -> dict[str, object]:
    now = int(SystemClock().now().timestamp())
    return {
        "iss": token_issuer_for(TD),
        "sub": "system:serviceaccount:default:web",
        "aud": ["istio-ca"],
        "iat": now,
        "exp": now + 3600,
    }


def _foreign_issuer_token(tmp_path: Path) -> str:
    other = tmp_path / "other-ca"
    init_ca_dir(other, TrustDomain.parse("other.org"), SystemClock().now())
    key = load_token_signing_key(other)
    assert key is not None
    return mint_token(
        key,
        token_issuer_for(TrustDomain.parse("other.org")),
        "default",
        "web",
        SystemClock().now(),
        dt.timedelta(hours=1),
    )


# (case, csr builder, token builder, ttl, expected code, words in details)
REFUSALS = [
    ("no token", "good", "none", 0, grpc.StatusCode.UNAUTHENTICATED, "no bearer token"),
    ("garbage token", "good", "garbage", 0, grpc.StatusCode.UNAUTHENTICATED, "well-formed"),
    ("expired token", "good", "expired", 0, grpc.StatusCode.UNAUTHENTICATED, "expired"),
    ("not yet valid token", "good", "future", 0, grpc.StatusCode.UNAUTHENTICATED, "not valid yet"),
    ("wrong audience", "good", "audience", 0, grpc.StatusCode.UNAUTHENTICATED, "audience"),
    ("unknown issuer", "good", "foreign", 0, grpc.StatusCode.UNAUTHENTICATED, "not trusted"),
    ("alg none", "good", "alg-none", 0, grpc.StatusCode.UNAUTHENTICATED, "algorithm"),
    ("HS256 with public key", "good", "hs256", 0, grpc.StatusCode.UNAUTHENTICATED, "algorithm"),
    ("token for another SA", "other-id", "good", 0, grpc.StatusCode.PERMISSION_DENIED, "asks for"),
    ("two URI SANs", "two-uris", "good", 0, grpc.StatusCode.INVALID_ARGUMENT, "URI SANs"),
    ("DNS SAN", "dns-san", "good", 0, grpc.StatusCode.PERMISSION_DENIED, "SANs other than"),
    ("CA=true", "ca-true", "good", 0, grpc.StatusCode.PERMISSION_DENIED, "CA certificate"),
    ("bad signature", "bad-sig", "good", 0, grpc.StatusCode.INVALID_ARGUMENT, "signature"),
    ("not PEM", "not-pem", "good", 0, grpc.StatusCode.INVALID_ARGUMENT, "PEM"),
    ("truncated CSR", "truncated", "good", 0, grpc.StatusCode.INVALID_ARGUMENT, "CSR"),
    ("oversized CSR", "oversized", "good", 0, grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    ("TTL over max", "good", "good", 91 * 86400, grpc.StatusCode.INVALID_ARGUMENT, "maximum"),
    ("negative TTL", "good", "good", -5, grpc.StatusCode.INVALID_ARGUMENT, "negative"),
]


def _csr(kind: str) -> str:
    key = generate_key()
    match kind:
        case "good":
            return build_csr(key, WEB)
        case "other-id":
            return build_csr(key, SpiffeId.for_workload(TD, "default", "db"))
        case "two-uris":
            return badcerts.csr_with_two_uri_sans(WEB, SpiffeId.for_workload(TD, "x", "y"))
        case "dns-san":
            return badcerts.csr_with_dns_san(WEB)
        case "ca-true":
            return badcerts.csr_with_ca_true(WEB)
        case "bad-sig":
            return badcerts.csr_with_bad_signature(WEB)
        case "not-pem":
            return badcerts.non_pem_csr()
        case "truncated":
            return badcerts.truncated_csr(WEB)
        case "oversized":
            return badcerts.oversized_csr(WEB)
    raise AssertionError(kind)


def _token(kind: str, ca: RunningCa, tmp_path: Path) -> str | None:
    now = SystemClock().now()
    match kind:
        case "good":
            return ca.token()
        case "none":
            return None
        case "garbage":
            return "not-a-jwt"
        case "expired":
            return ca.token(now=now - dt.timedelta(hours=2), ttl=dt.timedelta(hours=1))
        case "future":
            return ca.token(now=now + dt.timedelta(hours=1))
        case "audience":
            return ca.token(audience="someone-else")
        case "foreign":
            return _foreign_issuer_token(tmp_path)
        case "alg-none":
            return _alg_none_token(_claims(ca))
        case "hs256":
            return _hs256_with_public_key(ca.ca_dir, _claims(ca))
    raise AssertionError(kind)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("case", "csr_kind", "token_kind", "ttl", "code", "words"),
    REFUSALS,
    ids=[r[0] for r in REFUSALS],
)
async def test_refusals_have_the_right_code_and_record_nothing(
    running_ca: RunningCa,
    tmp_path: Path,
    case: str,
    csr_kind: str,
    token_kind: str,
    ttl: int,
    code: grpc.StatusCode,
    words: str,
) -> None:
    token = _token(token_kind, running_ca, tmp_path)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running_ca.call(_csr(csr_kind), token, ttl=ttl)
    assert err.value.code() == code, err.value.details()
    details = err.value.details() or ""
    assert words in details
    if token:
        assert token not in details
        for part in token.split("."):
            if len(part) > 8:
                assert part not in details
    assert running_ca.ledger.serials() == set()
    assert running_ca.metrics.count(CaEvent.ISSUED) == 0
    assert running_ca.metrics.count(CaEvent.CSR) == 1


@pytest.mark.asyncio
async def test_refusals_are_counted_by_kind(running_ca: RunningCa) -> None:
    good = build_csr(generate_key(), WEB)
    for csr, token in [
        (good, None),
        ("garbage", running_ca.token()),
        (build_csr(generate_key(), SpiffeId.for_workload(TD, "default", "db")), running_ca.token()),
    ]:
        with pytest.raises(grpc.aio.AioRpcError):
            await running_ca.call(csr, token)
    m = running_ca.metrics
    assert m.count(CaEvent.CSR) == 3
    assert m.count(CaEvent.AUTHN_FAILURE) == 1
    assert m.count(CaEvent.CSR_PARSE_ERROR) == 1
    assert m.count(CaEvent.PERMISSION_DENIED) == 1


@pytest.mark.asyncio
async def test_concurrent_requests_share_commits(running_ca: RunningCa) -> None:
    import asyncio

    token = running_ca.token()
    csr = build_csr(generate_key(), WEB)
    async with running_ca.channel() as channel:
        from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc

        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        responses = await asyncio.gather(
            *[
                stub.CreateCertificate(
                    ca_pb2.IstioCertificateRequest(csr=csr),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=20,
                )
                for _ in range(100)
            ]
        )
    serials = {format_serial(_leaf(list(r.cert_chain)).serial_number) for r in responses}
    assert len(serials) == 100
    assert running_ca.ledger.serials() == serials


def test_metrics_expose_istio_names() -> None:
    from meshtrust.ca import CaMetrics
    from meshtrust.metrics_text import TextRegistry

    registry = TextRegistry()
    metrics = CaMetrics(registry)
    metrics.observe(CaEvent.CSR)
    metrics.observe(CaEvent.CSR)
    metrics.observe(CaEvent.ISSUED)
    metrics.observe(CaEvent.PERMISSION_DENIED)
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    metrics.set_expiries(now, now - dt.timedelta(days=1))
    text = registry.exposition().decode()
    lines = set(text.splitlines())
    # Counters as istiod exposes them: typed counter, no _total suffix.
    assert "# TYPE citadel_server_csr_count counter" in lines
    assert "# TYPE citadel_server_success_cert_issuance_count counter" in lines
    assert not any("citadel_server" in line and "_total" in line for line in lines)
    assert "# TYPE citadel_server_root_cert_expiry_timestamp gauge" in lines
    assert "citadel_server_csr_count 2.0" in lines
    assert "citadel_server_success_cert_issuance_count 1.0" in lines
    assert "citadel_server_csr_sign_err_count 1.0" in lines
    assert "citadel_server_authentication_failure_count 0.0" in lines
    assert "citadel_server_csr_parsing_err_count 0.0" in lines
    values = {line.split()[0]: float(line.split()[1]) for line in lines if line and line[0] != "#"}
    assert values["citadel_server_root_cert_expiry_timestamp"] == now.timestamp()
    assert (
        values["citadel_server_cert_chain_expiry_timestamp"]
        == (now - dt.timedelta(days=1)).timestamp()
    )
    assert 'meshtrust_ca_refusals_total{reason="permission_denied"} 1.0' in lines


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "server_name",
    [
        "istiod.istio-system.svc",
        "istiod.istio-system.svc.cluster.local",
        "istiod",
        "istiod.istio-system",
        "localhost",
    ],
)
async def test_serving_certificate_covers_istiods_names(
    running_ca: RunningCa, server_name: str
) -> None:
    """Istio's CA client rewrites a localhost address to istiod.istio-system.svc; a client
    verifying any of istiod's names against the root gets through the TLS handshake."""
    import asyncio
    import socket
    import ssl

    context = ssl.create_default_context(cadata=running_ca.root_pem.decode())
    context.set_alpn_protocols(["h2"])
    host, port = running_ca.address.rsplit(":", 1)

    def handshake() -> str | None:
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                return tls.selected_alpn_protocol()

    assert await asyncio.to_thread(handshake) == "h2"
