"""Deliberately bad (and a few good) X.509 fixtures, generated at test time.

Nothing here is committed key material: every key is generated when a function is called.
The builders use ``cryptography`` directly rather than :mod:`meshtrust.pki`, so a fixture does
not inherit a bug of the code it is meant to test. Each bad fixture differs from a correct
X.509-SVID (or a correct CSR) in exactly one way, named by the function.

Typical use::

    ca = make_ca("example.org")
    leaf = leaf_with_ca_true(ca.signer, "spiffe://example.org/ns/default/sa/web")
    verify_svid(leaf.chain, ca.bundle, NOW)          # -> SvidVerificationError

Leaves are issued by a :class:`~meshtrust.pki.Signer`, so they can come from a test CA made
here or from a real CA directory (``load_ca_dir(...).signer``). Times default to :data:`NOW`;
pass ``now=`` to line them up with a clock.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshtrust.pki import KeyType, PrivateKey, Signer, TrustBundle
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "ARTICLE_CA_SUBJECT",
    "NOW",
    "CaFixture",
    "Leaf",
    "cert_pem",
    "csr_for",
    "csr_with_bad_signature",
    "csr_with_ca_true",
    "csr_with_dns_san",
    "csr_with_ed25519_key",
    "csr_with_key_cert_sign",
    "csr_with_p521_key",
    "csr_with_rsa_1024_key",
    "csr_with_two_uri_sans",
    "csr_without_san",
    "expired_leaf",
    "garbled_pem",
    "intermediate_without_key_usage",
    "leaf_from_another_root",
    "leaf_in_another_trust_domain",
    "leaf_with_ca_true",
    "leaf_with_dns_san_only",
    "leaf_with_key_cert_sign",
    "leaf_with_non_spiffe_uri",
    "leaf_with_two_uri_sans",
    "leaf_without_key_usage",
    "leaf_without_san",
    "make_ca",
    "new_key",
    "non_pem_csr",
    "not_yet_valid_leaf",
    "oversized_csr",
    "root_without_key_usage",
    "svid_leaf",
    "truncated_csr",
    "truncated_pem",
]

#: The default "current time" of every fixture (FakeClock's default start).
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
#: Default leaf lifetime.
HOUR = dt.timedelta(hours=1)
_SKEW = dt.timedelta(minutes=2)

Identity = SpiffeId | str


# --- keys and CAs ---------------------------------------------------------------------------


def new_key(key_type: KeyType = KeyType.EC_P256) -> PrivateKey:
    """A fresh private key of ``key_type`` (RSA sizes are slow: generate them sparingly)."""
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(65537, int(key_type.value.split("-")[1]))


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


class CaFixture(NamedTuple):
    """A test CA: a self-signed root and an intermediate that signs leaves.

    Unpacks as ``(root, root_key, signer)``.
    """

    root: x509.Certificate
    root_key: PrivateKey
    signer: Signer

    @property
    def trust_domain(self) -> TrustDomain:
        """The trust domain recorded in the root's O."""
        (attr,) = self.root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return TrustDomain(str(attr.value))

    @property
    def bundle(self) -> TrustBundle:
        """A trust bundle holding just this CA's root."""
        return TrustBundle(self.trust_domain, (self.root,))

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """The certificates between a leaf and the root: the signing intermediate."""
        return (self.signer.cert,)


def _ca_cert(
    subject: x509.Name,
    key: PrivateKey,
    issuer: Signer | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    key_usage: bool = True,
) -> x509.Certificate:
    signing_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if key_usage:
        builder = builder.add_extension(_key_usage(key_cert_sign=True), critical=True)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    return builder.sign(signing_key, _hash_for(signing_key))


