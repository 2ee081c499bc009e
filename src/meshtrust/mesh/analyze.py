"""``meshtrust analyze``: offline checks of a mesh file and its policies, like ``istioctl
analyze``. Pure over what the files say; no running mesh needed.

Theory of operation: :func:`analyze_file` loads the mesh file and its policies with the one
config layer; a file that does not load is one MT0106 finding (the loader's file, line and
field), since nothing else can be judged. Otherwise :func:`analyze_mesh` runs every analyzer
in :data:`ANALYZERS` — each a small function of an :class:`_Mesh` yielding
:class:`Finding`\\ s — and returns their findings, errors first. Who may call whom is never
guessed from the YAML: analyzers ask :mod:`meshtrust.mesh.access`, which evaluates the RBAC
filters the policy package compiles for each sidecar.

Codes live in meshtrust's own space (``MT``); where istioctl has a message with the same
meaning the number is istioctl's (MT0127 is IST0127 NoMatchingWorkloadsFound), so people
who know one recognise the other. :data:`MESSAGES` is the table docs/analyze.md lists.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from meshtrust.config import LineMap, line_for, load_yaml_mapping
from meshtrust.errors import ConfigError, PolicyError
from meshtrust.mesh.access import (
    Caller,
    Inbound,
    Reach,
    Verdict,
    filter_entries,
    inbound_of,
    matching,
    mesh_callers,
    mtls_refusal,
    policy_key,
    policy_reach,
    workload_ref,
)
from meshtrust.mesh.config import MeshConfig, ServiceSpec, load_mesh_config
from meshtrust.policy import (
    Action,
    AuthorizationPolicy,
    MtlsMode,
    PeerAuthentication,
    PolicySet,
    Protocol,
    WorkloadRef,
    authorization_policies_for,
    load_policy_files,
    mtls_mode_for,
    peer_authentication_levels,
    selects,
)

__all__ = [
    "ANALYZERS",
    "MESSAGES",
    "SCHEMA_VERSION",
    "AnalysisReport",
    "Finding",
    "Level",
    "Message",
    "analyze_file",
    "analyze_mesh",
    "display_path",
]

SCHEMA_VERSION = 1
#: Istio reads this trust domain in a policy as the mesh's own (pilot/pkg/security/trustdomain).
CLUSTER_LOCAL = "cluster.local"


class Level(enum.StrEnum):
    """istioctl's levels; only errors make ``analyze`` fail (by default)."""

    ERROR = "Error"
    WARNING = "Warning"
    INFO = "Info"

    @property
    def rank(self) -> int:
        return {Level.ERROR: 2, Level.WARNING: 1, Level.INFO: 0}[self]


@dataclass(frozen=True)
class Message:
    code: str
    name: str
    level: Level
    description: str
    istio: str | None = None  # istioctl's code of the same meaning


_MESSAGES = (
    Message("MT0106", "SchemaValidationError", Level.ERROR,
            "The mesh file or a policy file does not load: nothing else can be analyzed.",
            "IST0106"),
    Message("MT0113", "MTLSPolicyConflict", Level.ERROR,
            "A service calls an upstream whose PeerAuthentication is DISABLE: its sidecar "
            "speaks mTLS, the upstream's accepts plain text only.", "IST0113"),
    Message("MT0127", "NoMatchingWorkloadsFound", Level.WARNING,
            "A policy's selector (or namespace) matches no service of the mesh file.",
            "IST0127"),
    Message("MT0201", "AllowPolicyAllowsNothing", Level.WARNING,
            "An ALLOW policy without rules: every request to the services it selects is "
            "denied (Istio's allow-nothing policy)."),
    Message("MT0202", "AllowRulesNeverMatch", Level.ERROR,
            "An ALLOW policy has rules, but none can match on the services it selects "
            "(ports that are not the app's port, HTTP-only fields on a TCP service): it "
            "denies everything."),
    Message("MT0203", "AllowPolicyMatchesNoCaller", Level.WARNING,
            "An ALLOW policy whose rules match none of the mesh's identities: the services "
            "it selects refuse every service of the mesh."),
    Message("MT0204", "HttpFieldsOnTcpService", Level.WARNING,
            "A rule with paths or methods selects a TCP service: in an ALLOW policy the rule "
            "is ignored (it allows nothing), in a DENY policy those conditions are dropped (it "
            "denies every connection its other conditions match), as Istio does."),
    Message("MT0301", "UnknownTrustDomain", Level.ERROR,
            "A principal names a trust domain that is neither the mesh's nor cluster.local: "
            "no identity of this mesh can match it."),
    Message("MT0401", "UpstreamDenied", Level.WARNING,
            "A service lists an upstream whose policies refuse it: its calls get 403 (HTTP) "
            "or a closed connection (TCP)."),
    Message("MT0402", "UpstreamPartlyAllowed", Level.INFO,
            "A service's upstream allows it for some paths or methods only."),
    Message("MT0501", "PermissiveInStrictMesh", Level.WARNING,
            "The mesh-wide PeerAuthentication is STRICT, but a service's mode is PERMISSIVE: "
            "it also accepts plain text."),
    Message("MT0502", "DisabledInStrictMesh", Level.WARNING,
            "The mesh-wide PeerAuthentication is STRICT, but a service's mode is DISABLE: it "
            "accepts plain text only."),
    Message("MT0601", "ShadowedByDeny", Level.WARNING,
            "Every request an ALLOW policy allows is denied first by a DENY policy: the ALLOW "
            "policy has no effect."),
)  # fmt: skip
MESSAGES: Mapping[str, Message] = {m.code: m for m in _MESSAGES}


