"""PKI core: the issued-leaf profile, CSRs, X.509-SVID verification, and the CA directory."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshtrust.ca import init_ca_dir, load_ca_dir, load_token_signing_key
from meshtrust.errors import CADirectoryError, InvalidCSR, SvidVerificationError
from meshtrust.pki import (
    CLOCK_SKEW,
    MAX_CSR_BYTES,
    KeyType,
    PrivateKey,
    TrustBundle,
    build_csr,
    generate_key,
    issue_leaf,
    leaf_validity,
    parse_csr,
    private_key_pem,
    random_serial,
    verify_svid,
)
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests import badcerts
from tests.badcerts import NOW, CaFixture, Leaf

TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "default", "web")
OTHER = SpiffeId.for_workload(TD, "default", "db")
DAY = dt.timedelta(days=1)

FAST_KEY_TYPES = [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048]


@functools.cache
def key_of(key_type: KeyType) -> PrivateKey:
    """One key per type for the whole session: RSA-3072/4096 generation is slow."""
    return generate_key(key_type)


@functools.cache
def ca_of(key_type: KeyType) -> CaFixture:
    """One test CA per key type (root and intermediate of that type)."""
    return badcerts.make_ca(TD, key_type=key_type)


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    """The extension of type ``kind``; fails the test if it is absent."""
    return cert.extensions.get_extension_for_class(kind)


# --- issue_leaf: DESIGN.md "Issued leaf" ----------------------------------------------------


@pytest.mark.parametrize("leaf_type", list(KeyType), ids=str)
@pytest.mark.parametrize("ca_type", FAST_KEY_TYPES, ids=lambda k: f"ca-{k}")
def test_issued_leaf_has_the_svid_profile(ca_type: KeyType, leaf_type: KeyType) -> None:
    ca = ca_of(ca_type)
    public_key = key_of(leaf_type).public_key()
    ttl = dt.timedelta(hours=24)

    leaf = issue_leaf(ca.signer, public_key, WEB, NOW, ttl)

    assert leaf.version is x509.Version.v3
    assert 0 < leaf.serial_number < 2**128
    assert len(leaf.subject) == 0
    assert leaf.issuer == ca.signer.cert.subject
    assert leaf.public_key() == public_key

    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(WEB))]

    ku = ext(leaf, x509.KeyUsage).value
    granted = {
        name
        for name in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        )
        if getattr(ku, name)
    }
    assert granted == {"digital_signature", "key_encipherment"}

    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False

    issuer_ski = ext(ca.signer.cert, x509.SubjectKeyIdentifier).value
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == issuer_ski.digest
    ski = ext(leaf, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public_key)

    assert leaf.not_valid_before_utc == NOW - dt.timedelta(minutes=2)
    assert leaf.not_valid_after_utc == NOW + ttl

    # Signed by the intermediate, with the hash that goes with its key.
    leaf.verify_directly_issued_by(ca.signer.cert)
    expected_hash = hashes.SHA384 if ca_type is KeyType.EC_P384 else hashes.SHA256
    assert isinstance(leaf.signature_hash_algorithm, expected_hash)


def test_issued_leaf_serials_are_random_and_below_2_128() -> None:
    ca = ca_of(KeyType.EC_P256)
    public_key = key_of(KeyType.EC_P256).public_key()
    serials = [issue_leaf(ca.signer, public_key, WEB, NOW, DAY).serial_number for _ in range(64)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**128 for s in serials)
    # Random, not a counter: with 64 draws, some serial uses far more than 64 bits.
    assert max(serials) > 2**100
    assert all(0 < random_serial() < 2**128 for _ in range(1000))


def test_issue_leaf_uses_a_given_serial() -> None:
    ca = ca_of(KeyType.EC_P256)
    leaf = issue_leaf(ca.signer, key_of(KeyType.EC_P256).public_key(), WEB, NOW, DAY, serial=42)
    assert leaf.serial_number == 42


def test_issued_leaf_never_outlives_its_signer() -> None:
    ca = badcerts.make_ca(TD, intermediate_lifetime=dt.timedelta(hours=1))
    leaf = issue_leaf(ca.signer, key_of(KeyType.EC_P256).public_key(), WEB, NOW, DAY)
    assert leaf.not_valid_after_utc == ca.signer.cert.not_valid_after_utc
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=1)


@pytest.mark.parametrize(
    ("signer_not_after", "ttl", "expected_not_after"),
    [
        (NOW + 365 * DAY, DAY, NOW + DAY),
        (NOW + DAY, DAY, NOW + DAY),
        (NOW + dt.timedelta(hours=1), DAY, NOW + dt.timedelta(hours=1)),
        (NOW + 365 * DAY, dt.timedelta(seconds=20), NOW + dt.timedelta(seconds=20)),
    ],
    ids=["ttl", "ttl-equals-signer", "clamped-to-signer", "short-ttl"],
)
def test_leaf_validity(
    signer_not_after: dt.datetime, ttl: dt.timedelta, expected_not_after: dt.datetime
) -> None:
    assert CLOCK_SKEW == dt.timedelta(minutes=2)
    assert leaf_validity(signer_not_after, NOW, ttl) == (NOW - CLOCK_SKEW, expected_not_after)


# --- openssl agrees -------------------------------------------------------------------------


def openssl_verify(tmp_path: Path, root: Path, untrusted: Path, leaf: Leaf, purpose: str) -> str:
    """Run ``openssl verify`` at :data:`NOW`; return its combined output, raise if refused."""
    openssl = shutil.which("openssl")
    # A real peer, as required as Envoy: a machine without it fails here rather than skipping.
    assert openssl is not None, "openssl is not installed (apt-get install openssl)"
    leaf_path = tmp_path / "leaf.pem"
    leaf_path.write_bytes(badcerts.cert_pem(leaf.cert))
    result = subprocess.run(
        [
            openssl,
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-attime",
            str(int(NOW.timestamp())),
            "-CAfile",
            str(root),
            "-untrusted",
            str(untrusted),
            str(leaf_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"openssl verify refused the chain:\n{output}")
    return output


@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
@pytest.mark.parametrize("ca_type", FAST_KEY_TYPES, ids=str)
def test_openssl_verifies_an_issued_chain(tmp_path: Path, ca_type: KeyType, purpose: str) -> None:
    ca = ca_of(ca_type)
    (tmp_path / "root.pem").write_bytes(badcerts.cert_pem(ca.root))
    (tmp_path / "inter.pem").write_bytes(badcerts.cert_pem(ca.signer.cert))
    cert = issue_leaf(ca.signer, key_of(KeyType.EC_P256).public_key(), WEB, NOW, DAY)
    leaf = Leaf(cert, key_of(KeyType.EC_P256), (ca.signer.cert,))

    output = openssl_verify(tmp_path, tmp_path / "root.pem", tmp_path / "inter.pem", leaf, purpose)
    assert "leaf.pem: OK" in output


def test_openssl_verifies_a_leaf_from_an_initialised_ca_dir(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    init_ca_dir(directory, TD, NOW)
    material = load_ca_dir(directory, NOW)
    key = key_of(KeyType.EC_P256)
    cert = issue_leaf(material.signer, key.public_key(), WEB, NOW, DAY)
    leaf = Leaf(cert, key, material.intermediates)

    output = openssl_verify(
        tmp_path, directory / "root-cert.pem", directory / "ca-cert.pem", leaf, "sslclient"
    )
    assert "leaf.pem: OK" in output


def test_openssl_refuses_a_leaf_from_another_root(tmp_path: Path) -> None:
    """The control for the tests above: the same invocation does refuse a foreign chain."""
    ca = ca_of(KeyType.EC_P256)
    (tmp_path / "root.pem").write_bytes(badcerts.cert_pem(ca.root))
    foreign = badcerts.leaf_from_another_root(WEB)
    (tmp_path / "inter.pem").write_bytes(badcerts.cert_pem(*foreign.intermediates))
    with pytest.raises(AssertionError, match="refused"):
        openssl_verify(tmp_path, tmp_path / "root.pem", tmp_path / "inter.pem", foreign, "any")


# --- CSRs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_build_csr_round_trips_through_parse_csr(key_type: KeyType) -> None:
    key = key_of(key_type)
    pem = build_csr(key, WEB)

    parsed = x509.load_pem_x509_csr(pem.encode())
    assert len(parsed.subject) == 0
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical

    request = parse_csr(pem)
    assert request.uri_sans == (str(WEB),)
    assert request.other_sans == ()
    assert request.requests_ca is False
    assert request.key_type == key_type.value
    assert request.public_key == key.public_key()


def test_parse_csr_accepts_surrounding_whitespace() -> None:
    pem = build_csr(key_of(KeyType.EC_P256), WEB)
    assert parse_csr(f"\n  {pem}\n\n").uri_sans == (str(WEB),)


REFUSED_CSRS: list[tuple[str, Callable[[], str], str]] = [
    ("bad-signature", lambda: badcerts.csr_with_bad_signature(WEB), "signature does not verify"),
    ("rsa-1024", lambda: badcerts.csr_with_rsa_1024_key(WEB), "1024 bits; at least 2048"),
    ("p521", lambda: badcerts.csr_with_p521_key(WEB), "curve secp521r1 is not allowed"),
    ("ed25519", lambda: badcerts.csr_with_ed25519_key(WEB), "key type is not allowed"),
    ("non-pem", badcerts.non_pem_csr, "exactly one PEM 'CERTIFICATE REQUEST' block"),
    ("truncated", lambda: badcerts.truncated_csr(WEB), "not a valid PEM-encoded PKCS#10"),
    ("oversized", lambda: badcerts.oversized_csr(WEB), f"the limit is {MAX_CSR_BYTES}"),
    ("empty", lambda: "", "CSR is empty"),
    ("blank", lambda: " \n\t ", "CSR is empty"),
    (
        "two-csrs",
        lambda: badcerts.csr_for(WEB) + badcerts.csr_for(WEB),
        "exactly one PEM 'CERTIFICATE REQUEST' block",
    ),
    (
        "certificate-not-csr",
        lambda: badcerts.cert_pem(ca_of(KeyType.EC_P256).root).decode(),
        "exactly one PEM 'CERTIFICATE REQUEST' block",
    ),
    (
        "non-ascii",
        lambda: (
            "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\u00e9\n-----END CERTIFICATE REQUEST-----"
        ),
        "not a valid PEM-encoded PKCS#10",
    ),
]


@pytest.mark.parametrize(
    ("make", "keyword"),
    [pytest.param(make, kw, id=name) for name, make, kw in REFUSED_CSRS],
)
def test_parse_csr_refuses_bad_csrs(make: Callable[[], str], keyword: str) -> None:
    with pytest.raises(InvalidCSR, match=re.escape(keyword)):
        parse_csr(make())


def test_oversized_csr_is_a_real_csr() -> None:
    """So the size limit, not some parse error, is what refuses it."""
    pem = badcerts.oversized_csr(WEB)
    assert len(pem) > MAX_CSR_BYTES
    assert x509.load_pem_x509_csr(pem.encode()).is_signature_valid


PARSED_CSRS: list[tuple[str, Callable[[], str], tuple[str, ...], tuple[str, ...], bool]] = [
    ("own-id", lambda: badcerts.csr_for(WEB), (str(WEB),), (), False),
    ("other-id", lambda: badcerts.csr_for(OTHER), (str(OTHER),), (), False),
    ("no-san", badcerts.csr_without_san, (), (), False),
    (
        "two-uri-sans",
        lambda: badcerts.csr_with_two_uri_sans(WEB, OTHER),
        (str(WEB), str(OTHER)),
        (),
        False,
    ),
    (
        "dns-san",
        lambda: badcerts.csr_with_dns_san(WEB, "web.example.org"),
        (str(WEB),),
        ("DNSName:web.example.org",),
        False,
    ),
    ("ca-true", lambda: badcerts.csr_with_ca_true(WEB), (str(WEB),), (), True),
    ("key-cert-sign", lambda: badcerts.csr_with_key_cert_sign(WEB), (str(WEB),), (), True),
]


@pytest.mark.parametrize(
    ("make", "uri_sans", "other_sans", "requests_ca"),
    [pytest.param(make, u, o, ca, id=name) for name, make, u, o, ca in PARSED_CSRS],
)
def test_parse_csr_reports_what_the_csr_asks_for(
    make: Callable[[], str],
    uri_sans: tuple[str, ...],
    other_sans: tuple[str, ...],
    requests_ca: bool,
) -> None:
    """Well-formed CSRs parse; what they ask for is reported for the CA to decide on
    (see test_authn.py: decide_identity refuses all but the caller's own identity)."""
    request = parse_csr(make())
    assert request.uri_sans == uri_sans
    assert request.other_sans == other_sans
    assert request.requests_ca is requests_ca


# --- verify_svid ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CaFixture:
    return ca_of(KeyType.EC_P256)


@pytest.mark.parametrize("ca_type", FAST_KEY_TYPES, ids=str)
def test_verify_svid_accepts_an_issued_chain(ca_type: KeyType) -> None:
    ca = ca_of(ca_type)
    cert = issue_leaf(ca.signer, key_of(KeyType.EC_P256).public_key(), WEB, NOW, DAY)

    verified = verify_svid([cert, ca.signer.cert], ca.bundle, NOW)

    assert verified.spiffe_id == WEB
    assert verified.leaf == cert
    assert verified.chain == (cert, ca.signer.cert, ca.root)


def test_verify_svid_accepts_a_chain_to_any_root_of_the_bundle(ca: CaFixture) -> None:
    """During a root rotation the bundle holds the old and the new root."""
    other = badcerts.make_ca(TD)
    bundle = TrustBundle(TD, (other.root, ca.root))
    leaf = badcerts.svid_leaf(ca.signer, WEB)
    assert verify_svid(leaf.chain, bundle, NOW).chain[-1] == ca.root


@pytest.mark.parametrize(
    ("offset", "keyword"),
    [
        (-CLOCK_SKEW - dt.timedelta(seconds=1), "not yet valid"),
        (-CLOCK_SKEW, None),
        (dt.timedelta(hours=1), None),
        (dt.timedelta(hours=1, seconds=1), "expired"),
    ],
    ids=["before-not-before", "at-not-before", "at-not-after", "after-not-after"],
)
def test_verify_svid_validity_window(
    ca: CaFixture, offset: dt.timedelta, keyword: str | None
) -> None:
    leaf = badcerts.svid_leaf(ca.signer, WEB, ttl=dt.timedelta(hours=1))
    if keyword is None:
        assert verify_svid(leaf.chain, ca.bundle, NOW + offset).spiffe_id == WEB
    else:
        with pytest.raises(SvidVerificationError, match=keyword):
            verify_svid(leaf.chain, ca.bundle, NOW + offset)


BAD_LEAVES: list[tuple[str, Callable[[CaFixture], list[x509.Certificate]], str]] = [
    (
        "ca-true",
        lambda ca: badcerts.leaf_with_ca_true(ca.signer, WEB).chain,
        r"CA certificate \(BasicConstraints CA=true\)",
    ),
    (
        "two-uri-sans",
        lambda ca: badcerts.leaf_with_two_uri_sans(ca.signer, WEB, OTHER).chain,
        "exactly one URI SAN, has 2",
    ),
    (
        "dns-san-only",
        lambda ca: badcerts.leaf_with_dns_san_only(ca.signer).chain,
        "exactly one URI SAN, has 0",
    ),
    ("no-san", lambda ca: badcerts.leaf_without_san(ca.signer).chain, "no subjectAltName"),
    (
        "non-spiffe-uri",
        lambda ca: badcerts.leaf_with_non_spiffe_uri(ca.signer).chain,
        "URI SAN is not a SPIFFE ID",
    ),
    (
        "key-cert-sign",
        lambda ca: badcerts.leaf_with_key_cert_sign(ca.signer, WEB).chain,
        "must not include keyCertSign",
    ),
    (
        "no-key-usage",
        lambda ca: badcerts.leaf_without_key_usage(ca.signer, WEB).chain,
        "no KeyUsage",
    ),
    ("expired", lambda ca: badcerts.expired_leaf(ca.signer, WEB).chain, "expired at"),
    (
        "not-yet-valid",
        lambda ca: badcerts.not_yet_valid_leaf(ca.signer, WEB).chain,
        "not yet valid",
    ),
    (
        "another-root",
        lambda ca: badcerts.leaf_from_another_root(WEB).chain,
        "does not verify against the trust bundle",
    ),
    (
        "another-trust-domain",
        lambda ca: badcerts.leaf_in_another_trust_domain(ca.signer).chain,
        "spiffe://other.org/ns/default/sa/web is not in trust domain example.org",
    ),
    (
        "missing-intermediate",
        lambda ca: [badcerts.svid_leaf(ca.signer, WEB).cert],
        "does not verify against the trust bundle",
    ),
    ("empty-chain", lambda ca: [], "empty certificate chain"),
]


@pytest.mark.parametrize(
    ("make_chain", "rule"),
    [pytest.param(make, rule, id=name) for name, make, rule in BAD_LEAVES],
)
def test_verify_svid_refuses_bad_leaves(
    ca: CaFixture, make_chain: Callable[[CaFixture], list[x509.Certificate]], rule: str
) -> None:
    with pytest.raises(SvidVerificationError, match=rule):
        verify_svid(make_chain(ca), ca.bundle, NOW)


# --- CA directory ---------------------------------------------------------------------------

KEY_FILES = ("root-key.pem", "ca-key.pem", "token-key.pem")
PUBLIC_FILES = ("root-cert.pem", "ca-cert.pem", "cert-chain.pem", "token-jwks.json")


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    """A CA directory made by ``init_ca_dir`` at :data:`NOW`."""
    directory = tmp_path / "ca"
    init_ca_dir(directory, TD, NOW)
    return directory


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048], ids=str)
def test_init_ca_dir_writes_a_loadable_ca(tmp_path: Path, key_type: KeyType) -> None:
    directory = tmp_path / "ca"
    init_ca_dir(directory, TD, NOW, key_type)

    assert sorted(p.name for p in directory.iterdir()) == sorted(KEY_FILES + PUBLIC_FILES)
    for name in KEY_FILES:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    for name in PUBLIC_FILES:
        assert not (directory / name).stat().st_mode & stat.S_IWOTH, name

    material = load_ca_dir(directory, NOW)
    assert material.layout == "istio"
    (root,) = material.roots
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD.name
    assert material.trust_domain_hint() == TD
    assert root.not_valid_after_utc == NOW + dt.timedelta(days=3650)
    assert material.intermediates == (material.signer.cert,)
    material.signer.cert.verify_directly_issued_by(root)
    assert ext(material.signer.cert, x509.BasicConstraints).value.ca
    expected_key = rsa.RSAPrivateKey if key_type is KeyType.RSA_2048 else ec.EllipticCurvePrivateKey
    assert isinstance(material.signer.key, expected_key)

    # What was loaded can issue SVIDs that verify against the root it loaded.
    cert = issue_leaf(material.signer, key_of(KeyType.EC_P256).public_key(), WEB, NOW, DAY)
    bundle = TrustBundle(TD, material.roots)
    assert verify_svid([cert, *material.intermediates], bundle, NOW).spiffe_id == WEB


