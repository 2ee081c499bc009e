"""Which policies apply to a workload, and what they become in Envoy. Pure: no I/O, no clock.

Selection is Istio's:

* a policy in the root namespace (``istio-system`` by default) applies mesh-wide, one in
  namespace N to N's workloads; ``selector.matchLabels`` narrows either to the workloads
  carrying all those labels;
* PeerAuthentication: the most specific policy wins — workload (selector, in the workload's
  namespace) over namespace (no selector, in the workload's namespace) over mesh (no selector,
  in the root namespace); a selector policy in the root namespace is ignored, as Istio does.
  ``mtls.mode`` UNSET inherits from the next level; ``portLevelMtls[app_port]`` of the
  workload-level policy overrides; the default is PERMISSIVE;
* AuthorizationPolicy: every selected policy counts. DENY policies are compiled into one RBAC
  filter with action DENY, placed first; ALLOW policies into one with action ALLOW, second.
  No ALLOW policy means no ALLOW filter (allow); a selected ALLOW policy that can match nothing
  (no rules) still creates the ALLOW filter, so it denies whatever no other ALLOW policy allows.

Translation follows Istio's ``pilot/pkg/security/authz`` (see :func:`_principal_matcher`);
every AuthorizationPolicy rule becomes one Envoy policy named ``<namespace>.<name>[<rule>]``
whose ``permissions`` are the rule's operations (OR'd) and ``principals`` its sources (OR'd),
so a request matches when one source and one operation match, exactly Istio's rule semantics.

One product-specific step: a workload has a single inbound listener in front of its app port,
so ``ports``/``notPorts`` are decided here against ``workload.app_port`` instead of being left
to Envoy's ``destination_port`` (which would see the sidecar's listener port, not the app's).
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshtrust.policy.model import InboundPolicy, MtlsMode, Protocol, WorkloadRef
from meshtrust.policy.objects import (
    Action,
    AuthorizationPolicy,
    Operation,
    PeerAuthentication,
    Rule,
    Source,
)
from meshtrust.spiffe import TrustDomain

__all__ = [
    "HTTP_RBAC_FILTER",
    "Policies",
    "HTTP_RBAC_TYPE",
    "NETWORK_RBAC_FILTER",
    "NETWORK_RBAC_TYPE",
    "PeerAuthenticationLevels",
    "authorization_policies_for",
    "inbound_policy",
    "mtls_mode_for",
    "peer_authentication_levels",
    "rbac_filters_for",
    "selects",
]

log = logging.getLogger(__name__)

NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
NETWORK_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
HTTP_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"

# Istio reads this trust domain in a policy as "the mesh's own" (pilot/pkg/security/trustdomain).
CLUSTER_LOCAL = "cluster.local"
SPIFFE_PREFIX = "spiffe://"

Json = dict[str, Any]


# --- selection ----------------------------------------------------------------------------------


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Whether ``matchLabels`` ``selector`` selects a workload with ``labels`` (None/{}: all)."""
    return all(labels.get(key) == value for key, value in (selector or {}).items())


@dataclass(frozen=True)
class PeerAuthenticationLevels:
    """The PeerAuthentications that decide one workload's mode, one per level (None: none)."""

    mesh: PeerAuthentication | None = None
    namespace: PeerAuthentication | None = None
    workload: PeerAuthentication | None = None


def peer_authentication_levels(
    peer_authentications: Iterable[PeerAuthentication],
    workload: WorkloadRef,
    *,
    root_namespace: str = "istio-system",
) -> PeerAuthenticationLevels:
    """Which PeerAuthentication applies to ``workload`` at each level (mesh, namespace,
    workload), as Istio's ``ComposePeerAuthentication`` picks them."""
    mesh: PeerAuthentication | None = None
    namespace: PeerAuthentication | None = None
    workload_level: PeerAuthentication | None = None
    # Among equally specific policies Istio keeps the oldest by creation time; there is no
    # creation time in a file, so the first loaded stands in for the oldest.
    for policy in peer_authentications:
        if policy.namespace not in (workload.namespace, root_namespace):
            continue
        if not policy.selector:
            if policy.namespace == root_namespace:
                mesh = mesh or policy
            else:
                namespace = namespace or policy
        elif policy.namespace != root_namespace and selects(policy.selector, workload.labels):
            workload_level = workload_level or policy
    return PeerAuthenticationLevels(mesh, namespace, workload_level)


