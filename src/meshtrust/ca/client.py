"""A client of the CA's ``IstioCertificateService`` (grpcio, the same C core as Istio's
agent in Go uses on the wire). Used by ``meshtrust cert request`` and by the agent.
"""

from __future__ import annotations

import grpc
import grpc.aio

from meshtrust._proto.istio import ca_pb2, ca_pb2_grpc
from meshtrust.ca.statuses import error_for_status
from meshtrust.errors import (
    MeshTrustError,
)

__all__ = ["CaClient"]


class CaClient:
    """Requests certificates from a CA over gRPC + TLS.

    ``root_pem`` verifies the CA's serving certificate. ``client_cert`` (chain PEM, key PEM)
    authenticates with a current certificate instead of (or besides) a token.
    """

    def __init__(
        self,
        address: str,
        root_pem: bytes,
        *,
        client_cert: tuple[bytes, bytes] | None = None,
        server_name: str | None = None,
    ) -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=root_pem,
            private_key=client_cert[1] if client_cert else None,
            certificate_chain=client_cert[0] if client_cert else None,
        )
        options: list[tuple[str, str | int]] = [("grpc.use_local_subchannel_pool", 1)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = grpc.aio.secure_channel(address, creds, options=options)
        self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self.address = address

    async def create_certificate(
        self,
        csr_pem: str,
        *,
        token: str | None,
        ttl_seconds: int = 0,
        timeout: float = 10.0,
    ) -> list[str]:
        """Send a CSR; returns ``[leaf, intermediates..., root bundle]`` PEM strings.

        Maps refusals to :class:`AuthenticationError`, :class:`PermissionDenied`,
        :class:`InvalidCSR`, and everything else to :class:`CAUnavailable`.
        """
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            resp = await self._stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds),
                metadata=metadata,
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise _map_error(exc, self.address) from None
        return list(resp.cert_chain)

    async def close(self) -> None:
        await self._channel.close()


def _map_error(exc: grpc.aio.AioRpcError, address: str) -> MeshTrustError:
    return error_for_status(exc.code().name, exc.details() or "", address)