def test_init_ca_dir_token_key_matches_its_jwks(ca_dir: Path) -> None:
    token_key = load_token_signing_key(ca_dir)
    assert token_key is not None
    assert isinstance(token_key.key.curve, ec.SECP256R1)
    published = json.loads((ca_dir / "token-jwks.json").read_text())
    assert published == token_key.jwks
    assert [k["kid"] for k in published["keys"]] == [token_key.kid]


def test_load_token_signing_key_is_none_without_a_key(ca_dir: Path) -> None:
    (ca_dir / "token-key.pem").unlink()
    assert load_token_signing_key(ca_dir) is None


def test_load_token_signing_key_refuses_a_non_p256_key(ca_dir: Path) -> None:
    (ca_dir / "token-key.pem").write_bytes(private_key_pem(key_of(KeyType.EC_P384)))
    with pytest.raises(CADirectoryError, match="token key must be an ECDSA P-256 key"):
        load_token_signing_key(ca_dir)


def test_init_ca_dir_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}

    with pytest.raises(CADirectoryError, match="refusing to overwrite"):
        init_ca_dir(ca_dir, TD, NOW)
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before

    init_ca_dir(ca_dir, TD, NOW, force=True)
    assert (ca_dir / "root-cert.pem").read_bytes() != before["root-cert.pem"]
    assert (ca_dir / "root-key.pem").read_bytes() != before["root-key.pem"]
    assert load_ca_dir(ca_dir, NOW).roots[0] != x509.load_pem_x509_certificate(
        before["root-cert.pem"]
    )


