"""Reading a running mesh: each agent's ``/debug/status``, each Envoy's stats, the CA's
metrics, and whether every process is alive. Used by ``status``, the live view and
``check``. Every probe has a short timeout; a component that does not answer is reported
as such, never as a traceback.
"""

from __future__ import annotations

import re
from typing import Any

from meshtrust.mesh.probes import agent_status, alive, envoy_stats, fetch
from meshtrust.mesh.state import MeshState, ServiceState

__all__ = ["mesh_status", "service_status"]


def _rbac_counts(stats: dict[str, int]) -> tuple[int, int]:
    allowed = denied = 0
    for name, value in stats.items():
        if ".rbac." not in name or ".shadow_" in name:
            continue
        if name.endswith("denied"):
            denied += value
        elif name.endswith("allowed") and (
            # With a DENY and an ALLOW filter a request passes both; count it once.
            "allow_" in name or not any("allow_" in n for n in stats)
        ):
            allowed += value
    return allowed, denied


def service_status(svc: ServiceState) -> dict[str, Any]:
    """Everything ``status`` shows for one service."""
    out: dict[str, Any] = {
        "name": svc.name,
        "spiffe_id": svc.spiffe_id,
        "agent": "running" if alive(svc.agent_pid) else "down",
        "app": None if svc.app_pid is None else ("running" if alive(svc.app_pid) else "down"),
        "inbound_port": svc.inbound_port,
    }
    agent = agent_status(svc) or {}
    out.update(
        {
            k: agent.get(k)
            for k in (
                "serial",
                "not_after",
                "next_rotation_in_seconds",
                "expires_in_seconds",
                "rotations",
                "state",
                "ready",
                "last_error",
            )
        }
    )
    envoy = agent.get("envoy") if isinstance(agent.get("envoy"), dict) else {}
    assert isinstance(envoy, dict)
    admin = envoy.get("admin")
    stats = envoy_stats(admin, r"rbac|ssl\.handshake|ssl\.connection_error|no_filter_chain") or {}
    allowed, denied = _rbac_counts(stats)
    prefix = f"listener.inbound_{svc.inbound_port}."
    out["envoy"] = {
        "state": ("live" if envoy.get("live") else "not ready") if envoy else "unknown",
        "pid": envoy.get("pid"),
        "restarts": envoy.get("restarts"),
        "admin": admin,
        "mtls_mode": envoy.get("mtls_mode"),
        "policy_version": envoy.get("policy_version"),
        "policy_error": envoy.get("policy_error"),
    }
    out["connections"] = {
        "allowed": allowed,
        "denied": denied,
        "tls_handshakes": stats.get(prefix + "ssl.handshake", 0),
        "tls_errors": stats.get(prefix + "ssl.connection_error", 0),
        "plaintext_refused": stats.get(prefix + "no_filter_chain_match", 0),
    }
    return out


def _metric(text: str | None, name: str) -> float | None:
    for line in (text or "").splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", line)
        if m:
            return float(m.group(2))
    return None


def mesh_status(state: MeshState) -> dict[str, Any]:
    metrics = fetch(f"http://{state.ca.metrics}/metrics")
    refused = 0.0
    for line in (metrics or "").splitlines():
        if line.startswith("meshtrust_ca_refusals_total"):
            refused += float(line.rsplit(" ", 1)[1])
    return {
        "mesh_file": state.mesh_file,
        "trust_domain": state.trust_domain,
        "cert_ttl_seconds": state.cert_ttl_seconds,
        "ca": {
            "address": state.ca.address,
            "state": "running" if alive(state.ca.pid) else "down",
            "issued": _metric(metrics, "citadel_server_success_cert_issuance_count"),
            "refused": refused if metrics is not None else None,
        },
        "services": [service_status(s) for s in state.services],
    }
