"""Who may call a workload, decided from the mesh file and the policies alone. Pure.

Theory of operation: the policy package compiles what applies to a workload into the very
Envoy RBAC filters its sidecar enforces (:func:`meshtrust.policy.rbac_filters_for`). This
module does not re-read the Istio objects to guess; it evaluates those compiled filters for
one caller, the way Envoy does: a DENY filter that matches refuses, then an ALLOW filter
must match (no ALLOW filter: allowed). The caller is known by its SPIFFE ID (``None`` for a
plain-text peer, which has no authenticated principal).

A request is more than its caller: HTTP rules may name paths and methods. Since offline
analysis knows the caller but not the request, a permission is judged three-valued —
:attr:`Reach.ALL` (every request), :attr:`Reach.NONE` (none), :attr:`Reach.SOME` (depends
on the path or method) — and so is the verdict: ``allow``, ``deny`` or ``partial``.

The mTLS mode comes first: STRICT refuses a plain-text caller before RBAC runs, and a
DISABLE sidecar speaks plain text only, so a mesh caller (whose sidecar always originates
mTLS) cannot reach it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshtrust.mesh.config import MeshConfig, ServiceSpec
from meshtrust.policy import MtlsMode, PolicySet, WorkloadRef

__all__ = [
    "Caller",
    "Decision",
    "Inbound",
    "Reach",
    "Verdict",
    "decide",
    "filter_entries",
    "inbound_of",
    "matching",
    "mesh_callers",
    "mtls_refusal",
    "policy_key",
    "policy_reach",
    "workload_ref",
]


class Reach(enum.IntEnum):
    """How many of a caller's requests a permission (or a policy) matches."""

    NONE = 0
    SOME = 1  # depends on the request's path or method
    ALL = 2