@dataclass(frozen=True)
class Finding:
    """One message about one resource, with where it is written."""

    code: str
    resource: str  # "AuthorizationPolicy default/allow-web", "Service web", "MeshFile"
    message: str
    file: Path | None = None
    line: int | None = None

    @property
    def level(self) -> Level:
        return MESSAGES[self.code].level

    @property
    def name(self) -> str:
        return MESSAGES[self.code].name

    @property
    def where(self) -> str:
        if self.file is None:
            return ""
        return f"{display_path(self.file)}:{self.line}" if self.line else display_path(self.file)

    def __str__(self) -> str:
        """istioctl's log line: ``Error [MT0127] (Kind ns/name file:line) message``."""
        origin = " ".join(part for part in (self.resource, self.where) if part)
        return f"{self.level} [{self.code}] ({origin}) {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "level": self.level.value,
            "resource": self.resource,
            "file": None if self.file is None else str(self.file),
            "line": self.line,
            "message": self.message,
        }


def display_path(path: Path) -> str:
    """A path relative to the working directory when it is below it (shorter lines)."""
    try:
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


@dataclass
class _Mesh:
    """What the analyzers look at: the mesh file, its raw document (for lines) and the
    policies, plus each service's compiled inbound policy, computed once."""

    config: MeshConfig
    policies: PolicySet
    document: LineMap | None = None
    _inbound: dict[str, Inbound] = field(default_factory=dict)
    _selected: dict[tuple[str, str], list[ServiceSpec]] = field(default_factory=dict)

    def inbound(self, svc: ServiceSpec) -> Inbound:
        if svc.name not in self._inbound:
            self._inbound[svc.name] = inbound_of(self.config, self.policies, svc)
        return self._inbound[svc.name]

    def line(self, path: str) -> int | None:
        return None if self.document is None else line_for(self.document, path)

    @cached_property
    def authz_by_key(self) -> dict[str, AuthorizationPolicy]:
        return {f"{p.namespace}/{p.name}": p for p in self.policies.authorization_policies}

    @cached_property
    def refs(self) -> list[tuple[ServiceSpec, WorkloadRef]]:
        return [(svc, workload_ref(svc)) for svc in self.config.services]

    def selected_by(self, policy: AuthorizationPolicy) -> list[ServiceSpec]:
        """The services ``policy`` selects (several analyzers ask: computed once each)."""
        key = (policy.namespace, policy.name)
        if key not in self._selected:
            root = self.config.root_namespace
            self._selected[key] = [
                svc
                for svc, ref in self.refs
                if authorization_policies_for([policy], ref, root_namespace=root)
            ]
        return self._selected[key]

    def cite(self, rbac_names: Sequence[str]) -> str:
        """``default/deny-web (policies.yaml:12)`` for each distinct policy."""
        out: list[str] = []
        for key in dict.fromkeys(policy_key(name) for name in rbac_names):
            policy = self.authz_by_key.get(key)
            if policy is not None and policy.file is not None:
                at = display_path(policy.file) + (f":{policy.line}" if policy.line else "")
                out.append(f"{key} ({at})")
            else:
                out.append(key)
        return ", ".join(out)


def _policy_finding(
    code: str, policy: AuthorizationPolicy | PeerAuthentication, text: str
) -> Finding:
    return Finding(code, policy.obj, text, policy.file, policy.line)


def _names(services: Sequence[ServiceSpec]) -> str:
    return ", ".join(svc.name for svc in services)


