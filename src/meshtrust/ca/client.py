"""A client of the CA's ``IstioCertificateService`` on grpcio (the C core, as Istio's Go
agent is on the wire), for ``meshtrust cert request``. The agent has its own on grpclib
(:mod:`meshtrust.agent.issuance`); both map refusals with :mod:`meshtrust.ca.statuses`.
"""

from __future__ import annotations

import grpc
import grpc.aio

from meshtrust._proto.istio import ca_pb2, ca_pb2_grpc
from meshtrust.ca.statuses import error_for_status

__all__ = ["CaClient"]


class CaClient:
    """Requests certificates from a CA over gRPC + TLS.

    ``root_pem`` verifies the CA's serving certificate; the caller authenticates with a
    bearer token.
    """

    def __init__(self, address: str, root_pem: bytes) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_pem)
        self._channel = grpc.aio.secure_channel(
            address, creds, options=[("grpc.use_local_subchannel_pool", 1)]
        )
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
            raise error_for_status(exc.code().name, exc.details() or "", self.address) from None
        return list(resp.cert_chain)

    async def close(self) -> None:
        await self._channel.close()