@pytest.mark.parametrize("with_root_in_tls_crt", [False, True], ids=["ca-only", "ca-and-root"])
def test_load_ca_dir_reads_the_tls_secret_layout(
    ca_dir: Path, tmp_path: Path, with_root_in_tls_crt: bool
) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    source = "cert-chain.pem" if with_root_in_tls_crt else "ca-cert.pem"
    (tls / "tls.crt").write_bytes((ca_dir / source).read_bytes())
    (tls / "tls.key").write_bytes((ca_dir / "ca-key.pem").read_bytes())
    (tls / "ca.crt").write_bytes((ca_dir / "root-cert.pem").read_bytes())

    material = load_ca_dir(tls, NOW)
    istio = load_ca_dir(ca_dir, NOW)

    assert material.layout == "tls"
    assert material.signer.cert == istio.signer.cert
    assert material.signer.key.public_key() == istio.signer.key.public_key()
    assert material.intermediates == istio.intermediates
    assert material.roots == istio.roots


def _remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _write(name: str, data: Callable[[Path], bytes]) -> Callable[[Path], None]:
    def breaker(directory: Path) -> None:
        (directory / name).write_bytes(data(directory))

    return breaker


def _foreign_leaf_as_ca(directory: Path) -> None:
    """A signing "CA" that is really a leaf, with its own (matching) key."""
    leaf = badcerts.svid_leaf(ca_of(KeyType.EC_P256).signer, WEB)
    (directory / "ca-cert.pem").write_bytes(badcerts.cert_pem(leaf.cert))
    (directory / "ca-key.pem").write_bytes(leaf.key_pem)


