"""The CA's wire contract: Istio's ``IstioCertificateService`` (``istio.v1.auth``), the
mapping between its gRPC statuses and our errors, and the one client of it (grpclib).

The agent and ``meshtrust cert request`` use :class:`CaClient`; the CA server
(:mod:`meshtrust.ca.server`) serves the same generated service and answers our errors with
:func:`status_name_for`. Nothing here imports the CA itself.
"""

from meshtrust.caapi.client import CaClient, Resolver, client_ssl_context, system_resolver
from meshtrust.caapi.failover import FAILS_OVER, Endpoint, FailoverPolicy, FailureKind
from meshtrust.caapi.statuses import error_for_status, status_name_for

__all__ = [
    "FAILS_OVER",
    "CaClient",
    "Endpoint",
    "FailoverPolicy",
    "FailureKind",
    "Resolver",
    "client_ssl_context",
    "error_for_status",
    "status_name_for",
    "system_resolver",
]