def make_ca(
    trust_domain: TrustDomain | str,
    *,
    now: dt.datetime = NOW,
    key_type: KeyType = KeyType.EC_P256,
    lifetime: dt.timedelta = dt.timedelta(days=365),
    intermediate_lifetime: dt.timedelta | None = None,
) -> CaFixture:
    """A root (O = trust domain) and an intermediate signing CA, valid from ``now - 2 min``.

    ``intermediate_lifetime`` defaults to ``lifetime``; make it short to test clamping.
    """
    td = str(trust_domain)
    root_key, inter_key = new_key(key_type), new_key(key_type)
    root_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, td),
            x509.NameAttribute(NameOID.COMMON_NAME, f"test root ({td})"),
        ]
    )
    root = _ca_cert(root_name, root_key, None, now - _SKEW, now + lifetime)
    inter_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, td),
            x509.NameAttribute(NameOID.COMMON_NAME, f"test intermediate ({td})"),
        ]
    )
    inter_after = now + (intermediate_lifetime or lifetime)
    inter = _ca_cert(inter_name, inter_key, Signer(root, root_key), now - _SKEW, inter_after)
    return CaFixture(root, root_key, Signer(inter, inter_key))


def _ca_name(trust_domain: str, cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


#: The subject of the article's custom CA (``-subj "/CN=My-Cluster-CA/O=My-Organization"``).
ARTICLE_CA_SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, "My-Cluster-CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "My-Organization"),
    ]
)


def root_without_key_usage(*, now: dt.datetime = NOW) -> CaFixture:
    """A self-signed root without KeyUsage that signs leaves itself: the article's custom CA
    (``openssl req -x509`` adds no KeyUsage; Istio's ``cacerts`` plugs it in as signing CA),
    with its subject. Its O names no trust domain, so build bundles with
    ``TrustBundle(td, (ca.root,))``, not ``ca.bundle``; its signer is the root itself."""
    key = new_key()
    after = now + dt.timedelta(days=3650)
    root = _ca_cert(ARTICLE_CA_SUBJECT, key, None, now - _SKEW, after, key_usage=False)
    return CaFixture(root, key, Signer(root, key))


def intermediate_without_key_usage(
    trust_domain: TrustDomain | str, *, now: dt.datetime = NOW
) -> CaFixture:
    """A root with KeyUsage whose signing intermediate has none (openssl's ``v3_ca``
    section leaves keyUsage commented out)."""
    td = str(trust_domain)
    root_key, inter_key = new_key(), new_key()
    after = now + dt.timedelta(days=365)
    root = _ca_cert(_ca_name(td, f"test root ({td})"), root_key, None, now - _SKEW, after)
    inter = _ca_cert(
        _ca_name(td, f"test intermediate without KeyUsage ({td})"),
        inter_key,
        Signer(root, root_key),
        now - _SKEW,
        after,
        key_usage=False,
    )
    return CaFixture(root, root_key, Signer(inter, inter_key))


# --- leaves -----------------------------------------------------------------------------------


class Leaf(NamedTuple):
    """A leaf certificate, its private key and the issuer certificates up to the root."""

    cert: x509.Certificate
    key: PrivateKey
    intermediates: tuple[x509.Certificate, ...]

    @property
    def chain(self) -> list[x509.Certificate]:
        """Leaf first, then the intermediates (what a peer presents)."""
        return [self.cert, *self.intermediates]

    @property
    def der(self) -> bytes:
        """The leaf alone, DER (what a TLS layer hands to the CA)."""
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def chain_pem(self) -> bytes:
        """Leaf and intermediates, PEM."""
        return cert_pem(*self.chain)

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def cert_pem(*certs: x509.Certificate) -> bytes:
    """Concatenated PEM of ``certs``."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_usage(*, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not key_cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf(
    signer: Signer,
    names: Sequence[x509.GeneralName] | None,
    *,
    now: dt.datetime = NOW,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    ca: bool = False,
    key_usage: x509.KeyUsage | None = None,
    with_key_usage: bool = True,
) -> Leaf:
    """A correct X.509-SVID profile, except for what the arguments change.

    ``names`` None means no subjectAltName extension at all.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _SKEW)
        .not_valid_after(not_after or now + HOUR)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()), False
        )
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    if with_key_usage:
        builder = builder.add_extension(key_usage or _key_usage(), critical=True)
    cert = builder.sign(signer.key, _hash_for(signer.key))
    return Leaf(cert, key, (signer.cert,))


def _uri(identity: Identity) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(str(identity))


def svid_leaf(
    signer: Signer, spiffe_id: Identity, *, now: dt.datetime = NOW, ttl: dt.timedelta = HOUR
) -> Leaf:
    """A correct X.509-SVID for ``spiffe_id``, valid from ``now - 2 min`` to ``now + ttl``."""
    return _leaf(signer, [_uri(spiffe_id)], now=now, not_after=now + ttl)