def _tls_layout_without_key(directory: Path) -> None:
    (directory / "ca-cert.pem").rename(directory / "tls.crt")
    (directory / "root-cert.pem").rename(directory / "ca.crt")
    (directory / "ca-key.pem").unlink()
    (directory / "cert-chain.pem").unlink()


BROKEN_DIRS: list[tuple[str, Callable[[Path], None], str]] = [
    *(
        (f"missing-{name}", _remove(name), rf"is incomplete: .* but is missing {re.escape(name)}$")
        for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
    ),
    ("tls-missing-tls.key", _tls_layout_without_key, r"is missing tls\.key$"),
    (
        "key-does-not-match-cert",
        _write("ca-key.pem", lambda d: private_key_pem(generate_key())),
        r"ca-key\.pem does not match the certificate in .*ca-cert\.pem",
    ),
    (
        "root-from-another-ca",
        _write("root-cert.pem", lambda d: badcerts.cert_pem(badcerts.make_ca(TD).root)),
        r"the chain of .*ca-cert\.pem does not lead to a root in .*root-cert\.pem",
    ),
    (
        "ca-cert-is-not-a-ca",
        _foreign_leaf_as_ca,
        r"ca-cert\.pem: certificate is not a CA \(BasicConstraints CA=false\)",
    ),
    (
        "root-is-not-self-signed",
        _write("root-cert.pem", lambda d: (d / "ca-cert.pem").read_bytes()),
        r"root-cert\.pem holds a certificate that is not a self-signed root",
    ),
    (
        "garbage-ca-cert",
        _write("ca-cert.pem", lambda d: b"this is not a certificate\n"),
        r"ca-cert\.pem: no PEM certificate found",
    ),
    (
        "garbled-ca-cert",
        _write("ca-cert.pem", lambda d: badcerts.garbled_pem((d / "ca-cert.pem").read_bytes())),
        r"ca-cert\.pem: malformed PEM certificate",
    ),
    (
        "truncated-root",
        _write(
            "root-cert.pem", lambda d: badcerts.truncated_pem((d / "root-cert.pem").read_bytes())
        ),
        r"root-cert\.pem: malformed PEM certificate",
    ),
    (
        "garbage-key",
        _write("ca-key.pem", lambda d: b"-----BEGIN PRIVATE KEY-----\nnope\n"),
        r"ca-key\.pem: not an unencrypted PEM private key",
    ),
]


