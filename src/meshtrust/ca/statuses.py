"""What a CA client raises for a refused ``CreateCertificate``: the one mapping from gRPC
status names to our errors, shared by the grpcio client (``meshtrust cert request``) and the
agent's grpclib client. No gRPC library is imported here."""

from __future__ import annotations

from meshtrust.errors import (
    AuthenticationError,
    CAUnavailable,
    InvalidCSR,
    MeshTrustError,
    PermissionDenied,
)

__all__ = ["error_for_status"]


def error_for_status(code: str, detail: str, address: str) -> MeshTrustError:
    """The error for a failed CA call whose gRPC status is named ``code`` (``"UNAVAILABLE"``)."""
    if code == "UNAUTHENTICATED":
        return AuthenticationError(f"CA refused authentication: {detail}")
    if code == "PERMISSION_DENIED":
        return PermissionDenied(f"CA denied the request: {detail}")
    if code == "INVALID_ARGUMENT":
        return InvalidCSR(f"CA rejected the request: {detail}")
    return CAUnavailable(f"CA at {address} unavailable ({code}): {detail}")
