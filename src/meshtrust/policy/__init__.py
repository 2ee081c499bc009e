"""Istio security policies (PeerAuthentication, AuthorizationPolicy) for meshtrust workloads.

:func:`load_policy_files` reads and validates Istio YAML into a :class:`PolicySet`;
:meth:`PolicySet.inbound_for` selects what applies to one workload and compiles it into an
:class:`InboundPolicy` (mTLS mode + Envoy RBAC filters) for the sidecar.
"""

from meshtrust.errors import PolicyError
from meshtrust.policy.compile import (
    HTTP_RBAC_FILTER,
    HTTP_RBAC_TYPE,
    NETWORK_RBAC_FILTER,
    NETWORK_RBAC_TYPE,
    PeerAuthenticationLevels,
    authorization_policies_for,
    inbound_policy,
    mtls_mode_for,
    peer_authentication_levels,
    rbac_filters_for,
    selects,
)
from meshtrust.policy.istio import PolicySet, load_policy_files
from meshtrust.policy.model import InboundPolicy, MtlsMode, Protocol, WorkloadRef
from meshtrust.policy.objects import (
    API_VERSIONS,
    Action,
    AuthorizationPolicy,
    Operation,
    PeerAuthentication,
    Rule,
    Source,
)

__all__ = [
    "API_VERSIONS",
    "HTTP_RBAC_FILTER",
    "HTTP_RBAC_TYPE",
    "NETWORK_RBAC_FILTER",
    "NETWORK_RBAC_TYPE",
    "Action",
    "AuthorizationPolicy",
    "InboundPolicy",
    "MtlsMode",
    "Operation",
    "PeerAuthentication",
    "PeerAuthenticationLevels",
    "PolicyError",
    "PolicySet",
    "Protocol",
    "Rule",
    "Source",
    "WorkloadRef",
    "authorization_policies_for",
    "inbound_policy",
    "load_policy_files",
    "mtls_mode_for",
    "peer_authentication_levels",
    "rbac_filters_for",
    "selects",
]
