"""Getting a certificate from the CA, and refusing to use a bad one.

:class:`CertificateSource` is what the agent needs of the CA; the CA's one client,
:class:`meshtrust.caapi.CaClient` (grpclib on Python's ``ssl``; ``meshtrust cert request``
uses it too), is the real one.

:func:`verify_issued` is the pure check every CA response passes before anything is served:
the chain leads to a root the agent trusts (its configured anchors — not whatever the CA
sent), the leaf is an X.509-SVID for exactly the expected identity, it is valid now, and it
certifies the key this agent generated.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.errors import (
    ConfigError,
    InvalidCertificate,
    SvidVerificationError,
)
from meshtrust.pki import PrivateKey, TrustBundle, load_certs_pem, verify_svid
from meshtrust.spiffe import SpiffeId

__all__ = [
    "CertificateSource",
    "IssuedChain",
    "TokenFile",
    "verify_issued",
]


class CertificateSource(Protocol):
    """Where certificates come from (the CA, over gRPC; a test double in unit tests)."""

    async def sign(
        self,
        csr_pem: str,
        *,
        ttl_seconds: int,
        token: str | None,
        client_cert: tuple[bytes, bytes] | None,
    ) -> list[str]: ...


class TokenFile:
    """A bearer token re-read from its file for every request (projected tokens rotate)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def read(self) -> str | None:
        """The token, or None when there is no file configured. Raises ConfigError if the
        configured file cannot be read or is empty (the message never includes the token)."""
        if self.path is None:
            return None
        try:
            token = self.path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"token file {self.path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"token file {self.path} is not text") from exc
        if not token:
            raise ConfigError(f"token file {self.path} is empty")
        return token


@dataclass(frozen=True, slots=True)
class IssuedChain:
    chain: tuple[x509.Certificate, ...]  # leaf first, then intermediates; no root
    roots: tuple[x509.Certificate, ...]  # the root bundle to serve


def verify_issued(
    chain_pems: Sequence[str],
    key: PrivateKey,
    expected: SpiffeId,
    anchors: TrustBundle,
    now: dt.datetime,
) -> IssuedChain:
    """Check a CA response ``[leaf, intermediates..., root bundle]`` before using it.

    Raises :class:`SvidVerificationError` (untrusted chain, wrong identity, not valid now,
    not our key) or :class:`InvalidCertificate` (unparsable PEM, missing parts).
    """
    if len(chain_pems) < 2:
        raise InvalidCertificate(
            f"CA response has {len(chain_pems)} element(s); expected a leaf and a root bundle"
        )
    certs = [
        load_certs_pem(p.encode(), source=f"CA response element {i}")
        for i, p in enumerate(chain_pems)
    ]
    if len(certs[0]) != 1:
        raise InvalidCertificate("CA response's first element must be exactly one leaf")
    leaf = certs[0][0]
    intermediates = [c for group in certs[1:-1] for c in group]
    bundle = certs[-1]
    if leaf.public_key() != key.public_key():
        raise SvidVerificationError("CA returned a certificate for a different key")
    verified = verify_svid([leaf, *intermediates], anchors, now)
    if verified.spiffe_id != expected:
        raise SvidVerificationError(
            f"CA returned a certificate for {verified.spiffe_id}, expected {expected}"
        )
    anchor = verified.chain[-1]
    der = serialization.Encoding.DER
    if anchor.public_bytes(der) not in {r.public_bytes(der) for r in bundle}:
        raise SvidVerificationError(
            "CA's root bundle does not contain the trusted root the chain leads to"
        )
    return IssuedChain(chain=(leaf, *intermediates), roots=tuple(bundle))