def mtls_mode_for(
    peer_authentications: Iterable[PeerAuthentication],
    workload: WorkloadRef,
    *,
    root_namespace: str = "istio-system",
) -> MtlsMode:
    """The inbound mTLS mode of ``workload`` (Istio's ``ComposePeerAuthentication``)."""
    levels = peer_authentication_levels(
        peer_authentications, workload, root_namespace=root_namespace
    )
    mode = MtlsMode.PERMISSIVE
    for level in (levels.mesh, levels.namespace, levels.workload):
        if level is not None and level.mode is not None:
            mode = level.mode
    workload_level = levels.workload
    if workload_level is not None and workload.app_port in workload_level.port_level_mtls:
        port_mode = workload_level.port_level_mtls[workload.app_port]
        if port_mode is not None:  # UNSET at port level inherits the workload's mode
            mode = port_mode
    return mode


def authorization_policies_for(
    policies: Iterable[AuthorizationPolicy],
    workload: WorkloadRef,
    *,
    root_namespace: str = "istio-system",
) -> tuple[AuthorizationPolicy, ...]:
    """The AuthorizationPolicies that apply to ``workload``, in load order."""
    return tuple(
        policy
        for policy in policies
        if policy.namespace in (workload.namespace, root_namespace)
        and selects(policy.selector, workload.labels)
    )


# --- translation --------------------------------------------------------------------------------


_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def _re2_escape(text: str) -> str:
    """Quote ``text`` for an RE2 (Envoy ``safe_regex``) pattern."""
    return "".join("\\" + char if char in _RE2_SPECIAL else char for char in text)


def _string_matcher(value: str, prefix: str = "") -> Json:
    """Istio's ``StringMatcherWithPrefix``: exact, ``prefix*``, ``*suffix``, ``*``.

    ``*`` is "present and non-empty" (``.+``). With a ``prefix`` (``spiffe://`` for
    principals) ``*suffix`` is the regex ``<prefix>.*<suffix>``, as current Istio does: a plain
    suffix matcher would also match a principal that is not a SPIFFE URI (Envoy falls back to
    DNS SANs and the subject) or one shorter than ``spiffe://`` + suffix. Unlike Istio, the
    suffix is regex-quoted, so ``*.local`` cannot match ``xlocal``.
    """
    if value == "*":
        return {"safe_regex": {"regex": ".+"}}
    if value.startswith("*"):
        if not prefix:
            return {"suffix": value[1:]}
        return {"safe_regex": {"regex": _re2_escape(prefix) + ".*" + _re2_escape(value[1:])}}
    if value.endswith("*"):
        return {"prefix": prefix + value[:-1]}
    return {"exact": prefix + value}


def _principals_for(principal: str, domains: Sequence[str]) -> list[str]:
    """A principal as the RBAC rules must match it. ``domains`` is the mesh's trust domain
    first, then its aliases (Istio's ``trustDomainAliases``): a principal naming any of them,
    or Istio's ``cluster.local``, stands for the same identity in each, so a trust domain can
    be renamed without rewriting policies. Other principals (another trust domain, ``*``,
    a wildcard trust domain) are kept as written."""
    head, sep, rest = principal.partition("/")
    if not sep or "*" in head:
        return [principal]
    if head == CLUSTER_LOCAL or head in domains:
        return [f"{domain}/{rest}" for domain in domains]
    return [principal]


def _principal_matcher(principal: str) -> Json:
    return {"authenticated": {"principal_name": _string_matcher(principal, SPIFFE_PREFIX)}}


def _namespace_matcher(namespace: str) -> Json:
    # Istio: `.*/ns/<namespace>/.*` on the peer's principal, `*` standing for `.*`.
    pattern = ".*".join(_re2_escape(part) for part in namespace.split("*"))
    return {"authenticated": {"principal_name": {"safe_regex": {"regex": f".*/ns/{pattern}/.*"}}}}


