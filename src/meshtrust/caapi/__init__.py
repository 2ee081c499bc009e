"""The CA's wire contract: Istio's ``IstioCertificateService`` (``istio.v1.auth``), the
mapping between its gRPC statuses and our errors, and the one client of it (grpclib).

The agent and ``meshtrust cert request`` use :class:`CaClient`; the CA server
(:mod:`meshtrust.ca.server`) serves the same generated service and answers our errors with
:func:`status_name_for`. Nothing here imports the CA itself.
"""

from meshtrust.caapi.client import CaClient, client_ssl_context
from meshtrust.caapi.statuses import error_for_status, status_name_for

__all__ = ["CaClient", "client_ssl_context", "error_for_status", "status_name_for"]