def _own_entries(inbound: Inbound, policy: AuthorizationPolicy) -> dict[str, Any]:
    """The RBAC policies compiled from ``policy`` in a sidecar's filters."""
    key = f"{policy.namespace}/{policy.name}"
    out: dict[str, Any] = {}
    for rbac_filter in inbound.rbac_filters:
        _, entries = filter_entries(rbac_filter)
        out.update({n: body for n, body in entries.items() if policy_key(n) == key})
    return out


def _deny_entries(inbound: Inbound) -> Mapping[str, Any]:
    for rbac_filter in inbound.rbac_filters:
        action, entries = filter_entries(rbac_filter)
        if action == "DENY":
            return entries
    return {}


# --- the analyzers ------------------------------------------------------------------------------


def no_matching_workloads(mesh: _Mesh) -> Iterator[Finding]:
    """MT0127: a policy that selects no service (also a selector in the root namespace on a
    PeerAuthentication, which Istio ignores)."""
    config, root = mesh.config, mesh.config.root_namespace
    for pa in mesh.policies.peer_authentications:
        if pa.selector and pa.namespace == root:
            yield _policy_finding(
                "MT0127", pa,
                f"a PeerAuthentication with a selector in the root namespace {root} applies to "
                "no workload (Istio ignores it); put it in the services' namespace",
            )  # fmt: skip
            continue
        matched = [
            svc for svc in config.services
            if pa.namespace in (svc.namespace, root) and selects(pa.selector, svc.labels)
        ]  # fmt: skip
        if not matched:
            yield _policy_finding("MT0127", pa, _no_match_text(pa.namespace, pa.selector, root))
    for policy in mesh.policies.authorization_policies:
        if not mesh.selected_by(policy):
            yield _policy_finding(
                "MT0127", policy, _no_match_text(policy.namespace, policy.selector, root)
            )


def _no_match_text(namespace: str, selector: Mapping[str, str] | None, root: str) -> str:
    scope = "the mesh" if namespace == root else f"namespace {namespace}"
    if selector:
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return f"no service in {scope} matches the selector {labels}"
    return f"no service of the mesh file is in {scope}"


def allow_denies_everything(mesh: _Mesh) -> Iterator[Finding]:
    """MT0201/MT0202/MT0203: an ALLOW policy that, as compiled, lets nobody in."""
    for policy in mesh.policies.authorization_policies:
        targets = mesh.selected_by(policy) if policy.action is Action.ALLOW else []
        if not targets:
            continue
        if not policy.rules:
            yield _policy_finding(
                "MT0201", policy,
                f"has no rules, so it denies every request to {_names(targets)}; if that is "
                "not the intent, add rules (an empty rule {} allows everything)",
            )  # fmt: skip
            continue
        nothing = f"{policy.namespace}.{policy.name}"  # the compiler's match-nothing entry
        entries = {svc.name: _own_entries(mesh.inbound(svc), policy) for svc in targets}
        if all(set(e) == {nothing} for e in entries.values()):
            yield _policy_finding(
                "MT0202", policy,
                f"none of its rules can match on {_names(targets)} (ports that are not the "
                "app's port, or paths/methods on a TCP service): it denies every request",
            )  # fmt: skip
            continue
        reached = any(
            policy_reach(body, caller.spiffe_id) is not Reach.NONE
            for svc in targets
            for body in entries[svc.name].values()
            for caller in mesh_callers(mesh.config, excluding=svc.name)
            if caller.service is not None
        )
        if not reached:
            yield _policy_finding(
                "MT0203", policy,
                f"its rules match no service of the mesh file: {_names(targets)} refuse "
                "calls from every service",
            )  # fmt: skip


def http_fields_on_tcp(mesh: _Mesh) -> Iterator[Finding]:
    """MT0204: paths/methods in a rule that selects a TCP service (Istio's handling, which the
    sidecar compiler follows, is correct but rarely what the author expected)."""
    for policy in mesh.policies.authorization_policies:
        tcp = [svc for svc in mesh.selected_by(policy) if svc.protocol is Protocol.TCP]
        for index, rule in enumerate(policy.rules):
            fields = sorted({name for op in rule.operations for name in op.http_only_fields})
            if not tcp or not fields:
                continue
            effect = (
                "the rule is ignored there (it allows nothing)"
                if policy.action is Action.ALLOW
                else "those conditions are dropped there, so the rule denies every connection "
                "its other conditions match"
            )
            yield _policy_finding(
                "MT0204", policy,
                f"spec.rules[{index}] uses {', '.join(fields)} (HTTP only) and selects TCP "
                f"service(s) {_names(tcp)}: {effect}",
            )  # fmt: skip


