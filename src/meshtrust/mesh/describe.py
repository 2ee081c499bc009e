"""``meshtrust describe WORKLOAD``: what applies to one workload and who may call it, like
``istioctl x describe pod``. Pure over the mesh file and the policies; no running mesh needed.

:func:`describe_workload` gathers the PeerAuthentications that decide the workload's mTLS
mode (one per level: mesh, namespace, workload, with file and line), the resulting mode per
port, the AuthorizationPolicies that select it, and for every possible caller (each service
of the mesh file, any other identity, a plain-text client) the verdict its sidecar would give
— evaluated on the RBAC filters the policy package compiles for that sidecar
(:mod:`meshtrust.mesh.access`) — and the same for each of its upstreams.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshtrust.errors import ConfigError
from meshtrust.mesh.access import Decision, inbound_of, mesh_callers, policy_key, workload_ref
from meshtrust.mesh.config import MeshConfig, ServiceSpec
from meshtrust.policy import (
    AuthorizationPolicy,
    MtlsMode,
    PeerAuthentication,
    PolicySet,
    authorization_policies_for,
    peer_authentication_levels,
)

__all__ = ["SCHEMA_VERSION", "describe_workload", "find_service"]

SCHEMA_VERSION = 1


def _where(file: Path | None, line: int | None) -> dict[str, Any]:
    return {"file": None if file is None else str(file), "line": line}


def _peer_json(level: str, policy: PeerAuthentication) -> dict[str, Any]:
    return {
        "level": level,
        "name": f"{policy.namespace}/{policy.name}",
        "mode": None if policy.mode is None else policy.mode.value,
        "port_level_mtls": {
            str(port): None if mode is None else mode.value
            for port, mode in sorted(policy.port_level_mtls.items())
        },
        **_where(policy.file, policy.line),
    }


def _authz_json(policy: AuthorizationPolicy) -> dict[str, Any]:
    return {
        "name": f"{policy.namespace}/{policy.name}",
        "action": policy.action.value,
        "rules": len(policy.rules),
        **_where(policy.file, policy.line),
    }


def find_service(config: MeshConfig, name: str) -> ServiceSpec:
    """The service ``name`` of the mesh file; ConfigError listing the services otherwise."""
    try:
        return config.service(name)
    except KeyError:
        known = ", ".join(svc.name for svc in config.services)
        raise ConfigError(
            f"no service {name!r} in {config.path} (services: {known})", field="WORKLOAD"
        ) from None


@dataclass(frozen=True)
class _Index:
    """AuthorizationPolicies by ``<namespace>/<name>``, to name a decision's policies."""

    policies: dict[str, AuthorizationPolicy]

    def named(self, decision: Decision) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for rbac_name in decision.policies:
            key = policy_key(rbac_name)
            policy = self.policies.get(key)
            entry = {"name": key, "rule": rbac_name, **_where(None, None)}
            if policy is not None:
                entry.update(_where(policy.file, policy.line))
            out.append(entry)
        return out


def _decision_json(decision: Decision, index: _Index) -> dict[str, Any]:
    return {
        "verdict": decision.verdict.value,
        "reason": decision.reason,
        "policies": index.named(decision),
    }


def _port_mode(
    svc: ServiceSpec, mode: MtlsMode, workload_level: PeerAuthentication | None
) -> dict[str, Any]:
    """The app port's mode and which PeerAuthentication field set it."""
    return {
        "port": svc.port,
        "inbound_port": svc.inbound_port,
        "mode": mode.value,
        "port_level": workload_level is not None
        and workload_level.port_level_mtls.get(svc.port) is not None,
    }


def describe_workload(config: MeshConfig, policies: PolicySet, name: str) -> dict[str, Any]:
    """The ``describe`` document of service ``name`` (schema in docs/output.md).

    Raises ConfigError for a name that is not a service of the mesh file.
    """
    svc = find_service(config, name)
    ref = workload_ref(svc)
    root = config.root_namespace
    levels = peer_authentication_levels(policies.peer_authentications, ref, root_namespace=root)
    inbound = inbound_of(config, policies, svc)
    index = _Index(
        {f"{p.namespace}/{p.name}": p for p in policies.authorization_policies}
    )
    applied = [
        _peer_json(level, policy)
        for level, policy in (
            ("mesh", levels.mesh),
            ("namespace", levels.namespace),
            ("workload", levels.workload),
        )
        if policy is not None
    ]
    callers = [
        {
            "caller": caller.name,
            "spiffe_id": caller.spiffe_id,
            **_decision_json(inbound.decide(caller.spiffe_id), index),
        }
        for caller in mesh_callers(config, excluding=svc.name)
    ]
    upstreams = []
    for upstream in svc.upstreams:
        callee = config.service(upstream.service)
        decision = inbound_of(config, policies, callee).decide(str(svc.spiffe_id))
        upstreams.append(
            {
                "service": callee.name,
                "local_port": upstream.local_port,
                **_decision_json(decision, index),
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "mesh_file": str(config.path),
        "workload": svc.name,
        "spiffe_id": str(svc.spiffe_id),
        "namespace": svc.namespace,
        "labels": dict(sorted(svc.labels.items())),
        "protocol": svc.protocol.value,
        "mtls_mode": inbound.mode.value,
        "peer_authentications": applied,
        "ports": [_port_mode(svc, inbound.mode, levels.workload)],
        "authorization_policies": [
            _authz_json(p)
            for p in authorization_policies_for(
                policies.authorization_policies, ref, root_namespace=root
            )
        ],
        "callers": callers,
        "upstreams": upstreams,
    }
