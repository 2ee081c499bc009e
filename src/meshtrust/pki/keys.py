"""Private keys: the key types meshtrust issues for, generation and PEM handling."""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshtrust.errors import ConfigError, InvalidCertificate

__all__ = [
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "describe_public_key",
    "generate_key",
    "load_private_key_pem",
    "private_key_pem",
    "signature_hash",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyType(enum.StrEnum):
    """Key algorithms meshtrust generates. ECDSA P-256 is the default, as in Istio."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        """Parse a key type name (``ec-p256``, ``rsa-2048``, also ``ecdsa``/``rsa``)."""
        aliases = {
            "ec": cls.EC_P256,
            "ecdsa": cls.EC_P256,
            "p256": cls.EC_P256,
            "p384": cls.EC_P384,
            "rsa": cls.RSA_2048,
        }
        norm = text.strip().lower()
        if norm in aliases:
            return aliases[norm]
        try:
            return cls(norm)
        except ValueError:
            choices = ", ".join(k.value for k in cls)
            raise ConfigError(f"unknown key type {text!r}; choose one of {choices}") from None


def generate_key(key_type: KeyType = KeyType.EC_P256) -> PrivateKey:
    """Generate a fresh private key of ``key_type``."""
    match key_type:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_2048 | KeyType.RSA_3072 | KeyType.RSA_4096:
            return rsa.generate_private_key(65537, int(key_type.value.split("-")[1]))


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The hash to sign with for ``key``: SHA-384 for P-384, SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def describe_public_key(key: object) -> str:
    """A short name for a public key, for the ledger and logs: ``ec-p256``, ``rsa-2048``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ec-p{key.curve.key_size}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of ``key``."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes, *, source: str = "key") -> PrivateKey:
    """Load an unencrypted ECDSA or RSA private key from PEM.

    Raises :class:`InvalidCertificate` naming ``source`` (never the key material).
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidCertificate(f"{source}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidCertificate(f"{source}: only ECDSA and RSA keys are supported")
    return key