def _principal_trust_domain(principal: str) -> str | None:
    """The trust domain a principal names (``td/ns/x/sa/y``, or ``td/...*``), if it names one."""
    if principal.startswith("*") or "/" not in principal:
        return None
    return principal.split("/", 1)[0]


def unknown_trust_domain(mesh: _Mesh) -> Iterator[Finding]:
    """MT0301: a principal of a trust domain no identity of this mesh has (the mesh's own,
    ``cluster.local`` and the mesh's ``trustDomainAliases`` stand for its identities)."""
    own = mesh.config.trust_domain.name
    known = {own, CLUSTER_LOCAL, *(alias.name for alias in mesh.config.trust_domain_aliases)}
    for policy in mesh.policies.authorization_policies:
        for r, rule in enumerate(policy.rules):
            for s, source in enumerate(rule.sources):
                for key, values in (
                    ("principals", source.principals),
                    ("notPrincipals", source.not_principals),
                ):
                    for value in values:
                        td = _principal_trust_domain(value)
                        if td is not None and td not in known:
                            yield _policy_finding(
                                "MT0301", policy,
                                f"spec.rules[{r}].from[{s}].source.{key}: {value!r} is of trust "
                                f"domain {td!r}, but the mesh's is {own!r} (cluster.local "
                                "and trustDomainAliases also mean the mesh's): no identity of "
                                "this mesh matches it",
                            )  # fmt: skip


def upstream_denied(mesh: _Mesh) -> Iterator[Finding]:
    """MT0401/MT0402/MT0113: an upstream of the mesh file its callee refuses."""
    config = mesh.config
    for i, svc in enumerate(config.services):
        for j, upstream in enumerate(svc.upstreams):
            text = _upstream_problem(mesh, svc, config.service(upstream.service))
            if text is not None:
                code, message = text
                line = mesh.line(f"services[{i}].upstreams[{j}]")
                yield Finding(code, f"Service {svc.name}", message, config.path, line)


def _upstream_problem(
    mesh: _Mesh, svc: ServiceSpec, callee: ServiceSpec
) -> tuple[str, str] | None:
    """The code and message for ``svc`` calling ``callee``, or None when it is allowed."""
    inbound = mesh.inbound(callee)
    decision = inbound.decide(str(svc.spiffe_id))
    if decision.verdict is Verdict.DENY and inbound.mode is MtlsMode.DISABLE:
        return "MT0113", (
            f"calls {callee.name}, whose mTLS mode is DISABLE: {svc.name}'s sidecar speaks "
            f"mTLS to it and {callee.name}'s accepts plain text only, so every call fails; "
            f"make the PeerAuthentication of {callee.name} PERMISSIVE or STRICT"
        )
    if decision.verdict is Verdict.DENY:
        by = f": {mesh.cite(decision.policies)}" if decision.policies else ""
        return "MT0401", (
            f"calls {callee.name}, whose policies deny {svc.spiffe_id} ({decision.reason}{by})"
        )
    if decision.verdict is Verdict.PARTIAL:
        return "MT0402", (
            f"calls {callee.name}, which allows {svc.name} for some paths/methods only "
            f"({mesh.cite(decision.policies)})"
        )
    return None


def _mode_decider(
    svc: ServiceSpec, namespace: PeerAuthentication | None, workload: PeerAuthentication | None
) -> PeerAuthentication | None:
    """The most specific PeerAuthentication that set ``svc``'s mode."""
    if workload is not None and (
        workload.mode is not None or workload.port_level_mtls.get(svc.port) is not None
    ):
        return workload
    if namespace is not None and namespace.mode is not None:
        return namespace
    return None


def weaker_than_strict_mesh(mesh: _Mesh) -> Iterator[Finding]:
    """MT0501/MT0502: a service below a STRICT mesh-wide PeerAuthentication that is not."""
    root = mesh.config.root_namespace
    peers = mesh.policies.peer_authentications
    for svc in mesh.config.services:
        ref = workload_ref(svc)
        levels = peer_authentication_levels(peers, ref, root_namespace=root)
        if levels.mesh is None or levels.mesh.mode is not MtlsMode.STRICT:
            continue
        mode = mtls_mode_for(peers, ref, root_namespace=root)
        if mode is MtlsMode.STRICT:
            continue
        decider = _mode_decider(svc, levels.namespace, levels.workload)
        code = "MT0501" if mode is MtlsMode.PERMISSIVE else "MT0502"
        accepts = "plain text as well as mTLS" if code == "MT0501" else "plain text only"
        text = (
            f"makes {svc.name} {mode} in a STRICT mesh ({levels.mesh.namespace}/"
            f"{levels.mesh.name}): it accepts {accepts}"
        )
        if decider is None:  # not reachable: the mesh level is STRICT; kept total
            yield Finding(code, f"Service {svc.name}", text, mesh.config.path)
        else:
            yield _policy_finding(code, decider, text)