def leaf_with_ca_true(signer: Signer, spiffe_id: Identity, *, now: dt.datetime = NOW) -> Leaf:
    """An SVID-shaped leaf whose BasicConstraints say CA=true."""
    return _leaf(signer, [_uri(spiffe_id)], now=now, ca=True)


def leaf_with_two_uri_sans(
    signer: Signer, first: Identity, second: Identity, *, now: dt.datetime = NOW
) -> Leaf:
    """A leaf with two URI SANs (an SVID has exactly one)."""
    return _leaf(signer, [_uri(first), _uri(second)], now=now)


def leaf_with_dns_san_only(
    signer: Signer, dns_name: str = "web.example.org", *, now: dt.datetime = NOW
) -> Leaf:
    """A leaf whose only SAN is a DNS name: no SPIFFE ID at all."""
    return _leaf(signer, [x509.DNSName(dns_name)], now=now)


def leaf_without_san(signer: Signer, *, now: dt.datetime = NOW) -> Leaf:
    """A leaf with no subjectAltName extension."""
    return _leaf(signer, None, now=now)


def leaf_with_non_spiffe_uri(
    signer: Signer, uri: str = "https://example.org/web", *, now: dt.datetime = NOW
) -> Leaf:
    """A leaf whose one URI SAN is not a SPIFFE ID."""
    return _leaf(signer, [x509.UniformResourceIdentifier(uri)], now=now)


def leaf_with_key_cert_sign(signer: Signer, spiffe_id: Identity, *, now: dt.datetime = NOW) -> Leaf:
    """A CA=false leaf whose KeyUsage includes keyCertSign and cRLSign."""
    return _leaf(signer, [_uri(spiffe_id)], now=now, key_usage=_key_usage(key_cert_sign=True))


def leaf_without_key_usage(signer: Signer, spiffe_id: Identity, *, now: dt.datetime = NOW) -> Leaf:
    """A leaf with no KeyUsage extension."""
    return _leaf(signer, [_uri(spiffe_id)], now=now, with_key_usage=False)


def expired_leaf(signer: Signer, spiffe_id: Identity, *, now: dt.datetime = NOW) -> Leaf:
    """A leaf that expired an hour before ``now`` (valid from ``now - 2 h``)."""
    return _leaf(signer, [_uri(spiffe_id)], not_before=now - 2 * HOUR, not_after=now - HOUR)


def not_yet_valid_leaf(signer: Signer, spiffe_id: Identity, *, now: dt.datetime = NOW) -> Leaf:
    """A leaf that becomes valid an hour after ``now``."""
    return _leaf(signer, [_uri(spiffe_id)], not_before=now + HOUR, not_after=now + 2 * HOUR)


def leaf_from_another_root(spiffe_id: Identity, *, now: dt.datetime = NOW) -> Leaf:
    """A correct SVID from a freshly made CA of the same trust domain (not in any bundle).

    Its ``intermediates`` are that other CA's, so the chain is complete but ends at a root
    nobody trusts.
    """
    sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    other = make_ca(sid.trust_domain, now=now)
    return svid_leaf(other.signer, sid, now=now)


def leaf_in_another_trust_domain(
    signer: Signer,
    spiffe_id: Identity = "spiffe://other.org/ns/default/sa/web",
    *,
    now: dt.datetime = NOW,
) -> Leaf:
    """A correct SVID from ``signer`` that names an identity in a foreign trust domain."""
    return svid_leaf(signer, spiffe_id, now=now)


# --- broken PEM -----------------------------------------------------------------------------


def garbled_pem(pem: bytes) -> bytes:
    """``pem`` with the start of its first base64 body overwritten, so the DER is invalid.

    The BEGIN/END lines stay intact: this is a corrupted file, not a missing one.
    """
    lines = pem.splitlines(keepends=True)
    body = lines[1]
    lines[1] = b"AAAAAAAA" + body[8:]
    return b"".join(lines)