@pytest.mark.parametrize(
    ("breaker", "message"),
    [pytest.param(breaker, message, id=name) for name, breaker, message in BROKEN_DIRS],
)
def test_load_ca_dir_refuses_broken_directories(
    ca_dir: Path, breaker: Callable[[Path], None], message: str
) -> None:
    breaker(ca_dir)
    with pytest.raises(CADirectoryError, match=message) as info:
        load_ca_dir(ca_dir, NOW)
    assert "PRIVATE KEY" not in str(info.value)


def test_load_ca_dir_refuses_an_expired_signing_ca(tmp_path: Path) -> None:
    """The intermediate lives a year, the root ten: a year and a day later only the
    intermediate has expired, and the message names its file."""
    directory = tmp_path / "ca"
    init_ca_dir(directory, TD, NOW - dt.timedelta(days=366))
    with pytest.raises(CADirectoryError, match=r"ca-cert\.pem: certificate expired at 2029-"):
        load_ca_dir(directory, NOW)


def test_load_ca_dir_refuses_a_ca_not_valid_yet(ca_dir: Path) -> None:
    with pytest.raises(CADirectoryError, match=r"ca-cert\.pem: certificate is not valid yet"):
        load_ca_dir(ca_dir, NOW - DAY)


def test_load_ca_dir_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CADirectoryError, match=r"does not exist .*meshtrust ca init"):
        load_ca_dir(tmp_path / "nowhere", NOW)


def test_load_ca_dir_refuses_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CADirectoryError, match=r"no CA found in .*expected ca-cert\.pem"):
        load_ca_dir(tmp_path, NOW)


def test_serials_print_as_32_hex_digits_as_envoy_does() -> None:
    """One text form of a serial everywhere (status, ledger, logs, proxy-config, check)."""
    from meshtrust.pki import format_serial, random_serial

    for _ in range(200):
        serial = random_serial()
        text = format_serial(serial)
        assert len(text) == 32 and text == text.lower() and int(text, 16) == serial
    # A short serial is padded (the CA's old 31-digit form), a long one printed in whole bytes.
    assert format_serial(0xABC) == "0" * 29 + "abc"
    assert format_serial(1 << 152) == "01" + "00" * 19