def _or_ids(ids: list[Json]) -> Json:
    return ids[0] if len(ids) == 1 else {"or_ids": {"ids": ids}}


def _or_rules(rules: list[Json]) -> Json:
    return rules[0] if len(rules) == 1 else {"or_rules": {"rules": rules}}


def _source_principal(source: Source, domains: Sequence[str]) -> Json:
    """One ``from[].source``: its fields AND'd, the values of a field OR'd."""
    ids: list[Json] = []
    principals = [q for p in source.principals for q in _principals_for(p, domains)]
    not_principals = [q for p in source.not_principals for q in _principals_for(p, domains)]
    if principals:
        ids.append(_or_ids([_principal_matcher(p) for p in principals]))
    if not_principals:
        ids.append({"not_id": _or_ids([_principal_matcher(p) for p in not_principals])})
    if source.namespaces:
        ids.append(_or_ids([_namespace_matcher(n) for n in source.namespaces]))
    if source.not_namespaces:
        ids.append({"not_id": _or_ids([_namespace_matcher(n) for n in source.not_namespaces])})
    if not ids:
        return {"any": True}
    return ids[0] if len(ids) == 1 else {"and_ids": {"ids": ids}}


def _path_rule(path: str) -> Json:
    return {"url_path": {"path": _string_matcher(path)}}


def _method_rule(method: str) -> Json:
    if method == "*":
        return {"header": {"name": ":method", "present_match": True}}
    return {"header": {"name": ":method", "string_match": _string_matcher(method)}}


def _operation_permission(operation: Operation, app_port: int, *, http: bool) -> Json | None:
    """One ``to[].operation`` (fields AND'd, values OR'd); None if it can never match.

    With ``http`` False the HTTP-only fields are left out (the caller decided that this is
    right: Istio does so in DENY policies).
    """
    if operation.ports and app_port not in operation.ports:
        return None
    if app_port in operation.not_ports:
        return None
    rules: list[Json] = []
    if http:
        if operation.paths:
            rules.append(_or_rules([_path_rule(p) for p in operation.paths]))
        if operation.not_paths:
            rules.append({"not_rule": _or_rules([_path_rule(p) for p in operation.not_paths])})
        if operation.methods:
            rules.append(_or_rules([_method_rule(m) for m in operation.methods]))
        if operation.not_methods:
            rules.append({"not_rule": _or_rules([_method_rule(m) for m in operation.not_methods])})
    if not rules:
        return {"any": True}
    return rules[0] if len(rules) == 1 else {"and_rules": {"rules": rules}}


def _rule_policy(
    policy: AuthorizationPolicy,
    index: int,
    rule: Rule,
    workload: WorkloadRef,
    domains: Sequence[str],
) -> Json | None:
    """The Envoy policy for one rule, or None if the rule can never match here."""
    http = workload.protocol is Protocol.HTTP
    http_fields = sorted({name for op in rule.operations for name in op.http_only_fields})
    if http_fields and not http:
        if policy.action is Action.ALLOW:
            # Istio skips an ALLOW rule it cannot fully express on TCP: allowing more than
            # written would be the unsafe direction.
            log.warning(
                "%s: rule %d uses HTTP-only fields (%s) on TCP workload %s/%s; "
                "the rule is ignored (it allows nothing), as Istio does",
                policy.obj,
                index,
                ", ".join(http_fields),
                workload.namespace,
                workload.name,
            )
            return None
        # In a DENY rule Istio drops only the HTTP conditions: denying more is the safe side.
        log.warning(
            "%s: rule %d uses HTTP-only fields (%s) on TCP workload %s/%s; those conditions "
            "are ignored, so the rule denies every connection its other conditions match, "
            "as Istio does",
            policy.obj,
            index,
            ", ".join(http_fields),
            workload.namespace,
            workload.name,
        )
    if rule.operations:
        permissions = [
            permission
            for operation in rule.operations
            if (permission := _operation_permission(operation, workload.app_port, http=http))
            is not None
        ]
        if not permissions:
            return None
    else:
        permissions = [{"any": True}]
    principals = [_source_principal(source, domains) for source in rule.sources] or [{"any": True}]
    return {"permissions": permissions, "principals": principals}


