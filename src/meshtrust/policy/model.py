"""The contract between policy (Istio YAML) and the sidecar (Envoy config).

The policy package decides, for one workload, the inbound mTLS mode and the RBAC filters;
the sidecar package places them into Envoy's inbound listener. Both sides only depend on
these types.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshtrust.spiffe import SpiffeId

__all__ = ["InboundPolicy", "MtlsMode", "Protocol", "WorkloadRef"]


class MtlsMode(enum.StrEnum):
    """PeerAuthentication ``mtls.mode`` (UNSET resolves to the parent's, finally PERMISSIVE)."""

    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"


class Protocol(enum.StrEnum):
    HTTP = "http"
    TCP = "tcp"


@dataclass(frozen=True)
class WorkloadRef:
    """What policy selection needs to know about a workload."""

    name: str
    namespace: str
    spiffe_id: SpiffeId
    app_port: int  # the app's own port: what `ports` / `portLevelMtls` refer to
    protocol: Protocol = Protocol.HTTP
    labels: Mapping[str, str] = field(default_factory=dict)  # always includes app: <name>


@dataclass(frozen=True)
class InboundPolicy:
    """The compiled inbound policy for one workload.

    ``rbac_filters`` are complete Envoy filter entries (``{"name": ..., "typed_config":
    {...}}``), in evaluation order (DENY before ALLOW): network filters
    (``envoy.filters.network.rbac``) for TCP workloads, HTTP filters
    (``envoy.filters.http.rbac``) for HTTP workloads. Empty = allow everything.
    """

    mode: MtlsMode
    rbac_filters: tuple[Mapping[str, Any], ...] = ()
