"""The one mapping between gRPC status codes and our errors, both ways.

The CA server answers each of our errors with :func:`status_name_for`; a CA client turns a
refused call back into our error with :func:`error_for_status`. Codes are grpc's names
(``"UNAUTHENTICATED"``), so no gRPC library is imported here.
"""

from __future__ import annotations

from meshtrust.errors import (
    AuthenticationError,
    CAUnavailable,
    InvalidCSR,
    InvalidInput,
    MeshTrustError,
    PermissionDenied,
)

__all__ = ["error_for_status", "status_name_for"]


def status_name_for(exc: MeshTrustError) -> str:
    """The gRPC status name the CA answers ``exc`` with (DESIGN.md "Error codes")."""
    if isinstance(exc, AuthenticationError):
        return "UNAUTHENTICATED"
    if isinstance(exc, PermissionDenied):
        return "PERMISSION_DENIED"
    if isinstance(exc, InvalidInput):
        return "INVALID_ARGUMENT"
    return "UNAVAILABLE"


def error_for_status(code: str, detail: str, address: str) -> MeshTrustError:
    """The error for a failed CA call whose gRPC status is named ``code`` (``"UNAVAILABLE"``)."""
    if code == "UNAUTHENTICATED":
        return AuthenticationError(f"CA refused authentication: {detail}")
    if code == "PERMISSION_DENIED":
        return PermissionDenied(f"CA denied the request: {detail}")
    if code == "INVALID_ARGUMENT":
        return InvalidCSR(f"CA rejected the request: {detail}")
    return CAUnavailable(f"CA at {address} unavailable ({code}): {detail}")