def truncated_pem(pem: bytes) -> bytes:
    """The first half of ``pem`` (BEGIN line kept, END line lost), as after a partial write."""
    lines = pem.splitlines(keepends=True)
    return b"".join(lines[: max(2, len(lines) // 2)])


# --- CSRs -------------------------------------------------------------------------------------


def _csr(
    key: PrivateKey | ed25519.Ed25519PrivateKey,
    names: Sequence[x509.GeneralName] | None,
    *,
    basic_constraints: x509.BasicConstraints | None = None,
    key_usage: x509.KeyUsage | None = None,
) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    if basic_constraints is not None:
        builder = builder.add_extension(basic_constraints, critical=True)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        csr = builder.sign(key, None)
    else:
        csr = builder.sign(key, _hash_for(key))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def csr_for(spiffe_id: Identity, key: PrivateKey | None = None) -> str:
    """A well-formed CSR asking for ``spiffe_id`` (use it with another caller's credentials)."""
    return _csr(key or new_key(), [_uri(spiffe_id)])


def csr_without_san(key: PrivateKey | None = None) -> str:
    """A well-formed CSR with an empty subject and no SAN: it asks for no identity."""
    return _csr(key or new_key(), None)


def csr_with_two_uri_sans(first: Identity, second: Identity, key: PrivateKey | None = None) -> str:
    """A CSR asking for two URI SANs."""
    return _csr(key or new_key(), [_uri(first), _uri(second)])


def csr_with_dns_san(
    spiffe_id: Identity, dns_name: str = "web.example.org", key: PrivateKey | None = None
) -> str:
    """A CSR asking for the SPIFFE ID plus a DNS SAN."""
    return _csr(key or new_key(), [_uri(spiffe_id), x509.DNSName(dns_name)])


def csr_with_ca_true(spiffe_id: Identity, key: PrivateKey | None = None) -> str:
    """A CSR asking for BasicConstraints CA=true."""
    return _csr(
        key or new_key(),
        [_uri(spiffe_id)],
        basic_constraints=x509.BasicConstraints(ca=True, path_length=None),
    )


def csr_with_key_cert_sign(spiffe_id: Identity, key: PrivateKey | None = None) -> str:
    """A CSR asking for KeyUsage keyCertSign (and cRLSign), without CA=true."""
    return _csr(key or new_key(), [_uri(spiffe_id)], key_usage=_key_usage(key_cert_sign=True))


def csr_with_bad_signature(spiffe_id: Identity, key: PrivateKey | None = None) -> str:
    """A CSR whose self-signature does not verify: its last DER byte (inside the signature
    value, so the structure still parses) is flipped, and the result is PEM-encoded again."""
    pem = csr_for(spiffe_id, key)
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def csr_with_rsa_1024_key(spiffe_id: Identity) -> str:
    """A correctly self-signed CSR with a too-small RSA-1024 key."""
    return _csr(rsa.generate_private_key(65537, 1024), [_uri(spiffe_id)])


def csr_with_p521_key(spiffe_id: Identity) -> str:
    """A correctly self-signed CSR with an ECDSA P-521 key (not an allowed curve)."""
    return _csr(ec.generate_private_key(ec.SECP521R1()), [_uri(spiffe_id)])


def csr_with_ed25519_key(spiffe_id: Identity) -> str:
    """A correctly self-signed CSR with an Ed25519 key (not an allowed key type)."""
    return _csr(ed25519.Ed25519PrivateKey.generate(), [_uri(spiffe_id)])


def non_pem_csr() -> str:
    """Text that is not PEM at all (base64 of something, no BEGIN line)."""
    return base64.b64encode(b"this is not a certificate signing request").decode()


def truncated_csr(spiffe_id: Identity) -> str:
    """The first half of a real CSR's PEM: BEGIN line present, END line lost."""
    return truncated_pem(csr_for(spiffe_id).encode()).decode()


def oversized_csr(spiffe_id: Identity, min_chars: int = 16 * 1024 + 1) -> str:
    """A real, correctly self-signed CSR made longer than ``min_chars`` by many DNS SANs."""
    key = new_key()
    count = min_chars // 20 + 1
    while True:
        names: list[x509.GeneralName] = [_uri(spiffe_id)]
        names += [x509.DNSName(f"host-{i:05d}.example.org") for i in range(count)]
        pem = _csr(key, names)
        if len(pem) >= min_chars:
            return pem
        count *= 2
