"""The SPIFFE bundle document (meshtrust.spiffe.bundle): emitted, and strictly parsed."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given
from hypothesis import strategies as st

from meshtrust.pki import KeyType, generate_key, make_root
from meshtrust.spiffe import SpiffeId, TrustDomain
from meshtrust.spiffe.bundle import (
    MAX_DOCUMENT_BYTES,
    InvalidBundle,
    SpiffeBundle,
    bundle_document,
    parse_bundle_document,
)
from tests.badcerts import NOW, make_ca, svid_leaf

WEST = TrustDomain.parse("west.test")
EAST = TrustDomain.parse("east.test")


def _root(td: str = "west.test", key_type: KeyType = KeyType.EC_P256) -> x509.Certificate:
    return make_root(generate_key(key_type), td, NOW, dt.timedelta(days=30))


def _doc(*certs: x509.Certificate, **extra: Any) -> dict[str, Any]:
    bundle = SpiffeBundle(WEST, certs, sequence=7, refresh_hint=dt.timedelta(seconds=5))
    doc: dict[str, Any] = json.loads(bundle_document(bundle))
    doc.update(extra)
    return doc


def _parse(doc: object) -> SpiffeBundle:
    return parse_bundle_document(json.dumps(doc).encode(), WEST, source="west.json")


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_round_trip_keeps_authorities_sequence_and_hint(key_type: KeyType) -> None:
    a, b = _root(key_type=key_type), _root(key_type=key_type)
    bundle = SpiffeBundle(WEST, (a, b), sequence=3, refresh_hint=dt.timedelta(seconds=300))
    text = bundle_document(bundle)
    doc = json.loads(text)
    assert doc["spiffe_sequence"] == 3 and doc["spiffe_refresh_hint"] == 300
    assert [k["use"] for k in doc["keys"]] == ["x509-svid", "x509-svid"]
    assert all("kid" not in k and len(k["x5c"]) == 1 for k in doc["keys"])
    der = a.public_bytes(serialization.Encoding.DER)
    assert base64.b64decode(doc["keys"][0]["x5c"][0]) == der  # standard base64, RFC 7517 4.7
    back = parse_bundle_document(text, WEST)
    assert back.x509_authorities == (a, b)
    assert (back.sequence, back.refresh_hint) == (3, dt.timedelta(seconds=300))
    assert back.same_authorities(SpiffeBundle(WEST, (b, a)))


def test_optional_members_and_empty_keys() -> None:
    bundle = parse_bundle_document(b'{"keys": []}', WEST)
    assert bundle.x509_authorities == () and bundle.sequence is None and bundle.refresh_hint is None


def test_unknown_use_is_ignored_and_jwt_keys_need_a_kid() -> None:
    root = _root()
    doc = _doc(root)
    doc["keys"].append({"kty": "EC", "use": "something-new", "x5c": ["garbage"]})
    doc["keys"].append({"kty": "EC", "use": "jwt-svid", "kid": "k1", "crv": "P-256"})
    bundle = _parse(doc)
    assert bundle.x509_authorities == (root,)
    assert [k["kid"] for k in bundle.jwt_authorities] == ["k1"]
    doc["keys"].append({"kty": "EC", "use": "jwt-svid"})
    with pytest.raises(InvalidBundle, match=r"keys\[3\]: a jwt-svid key needs a 'kid'"):
        _parse(doc)


def _key(doc: dict[str, Any]) -> dict[str, Any]:
    key: dict[str, Any] = doc["keys"][0]
    return key


def test_kid_on_an_x509_svid_key_is_refused() -> None:
    doc = _doc(_root())
    _key(doc)["kid"] = "abc"
    with pytest.raises(
        InvalidBundle, match=r"west.json \(trust domain west.test\): keys\[0\]: .*'kid'"
    ):
        _parse(doc)


def test_two_certificates_in_x5c_are_refused() -> None:
    doc = _doc(_root())
    other = _doc(_root())
    _key(doc)["x5c"].append(_key(other)["x5c"][0])
    with pytest.raises(InvalidBundle, match="exactly one certificate in 'x5c', not 2"):
        _parse(doc)
    _key(doc)["x5c"] = []
    with pytest.raises(InvalidBundle, match="not 0"):
        _parse(doc)


def test_a_non_ca_certificate_is_refused() -> None:
    ca = make_ca("west.test")
    leaf = svid_leaf(ca.signer, SpiffeId.parse("spiffe://west.test/ns/default/sa/api"))
    doc = _doc(ca.root)
    good = _key(doc)
    leaf_doc = json.loads(bundle_document(SpiffeBundle(WEST, (leaf.cert,))))
    doc["keys"] = [good, leaf_doc["keys"][0]]
    with pytest.raises(InvalidBundle, match=r"keys\[1\]\.x5c\[0\]: not a CA certificate"):
        _parse(doc)


def test_a_certificate_of_another_trust_domain_is_refused() -> None:
    with pytest.raises(InvalidBundle, match="belongs to trust domain 'east.test', not 'west.test'"):
        _parse(_doc(_root("east.test")))


def test_a_spiffe_uri_san_of_another_trust_domain_is_refused() -> None:
    key = generate_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "SPIFFE")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://east.test")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(InvalidBundle, match="trust domain 'east.test'"):
        _parse(_doc(cert))
    assert parse_bundle_document(
        bundle_document(SpiffeBundle(EAST, (cert,))), EAST
    ).x509_authorities


def test_a_jwk_whose_key_is_not_its_certificates_is_refused() -> None:
    doc = _doc(_root())
    _key(doc)["x"] = _key(_doc(_root()))["x"]
    with pytest.raises(InvalidBundle, match="'x' does not match the key of its certificate"):
        _parse(doc)


def test_ten_megabytes_are_refused_unread() -> None:
    huge = b'{"keys": [], "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    with pytest.raises(InvalidBundle, match="larger than 1024 KiB"):
        parse_bundle_document(huge, WEST)
    assert len(huge) > MAX_DOCUMENT_BYTES


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "must be a JSON object"),
        (b'{"keys": {}}', "'keys' must be a list"),
        (b'{"keys": [], "keys": []}', "'keys' appears twice"),
        (b'{"keys": [], "spiffe_sequence": -1}', "spiffe_sequence must be a non-negative"),
        (b'{"keys": [], "spiffe_sequence": true}', "spiffe_sequence must be a non-negative"),
        (b'{"keys": [], "spiffe_refresh_hint": 1.5}', "spiffe_refresh_hint must be"),
        (b'{"keys": [], "spiffe_refresh_hint": NaN}', "NaN is not JSON"),
        (b'{"keys": [1]}', r"keys\[0\]: a JWK must be an object"),
        (b'{"keys": [{"kty": "EC"}]}', r"keys\[0\]: 'use' must be set"),
        (b'{"keys": [{"use": "x509-svid"}]}', r"keys\[0\]: 'kty' must be set"),
        (b'{"keys": [{"kty": "EC", "use": "x509-svid", "x5c": ["!!"]}]}', "not a base64 DER"),
        (b'{"keys": [{"kty": "EC", "use": "x509-svid", "x5c": ["AAAA"]}]}', "not a base64 DER"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ],
)
def test_malformed_documents_name_the_problem(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidBundle, match=reason):
        parse_bundle_document(data, WEST, source="west.json")


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_escape_as_another_error(data: bytes) -> None:
    try:
        parse_bundle_document(data, WEST)
    except InvalidBundle:
        pass