def _match_nothing() -> Json:
    """An Envoy policy (at least one permission and one principal) that matches nothing."""
    return {"permissions": [{"not_rule": {"any": True}}], "principals": [{"not_id": {"any": True}}]}


def _envoy_policies(
    policy: AuthorizationPolicy, workload: WorkloadRef, domains: Sequence[str]
) -> dict[str, Json]:
    entries: dict[str, Json] = {}
    for index, rule in enumerate(policy.rules):
        compiled = _rule_policy(policy, index, rule, workload, domains)
        if compiled is not None:
            entries[f"{policy.namespace}.{policy.name}[{index}]"] = compiled
    if not entries and policy.action is Action.ALLOW:
        # Shown by name in the config dump: this ALLOW policy allows nothing here.
        entries[f"{policy.namespace}.{policy.name}"] = _match_nothing()
    return entries


def _rbac_filter(action: Action, policies: dict[str, Json], protocol: Protocol) -> Json:
    rules = {"action": action.value, "policies": policies}
    if protocol is Protocol.TCP:
        return {
            "name": NETWORK_RBAC_FILTER,
            "typed_config": {
                "@type": NETWORK_RBAC_TYPE,
                "stat_prefix": f"inbound_rbac_{action.value.lower()}.",
                "rules": rules,
            },
        }
    return {
        "name": HTTP_RBAC_FILTER,
        "typed_config": {
            "@type": HTTP_RBAC_TYPE,
            "rules_stat_prefix": f"{action.value.lower()}_",
            "rules": rules,
        },
    }


def rbac_filters_for(
    policies: Iterable[AuthorizationPolicy],
    workload: WorkloadRef,
    *,
    root_namespace: str = "istio-system",
    trust_domain: str | TrustDomain,
    trust_domain_aliases: Sequence[str | TrustDomain] = (),
) -> tuple[Json, ...]:
    """The RBAC filters for ``workload``: DENY first, then ALLOW; () allows everything.

    Network filters for TCP workloads, HTTP filters for HTTP ones. Rules using HTTP-only fields
    on a TCP workload are handled as Istio does, with a warning logged naming the policy.
    Principals of ``trust_domain_aliases`` are the mesh's own (:func:`_principals_for`).
    Raises :class:`~meshtrust.errors.InvalidSpiffeId` for an invalid trust domain or alias.
    """
    td = TrustDomain.parse(trust_domain) if isinstance(trust_domain, str) else trust_domain
    domains = [td.name]
    for alias in trust_domain_aliases:
        name = (TrustDomain.parse(alias) if isinstance(alias, str) else alias).name
        if name not in domains:
            domains.append(name)
    selected = authorization_policies_for(policies, workload, root_namespace=root_namespace)
    filters: list[Json] = []
    for action in (Action.DENY, Action.ALLOW):
        chosen = [policy for policy in selected if policy.action is action]
        if not chosen:
            continue
        entries: dict[str, Json] = {}
        for policy in chosen:
            entries.update(_envoy_policies(policy, workload, domains))
        if entries:
            filters.append(_rbac_filter(action, entries, workload.protocol))
    return tuple(filters)


class Policies(typing.Protocol):
    """What compilation needs of a set of policies (:class:`~.istio.PolicySet` is one)."""

    @property
    def peer_authentications(self) -> Sequence[PeerAuthentication]: ...

    @property
    def authorization_policies(self) -> Sequence[AuthorizationPolicy]: ...


def inbound_policy(
    policy_set: Policies,
    workload: WorkloadRef,
    *,
    root_namespace: str = "istio-system",
    trust_domain: str | TrustDomain,
    trust_domain_aliases: Sequence[str | TrustDomain] = (),
) -> InboundPolicy:
    """The inbound policy of ``workload``: its mTLS mode and its RBAC filters."""
    return InboundPolicy(
        mode=mtls_mode_for(
            policy_set.peer_authentications, workload, root_namespace=root_namespace
        ),
        rbac_filters=rbac_filters_for(
            policy_set.authorization_policies,
            workload,
            root_namespace=root_namespace,
            trust_domain=trust_domain,
            trust_domain_aliases=trust_domain_aliases,
        ),
    )
