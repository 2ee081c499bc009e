"""Reading certificates from PEM with errors that say which file and what is wrong."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.errors import InvalidCertificate

__all__ = ["certs_pem", "load_certs_pem"]

_BEGIN = b"-----BEGIN CERTIFICATE-----"


def load_certs_pem(data: bytes, *, source: str = "certificate") -> list[x509.Certificate]:
    """Parse one or more PEM certificates; refuse empty input, garbage and truncation."""
    if _BEGIN not in data:
        raise InvalidCertificate(f"{source}: no PEM certificate found")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidCertificate(f"{source}: malformed PEM certificate ({exc})") from exc
    if data.count(_BEGIN) != len(certs):
        raise InvalidCertificate(f"{source}: a PEM block could not be parsed (truncated?)")
    return certs


def certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    """Concatenated PEM of ``certs``."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
