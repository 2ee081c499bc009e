"""Getting a certificate from the CA, and refusing to use a bad one.

:class:`GrpcCertificateSource` asks the CA over gRPC + TLS with grpclib on Python's ``ssl``
(not grpcio: its C core would cost the long-lived agent some ten megabytes for one request an
hour; ``meshtrust cert request`` still uses :class:`meshtrust.ca.client.CaClient`). Its
failures map to the same errors as :class:`~meshtrust.ca.client.CaClient`'s.

:func:`verify_issued` is the pure check every CA response passes before anything is served:
the chain leads to a root the agent trusts (its configured anchors — not whatever the CA
sent), the leaf is an X.509-SVID for exactly the expected identity, it is valid now, and it
certifies the key this agent generated.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.encoding.proto import ProtoCodec

from meshtrust._proto.istio import ca_grpc, ca_pb2
from meshtrust.ca.statuses import error_for_status
from meshtrust.config import parse_host_port
from meshtrust.errors import (
    ConfigError,
    InvalidCertificate,
    SvidVerificationError,
)
from meshtrust.fileio import load_cert_chain_pem
from meshtrust.pki import PrivateKey, TrustBundle, load_certs_pem, verify_svid
from meshtrust.spiffe import SpiffeId

__all__ = [
    "CertificateSource",
    "GrpcCertificateSource",
    "IssuedChain",
    "TokenFile",
    "client_ssl_context",
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


class GrpcCertificateSource:
    """The meshtrust (or Istio) CA over gRPC + TLS, verified with ``root_pem``.

    A connection per request: renewals are minutes to hours apart, and the client certificate
    (the workload's current one) changes between them. ``server_name`` is the name the CA's
    certificate must carry when it is not the host of ``address`` (grpcio's
    ``ssl_target_name_override``). Every failure is a :class:`MeshTrustError`: refusals as
    :func:`~meshtrust.ca.statuses.error_for_status` maps them, anything else (connection,
    TLS, timeout) as :class:`CAUnavailable`.
    """

    def __init__(
        self,
        address: str,
        root_pem: bytes,
        *,
        server_name: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        # HOST:PORT, as AgentConfig checks it (grpcio's "dns:///" prefix is accepted too).
        self._host, self._port = parse_host_port(address.removeprefix("dns:///"), what="ca-address")
        self._root_pem = root_pem
        self._server_name = server_name
        self._timeout = timeout

    async def sign(
        self,
        csr_pem: str,
        *,
        ttl_seconds: int,
        token: str | None,
        client_cert: tuple[bytes, bytes] | None,
    ) -> list[str]:
        try:
            context = client_ssl_context(self._root_pem, client_cert)
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidCertificate(
                f"cannot use the CA root or client certificate: {exc}"
            ) from exc
        config = Configuration(ssl_target_name_override=self._server_name)
        # An explicit codec: no status-details codec, whose google.rpc import we do not need.
        channel = Channel(self._host, self._port, ssl=context, config=config, codec=ProtoCodec())
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            async with asyncio.timeout(self._timeout):
                response = await ca_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                    ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds),
                    metadata=metadata,
                    timeout=self._timeout,
                )
        except GRPCError as exc:
            raise error_for_status(exc.status.name, exc.message or "", self.address) from None
        except TimeoutError:
            raise error_for_status(
                "DEADLINE_EXCEEDED", f"no answer within {self._timeout:g}s", self.address
            ) from None
        except Exception as exc:  # connection refused, TLS, HTTP/2: the CA is not usable
            raise error_for_status("UNAVAILABLE", _describe(exc), self.address) from None
        finally:
            channel.close()
        return list(response.cert_chain)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: {exc.verify_message or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def client_ssl_context(
    root_pem: bytes, client_cert: tuple[bytes, bytes] | None = None
) -> ssl.SSLContext:
    """TLS to the CA: its certificate must chain to ``root_pem`` (nothing else is trusted)
    and carry the name we connect to; ``client_cert`` (chain PEM, key PEM) is presented when
    given; HTTP/2 by ALPN.

    Raises :class:`ssl.SSLError` or :class:`ValueError` for unusable PEM.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=root_pem.decode("ascii"))
    if client_cert is not None:
        load_cert_chain_pem(context, *client_cert)
    context.set_alpn_protocols(["h2"])
    return context


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