class Verdict(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    PARTIAL = "partial"  # some requests (paths, methods) allowed, others denied


@dataclass(frozen=True)
class Decision:
    """The verdict for one caller, why, and the RBAC policies (``<ns>.<name>[<rule>]``,
    as the sidecar names them) that decided it."""

    verdict: Verdict
    reason: str
    policies: tuple[str, ...] = ()


Json = Mapping[str, Any]


def _string_matches(matcher: Json, value: str) -> bool:
    if "exact" in matcher:
        return value == str(matcher["exact"])
    if "prefix" in matcher:
        return value.startswith(str(matcher["prefix"]))
    if "suffix" in matcher:
        return value.endswith(str(matcher["suffix"]))
    if "safe_regex" in matcher:
        # The compiler writes RE2 patterns from escaped literals, `.*` and `.+`: Python's re
        # reads those the same way. Envoy's safe_regex matches the whole value.
        return re.fullmatch(matcher["safe_regex"]["regex"], value) is not None
    raise ValueError(f"unknown string matcher {sorted(matcher)}")


def principal_matches(principal: Json, caller: str | None) -> bool:
    """Whether an Envoy RBAC ``Principal`` matches a caller (its SPIFFE ID; None: plain text)."""
    if principal.get("any"):
        return True
    if "authenticated" in principal:
        name = principal["authenticated"].get("principal_name")
        return caller is not None and (name is None or _string_matches(name, caller))
    if "and_ids" in principal:
        return all(principal_matches(p, caller) for p in principal["and_ids"]["ids"])
    if "or_ids" in principal:
        return any(principal_matches(p, caller) for p in principal["or_ids"]["ids"])
    if "not_id" in principal:
        return not principal_matches(principal["not_id"], caller)
    raise ValueError(f"unknown RBAC principal {sorted(principal)}")


def permission_reach(permission: Json) -> Reach:
    """How many requests an Envoy RBAC ``Permission`` matches, not knowing the request."""
    if permission.get("any"):
        return Reach.ALL
    if "and_rules" in permission:
        rules = permission["and_rules"]["rules"]
        return min((permission_reach(p) for p in rules), default=Reach.ALL)
    if "or_rules" in permission:
        rules = permission["or_rules"]["rules"]
        return max((permission_reach(p) for p in rules), default=Reach.NONE)
    if "not_rule" in permission:
        return Reach(Reach.ALL - permission_reach(permission["not_rule"]))
    if permission.get("header", {}).get("present_match"):
        return Reach.ALL  # `methods: ["*"]`: every HTTP request has a :method
    if "header" in permission or "url_path" in permission:
        return Reach.SOME
    raise ValueError(f"unknown RBAC permission {sorted(permission)}")


def policy_reach(policy: Json, caller: str | None) -> Reach:
    """An Envoy RBAC policy matches when one principal and one permission match."""
    if not any(principal_matches(p, caller) for p in policy["principals"]):
        return Reach.NONE
    return max((permission_reach(p) for p in policy["permissions"]), default=Reach.NONE)


def filter_entries(rbac_filter: Json) -> tuple[str, Mapping[str, Json]]:
    """``(action, policies)`` of one compiled RBAC filter (network or HTTP)."""
    rules = rbac_filter["typed_config"]["rules"]
    return rules["action"], rules["policies"]


def matching(policies: Mapping[str, Json], caller: str | None) -> tuple[Reach, tuple[str, ...]]:
    """The best reach among ``policies`` and the names reaching that far."""
    reaches = {name: policy_reach(body, caller) for name, body in policies.items()}
    best = max(reaches.values(), default=Reach.NONE)
    return best, tuple(name for name, reach in reaches.items() if reach == best and reach)


def mtls_refusal(mode: MtlsMode, caller: str | None) -> Decision | None:
    if caller is None and mode is MtlsMode.STRICT:
        return Decision(Verdict.DENY, "STRICT mTLS refuses plain text")
    if caller is not None and mode is MtlsMode.DISABLE:
        return Decision(
            Verdict.DENY,
            "mTLS is DISABLEd here: the sidecar accepts plain text only, while a mesh "
            "caller's sidecar always speaks mTLS",
        )
    return None


def decide(mode: MtlsMode, rbac_filters: Sequence[Json], caller: str | None) -> Decision:
    """Whether ``caller`` may call a workload with this inbound ``mode`` and these compiled
    RBAC filters (DENY first, then ALLOW, as :func:`meshtrust.policy.rbac_filters_for` makes
    them). Raises ValueError for a filter shape the compiler never makes."""
    refusal = mtls_refusal(mode, caller)
    if refusal is not None:
        return refusal
    deny: tuple[Reach, tuple[str, ...]] = (Reach.NONE, ())
    allow: tuple[Reach, tuple[str, ...]] | None = None
    allow_names: tuple[str, ...] = ()
    for rbac_filter in rbac_filters:
        action, policies = filter_entries(rbac_filter)
        if action == "DENY":
            deny = matching(policies, caller)
        else:
            allow, allow_names = matching(policies, caller), tuple(policies)
    if deny[0] is Reach.ALL:
        return Decision(Verdict.DENY, "a DENY policy matches", deny[1])
    if allow is None:
        if deny[0] is Reach.SOME:
            return Decision(Verdict.PARTIAL, "a DENY policy matches some requests", deny[1])
        return Decision(Verdict.ALLOW, "no ALLOW policy applies (allow by default)")
    if allow[0] is Reach.NONE:
        # Every ALLOW policy that applies had its chance: they are what refused.
        return Decision(Verdict.DENY, "no ALLOW rule matches this caller", allow_names)
    if allow[0] is Reach.ALL and deny[0] is Reach.NONE:
        return Decision(Verdict.ALLOW, "an ALLOW rule matches", allow[1])
    return Decision(
        Verdict.PARTIAL,
        "allowed for some requests only (paths/methods)",
        allow[1] + deny[1],
    )


# --- the mesh's callers and workloads -----------------------------------------------------------

#: Stands for "an identity no service of the mesh file has" (another team's workload, a
#: client with a hand-made token): what ``principals: ["*"]`` lets in besides the services.
OTHER_NAMESPACE = "not-in-mesh-file"


@dataclass(frozen=True)
class Caller:
    """Someone who may try to call a workload: a service of the mesh file, another identity
    of the trust domain, or a plain-text client (``spiffe_id`` None)."""

    name: str
    spiffe_id: str | None
    service: str | None = None  # the mesh file's service, when it is one


def workload_ref(svc: ServiceSpec) -> WorkloadRef:
    """What policy selection needs of a service of the mesh file (as its sidecar sees it)."""
    return WorkloadRef(
        name=svc.name,
        namespace=svc.namespace,
        spiffe_id=svc.spiffe_id,
        app_port=svc.port,
        protocol=svc.protocol,
        labels=dict(svc.labels),
    )


def mesh_callers(config: MeshConfig, *, excluding: str | None = None) -> tuple[Caller, ...]:
    """Every service of the mesh (but ``excluding``), then another identity, then plain text."""
    services = tuple(
        Caller(svc.name, str(svc.spiffe_id), svc.name)
        for svc in config.services
        if svc.name != excluding
    )
    other = f"spiffe://{config.trust_domain.name}/ns/{OTHER_NAMESPACE}/sa/{OTHER_NAMESPACE}"
    return (
        *services,
        Caller("(any other identity)", other),
        Caller("(plain text)", None),
    )


@dataclass(frozen=True)
class Inbound:
    """A workload's compiled inbound policy, as its sidecar gets it."""

    mode: MtlsMode
    rbac_filters: tuple[Json, ...]

    def decide(self, caller: str | None) -> Decision:
        return decide(self.mode, self.rbac_filters, caller)


def inbound_of(config: MeshConfig, policies: PolicySet, svc: ServiceSpec) -> Inbound:
    """The mode and RBAC filters ``svc``'s sidecar would run (the policy package compiles)."""
    compiled = policies.inbound_for(
        workload_ref(svc),
        root_namespace=config.root_namespace,
        trust_domain=config.trust_domain,
        trust_domain_aliases=config.trust_domain_aliases,
    )
    return Inbound(compiled.mode, tuple(compiled.rbac_filters))


def policy_key(rbac_name: str) -> str:
    """``<namespace>/<name>`` of the AuthorizationPolicy an RBAC policy name comes from
    (``default.allow-web[0]`` -> ``default/allow-web``; namespaces hold no dots)."""
    namespace, _, rest = rbac_name.partition(".")
    name = rest.rsplit("[", 1)[0] if rest.endswith("]") else rest
    return f"{namespace}/{name}"
