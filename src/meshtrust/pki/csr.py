"""Certificate signing requests: building them (agent side) and checking them (CA side)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshtrust.errors import InvalidCSR
from meshtrust.pki.keys import PrivateKey, PublicKey, describe_public_key, signature_hash
from meshtrust.spiffe import SpiffeId

__all__ = ["MAX_CSR_BYTES", "CsrRequest", "build_csr", "parse_csr"]

MAX_CSR_BYTES = 16 * 1024
_BEGIN = "-----BEGIN CERTIFICATE REQUEST-----"
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)


@dataclass(frozen=True, slots=True)
class CsrRequest:
    """What a CSR asks for, after its structure and self-signature were checked.

    ``uri_sans`` and ``other_sans`` are what the requester *asks* for; the CA decides what it
    gets from the authenticated caller and refuses requests for anything else.
    """

    public_key: PublicKey
    key_type: str
    uri_sans: tuple[str, ...]
    other_sans: tuple[str, ...]
    requests_ca: bool


def build_csr(key: PrivateKey, spiffe_id: SpiffeId) -> str:
    """A PEM CSR with an empty subject and the SPIFFE ID as its only (URI) SAN."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
        .sign(key, signature_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def parse_csr(pem: str) -> CsrRequest:
    """Parse and check a PEM CSR.

    Raises :class:`InvalidCSR` for anything that is not a single well-formed, validly
    self-signed PKCS#10 request with an acceptable key (ECDSA P-256/P-384, RSA >= 2048).
    """
    if len(pem) > MAX_CSR_BYTES:
        raise InvalidCSR(f"CSR is {len(pem)} bytes; the limit is {MAX_CSR_BYTES}")
    text = pem.strip()
    if not text:
        raise InvalidCSR("CSR is empty")
    if not text.startswith(_BEGIN) or text.count(_BEGIN) != 1:
        raise InvalidCSR("CSR must be exactly one PEM 'CERTIFICATE REQUEST' block")
    try:
        csr = x509.load_pem_x509_csr(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidCSR("CSR is not a valid PEM-encoded PKCS#10 request") from exc
    try:
        signed = csr.is_signature_valid
    except Exception as exc:  # unsupported signature algorithms raise various errors
        raise InvalidCSR("CSR signature algorithm is not supported") from exc
    if not signed:
        raise InvalidCSR("CSR signature does not verify with its own public key")
    try:
        public_key = csr.public_key()
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise InvalidCSR("CSR public key cannot be read") from exc
    _check_key(public_key)
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)

    uris: list[str] = []
    others: list[str] = []
    requests_ca = False
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise InvalidCSR(f"CSR extensions cannot be parsed ({exc})") from exc
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            for name in value:
                if isinstance(name, x509.UniformResourceIdentifier):
                    uris.append(name.value)
                else:
                    others.append(f"{type(name).__name__}:{name.value}")
        elif isinstance(value, x509.BasicConstraints):
            requests_ca = requests_ca or value.ca
        elif isinstance(value, x509.KeyUsage):
            requests_ca = requests_ca or value.key_cert_sign or value.crl_sign
    return CsrRequest(
        public_key=public_key,
        key_type=describe_public_key(public_key),
        uri_sans=tuple(uris),
        other_sans=tuple(others),
        requests_ca=requests_ca,
    )


def _check_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise InvalidCSR(f"CSR key curve {key.curve.name} is not allowed; use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InvalidCSR(f"CSR RSA key is {key.key_size} bits; at least 2048 are required")
    else:
        raise InvalidCSR("CSR key type is not allowed; use ECDSA (P-256, P-384) or RSA")