def shadowed_by_deny(mesh: _Mesh) -> Iterator[Finding]:
    """MT0601: an ALLOW policy every match of which a DENY policy refuses first.

    Judged for every caller the mesh knows (each service, any other identity, plain text) on
    every service the policy selects.
    """
    for policy in mesh.policies.authorization_policies:
        if policy.action is not Action.ALLOW or not policy.rules:
            continue
        reached, shadowed = False, True
        denies: list[str] = []
        for svc in mesh.selected_by(policy):
            inbound = mesh.inbound(svc)
            own, deny = _own_entries(inbound, policy), _deny_entries(inbound)
            for caller in mesh_callers(mesh.config, excluding=svc.name):
                if not _allowed_by(own, inbound, caller):
                    continue
                reached = True
                reach, names = matching(deny, caller.spiffe_id)
                if reach is not Reach.ALL:
                    shadowed = False
                    break
                denies += names
            if not shadowed:
                break
        if reached and shadowed:
            yield _policy_finding(
                "MT0601", policy,
                f"every request it allows is denied first by {mesh.cite(denies)} "
                "(DENY policies are evaluated before ALLOW): it has no effect",
            )  # fmt: skip


def _allowed_by(own: Mapping[str, Any], inbound: Inbound, caller: Caller) -> bool:
    if mtls_refusal(inbound.mode, caller.spiffe_id) is not None:
        return False
    return any(policy_reach(body, caller.spiffe_id) is not Reach.NONE for body in own.values())


Analyzer = Callable[[_Mesh], Iterator[Finding]]

#: Every analyzer, in the order their findings are listed (within a level).
ANALYZERS: tuple[Analyzer, ...] = (
    no_matching_workloads,
    allow_denies_everything,
    http_fields_on_tcp,
    unknown_trust_domain,
    upstream_denied,
    weaker_than_strict_mesh,
    shadowed_by_deny,
)


def analyze_mesh(
    config: MeshConfig, policies: PolicySet, document: LineMap | None = None
) -> list[Finding]:
    """Every finding about ``config`` and ``policies``, errors first. Pure.

    ``document`` is the mesh file as loaded (for the lines of services and upstreams).
    """
    mesh = _Mesh(config, policies, document)
    found = [finding for analyzer in ANALYZERS for finding in analyzer(mesh)]
    return sorted(found, key=lambda f: -f.level.rank)


@dataclass(frozen=True)
class AnalysisReport:
    mesh_file: Path
    findings: tuple[Finding, ...]

    def failed(self, threshold: Level = Level.ERROR) -> bool:
        """Whether any finding is at ``threshold`` or above (istioctl's --failure-threshold)."""
        return any(f.level.rank >= threshold.rank for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        counts = {level.value: 0 for level in Level}
        for finding in self.findings:
            counts[finding.level.value] += 1
        return {
            "schema_version": SCHEMA_VERSION,
            "mesh_file": str(self.mesh_file),
            "errors": counts[Level.ERROR.value],
            "warnings": counts[Level.WARNING.value],
            "infos": counts[Level.INFO.value],
            "findings": [f.to_json() for f in self.findings],
        }


def analyze_file(path: Path) -> AnalysisReport:
    """Load ``path`` and its policies and analyze them. A file that does not load is one
    MT0106 finding naming its file, line and field (never an exception)."""
    path = Path(path).resolve()
    try:
        config = load_mesh_config(path)
        policies = load_policy_files(list(config.policy_files))
        document = load_yaml_mapping(path)
    except PolicyError as exc:
        resource = exc.obj or "PolicyFile"
        problem = f"{exc.field}: {exc.problem}" if exc.field else exc.problem
        return AnalysisReport(path, (Finding("MT0106", resource, problem, exc.file, exc.line),))
    except ConfigError as exc:
        problem = f"{exc.field}: {exc.problem}" if exc.field else exc.problem
        file = Path(exc.file) if exc.file is not None else path
        return AnalysisReport(path, (Finding("MT0106", "MeshFile", problem, file, exc.line),))
    return AnalysisReport(config.path, tuple(analyze_mesh(config, policies, document)))
