"""Certificate profiles: what a root, an intermediate, a workload leaf and the CA's own
serving certificate look like. Pure functions: the time, keys and serials come in as arguments.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshtrust.pki.keys import PrivateKey, PublicKey, signature_hash
from meshtrust.spiffe import SpiffeId

__all__ = [
    "CLOCK_SKEW",
    "LeafIssuer",
    "Signer",
    "issue_leaf",
    "leaf_validity",
    "make_intermediate",
    "make_root",
    "make_serving_cert",
    "random_serial",
]

#: NotBefore is backdated by this much so peers with slightly slow clocks accept new certs.
CLOCK_SKEW = dt.timedelta(minutes=2)


@dataclass(frozen=True, slots=True)
class Signer:
    """A CA certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey


def random_serial() -> int:
    """A random 128-bit serial with its top bit set, in [2**127, 2**128).

    Istio draws serials below 2**128; fixing the top bit costs one bit of randomness and makes
    every serial exactly 16 bytes, so :func:`format_serial` (32 hex digits) and Envoy's admin
    ``/certs`` (whole bytes, no leading zero byte) print the same text. DER needs 17 bytes.
    """
    return (1 << 127) | secrets.randbits(127)


def format_serial(serial: int) -> str:
    """The one text form of a serial number: lower-case hex, at least 32 digits.

    Serials of 16 bytes or fewer (all of ours) are zero-padded to 32 digits; longer ones (a CA
    made by openssl has 20-byte serials) are printed in whole bytes, as Envoy prints them.
    """
    text = format(serial, "032x")
    return text if len(text) % 2 == 0 else "0" + text


def _ski(public_key: PublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(signer: Signer) -> x509.AuthorityKeyIdentifier:
    try:
        ski = signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key())


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def make_root(
    key: PrivateKey,
    trust_domain: str,
    now: dt.datetime,
    lifetime: dt.timedelta,
    common_name: str | None = None,
) -> x509.Certificate:
    """A self-signed root: O = trust domain, CA=true, keyCertSign+cRLSign."""
    cn = common_name or f"meshtrust root CA ({trust_domain})"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(key.public_key()), critical=False)
        .sign(key, signature_hash(key))
    )


def make_intermediate(
    key: PrivateKey,
    parent: Signer,
    trust_domain: str,
    now: dt.datetime,
    lifetime: dt.timedelta,
    *,
    locality: str | None = None,
) -> x509.Certificate:
    """An intermediate signing CA below ``parent``, never outliving it.

    ``locality`` (L=) tells apart the intermediates of several clusters under one root, as
    Istio's ``tools/certs`` names each cluster's intermediate.
    """
    not_after = min(now + lifetime, parent.cert.not_valid_after_utc)
    attributes = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"meshtrust intermediate CA ({trust_domain})"),
    ]
    if locality:
        attributes.insert(1, x509.NameAttribute(NameOID.LOCALITY_NAME, locality))
    name = x509.Name(attributes)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(parent.cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_ski(key.public_key()), critical=False)
        .add_extension(_aki(parent), critical=False)
        .sign(parent.key, signature_hash(parent.key))
    )


def leaf_validity(
    signer_not_after: dt.datetime, now: dt.datetime, ttl: dt.timedelta
) -> tuple[dt.datetime, dt.datetime]:
    """(NotBefore, NotAfter) of a leaf: backdated by :data:`CLOCK_SKEW`, never after the signer."""
    return now - CLOCK_SKEW, min(now + ttl, signer_not_after)


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_NOT_A_CA = x509.BasicConstraints(ca=False, path_length=None)


class LeafIssuer:
    """Issues X.509-SVIDs under one signer (DESIGN.md "Issued leaf").

    Empty subject, one critical URI SAN, KeyUsage digitalSignature+keyEncipherment,
    EKU serverAuth+clientAuth, critical BasicConstraints CA=false, AKI/SKI.

    What is the same for every leaf of the signer -- issuer name, the constant extensions,
    the AKI (which reads the signer's extensions), the signature hash -- is built once here;
    a CA issuing thousands of certificates a second then only adds what differs.
    """

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self._signer_not_after = signer.cert.not_valid_after_utc
        self._hash = signature_hash(signer.key)
        self._base = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(signer.cert.subject)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(_NOT_A_CA, critical=True)
            .add_extension(_aki(signer), critical=False)
        )

    def issue(
        self,
        public_key: PublicKey,
        spiffe_id: SpiffeId,
        now: dt.datetime,
        ttl: dt.timedelta,
        serial: int | None = None,
    ) -> x509.Certificate:
        """A leaf for ``spiffe_id`` valid from ``now`` - :data:`CLOCK_SKEW` for ``ttl``
        (never past the signer's NotAfter); a random serial unless ``serial`` is given."""
        not_before, not_after = leaf_validity(self._signer_not_after, now, ttl)
        return (
            self._base.public_key(public_key)
            .serial_number(serial if serial is not None else random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                critical=True,
            )
            .add_extension(_ski(public_key), critical=False)
            .sign(self.signer.key, self._hash)
        )


def issue_leaf(
    signer: Signer,
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    now: dt.datetime,
    ttl: dt.timedelta,
    serial: int | None = None,
) -> x509.Certificate:
    """An X.509-SVID for ``spiffe_id`` (see :class:`LeafIssuer`, which a CA issuing many
    keeps instead of calling this)."""
    return LeafIssuer(signer).issue(public_key, spiffe_id, now, ttl, serial)


def make_serving_cert(
    signer: Signer,
    key: PrivateKey,
    dns_names: Sequence[str],
    now: dt.datetime,
    ttl: dt.timedelta,
) -> x509.Certificate:
    """The CA's own TLS serving certificate: DNS SANs plus ``localhost`` and 127.0.0.1/::1.

    A name that is an IP address (the CA listening on a host's address, as across hosts)
    becomes an IP address SAN: TLS clients match an IP only against those."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    for name in dns_names:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if name != "localhost":
                names.append(x509.DNSName(name))
            continue
        if ip not in ips:
            ips.append(ip)
    names += [x509.IPAddress(ip) for ip in ips]
    not_before, not_after = leaf_validity(signer.cert.not_valid_after_utc, now, ttl)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshtrust-ca")]))
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            _LEAF_KEY_USAGE,  # the serving certificate is an end entity like a leaf
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_aki(signer), critical=False)
        .add_extension(_ski(key.public_key()), critical=False)
        .sign(signer.key, signature_hash(signer.key))
    )
