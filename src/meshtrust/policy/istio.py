"""Istio policies read from YAML: PeerAuthentication and AuthorizationPolicy, and the
ServiceEntry and DestinationRule that describe services of another mesh
(:mod:`meshtrust.policy.networking`).

Theory of operation: :func:`load_policy_files` reads every file (multi-document YAML, also
``kind: List``), validates every object strictly and returns one immutable
:class:`PolicySet`. Anything wrong in any file — YAML syntax, an unknown kind or field, a
wrong type, a principal, port or mode that cannot mean what the author thought — raises one
:class:`PolicyError` naming the file (and line), the object and the field; nothing is
returned, so the caller keeps the PolicySet it had. Selection and translation to Envoy are in
:mod:`meshtrust.policy.compile`; :meth:`PolicySet.inbound_for` is the door to it.

What is accepted follows Istio's API (``security.istio.io/v1`` and ``v1beta1``) and Istio's
own validation webhook (``pkg/config/validation``): e.g. a DENY policy without ``rules`` and
port-level mTLS on a policy without a selector are refused, as ``kubectl apply`` would refuse
them. Istio fields meshtrust does not implement (``when``, ``hosts``, ``ipBlocks``,
``requestPrincipals``, ``CUSTOM``/``AUDIT`` ...) are refused with "not supported" rather
than silently ignored: ignoring a condition widens an ALLOW policy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from meshtrust.config import (
    ConfigError,
    LineMap,
    LineSeq,
    YamlError,
    check_dns_label,
    check_dns_subdomain,
    check_labels,
    load_yaml_documents,
)
from meshtrust.errors import InvalidSpiffeId, PolicyError
from meshtrust.policy.compile import inbound_policy
from meshtrust.policy.model import InboundPolicy, MtlsMode, WorkloadRef
from meshtrust.policy.networking import (
    DESTINATION_RULE,
    NETWORKING_API_VERSIONS,
    SERVICE_ENTRY,
    DestinationRule,
    RemoteService,
    ServiceEndpoint,
    ServiceEntry,
    ServicePort,
    resolve_remote_service,
)
from meshtrust.policy.objects import (
    API_VERSIONS,
    AUTHORIZATION_POLICY,
    DEFAULT_NAMESPACE,
    PEER_AUTHENTICATION,
    Action,
    AuthorizationPolicy,
    Operation,
    PeerAuthentication,
    Rule,
    Source,
)
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = ["PolicySet", "load_policy_files"]


@dataclass(frozen=True)
class PolicySet:
    """Every policy loaded, in load order (which stands in for Istio's creation time)."""

    peer_authentications: tuple[PeerAuthentication, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    service_entries: tuple[ServiceEntry, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()

    def remote_service(
        self, host: str, port: int, trust_domain: str | TrustDomain
    ) -> RemoteService:
        """Where an upstream naming ``host:port`` connects and whom it accepts there (the
        ServiceEntry and DestinationRule for the host); raises :class:`UnknownHost`."""
        td = TrustDomain.parse(trust_domain) if isinstance(trust_domain, str) else trust_domain
        return resolve_remote_service(self.service_entries, self.destination_rules, host, port, td)

    def inbound_for(
        self,
        workload: WorkloadRef,
        *,
        root_namespace: str = "istio-system",
        trust_domain: str | TrustDomain,
        trust_domain_aliases: Sequence[str | TrustDomain] = (),
    ) -> InboundPolicy:
        """The inbound mTLS mode and RBAC filters for ``workload``; see :mod:`.compile`.

        ``trust_domain`` is the mesh's: policy principals written with Istio's
        ``cluster.local`` trust domain are read as this one, as Istio does; principals of
        ``trust_domain_aliases`` (Istio's ``trustDomainAliases``) stand for the mesh's own.
        """
        return inbound_policy(
            self,
            workload,
            root_namespace=root_namespace,
            trust_domain=trust_domain,
            trust_domain_aliases=trust_domain_aliases,
        )


# --- validation helpers -----------------------------------------------------------------------


@dataclass(frozen=True)
class _At:
    """Where a value is: file, object, field path and line — everything an error names."""

    file: Path
    obj: str
    field: str = ""
    line: int | None = None

    def key(self, mapping: Mapping[str, Any], key: str) -> _At:
        line = mapping.key_lines.get(key) if isinstance(mapping, LineMap) else None
        path = f"{self.field}.{key}" if self.field else key
        return _At(self.file, self.obj, path, line or self.line)

    def item(self, sequence: Sequence[Any], index: int) -> _At:
        line = None
        if isinstance(sequence, LineSeq) and index < len(sequence.item_lines):
            line = sequence.item_lines[index]
        return _At(self.file, self.obj, f"{self.field}[{index}]", line or self.line)

    def naming(self, obj: str) -> _At:
        return _At(self.file, obj, self.field, self.line)

    def error(self, problem: str) -> PolicyError:
        return PolicyError(self.file, self.obj, self.field, problem, line=self.line)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({_quote(value)})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _quote(text: str) -> str:
    return ascii(text) if len(text) <= 80 else f"{ascii(text[:80])}..."


def _mapping(
    value: object,
    at: _At,
    fields: Collection[str],
    unsupported: Mapping[str, str] | None = None,
) -> Mapping[str, Any]:
    """``value`` as a mapping whose keys are all in ``fields``; null is an empty mapping."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise at.error(f"expected a mapping, got {_type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            raise at.error(f"field names must be strings, got {key!r}")
        if unsupported and key in unsupported:
            raise at.key(value, key).error(unsupported[key])
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise at.key(value, key).error(f"unknown field {key!r} (known fields: {known})")
    return value


def _string(value: object, at: _At) -> str:
    if not isinstance(value, str):
        raise at.error(f"expected a string, got {_type_name(value)}")
    return value


def _list(value: object, at: _At) -> Sequence[Any]:
    """``value`` as a list; null is an empty list."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise at.error(f"expected a list, got {_type_name(value)}")
    return value


def _strings(
    container: Mapping[str, Any],
    key: str,
    at: _At,
    check: Callable[[str], str | None] | None = None,
) -> tuple[str, ...]:
    """A list of non-empty strings, each checked by ``check`` (problem text or None)."""
    if key not in container:
        return ()
    where = at.key(container, key)
    values = _list(container[key], where)
    out: list[str] = []
    for index, item in enumerate(values):
        item_at = where.item(values, index)
        text = _string(item, item_at)
        if not text:
            raise item_at.error("values must not be empty strings")
        problem = check(text) if check else None
        if problem:
            raise item_at.error(problem)
        out.append(text)
    return tuple(out)


_T = TypeVar("_T")


def _shared(check: Callable[[object, str], _T], value: object, at: _At) -> _T:
    """Apply one of the config layer's validators (the same names and labels rules as
    mesh.yaml and sidecar.yaml), reporting its problem at ``at`` (plus any sub-field)."""
    try:
        return check(value, at.field)
    except ConfigError as exc:
        key = exc.field[len(at.field) :].lstrip(".")
        if isinstance(value, Mapping) and key in value:
            raise at.key(value, key).error(exc.problem) from None
        raise at.error(exc.problem) from None


def _labels(value: object, at: _At, *, what: str) -> dict[str, str]:
    """A string-to-string mapping (labels, matchLabels, annotations)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise at.error(f"expected a mapping of {what}, got {_type_name(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise at.error(f"{what} keys must be non-empty strings, got {key!r}")
        out[key] = _string(item, at.key(value, key))
    return out


# --- values: principals, namespaces, ports, paths, methods --------------------------------------

_SPIFFE_PREFIX = "spiffe://"
_PRINCIPAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/")
_SEGMENT_CHARS = _PRINCIPAL_CHARS - {"/"}
_TOKEN_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'+-.^_`|~"
)


def _first_outside(text: str, allowed: frozenset[str]) -> str | None:
    return next((char for char in text if char not in allowed), None)


def _wildcard_problem(value: str) -> str | None:
    """Istio's wildcards: ``*`` alone, or one ``*`` at the start or at the end."""
    if value == "*":
        return None
    inner = value[1:] if value.startswith("*") else value[:-1] if value.endswith("*") else value
    if "*" in inner:
        return (
            f"{_quote(value)}: '*' may only be the whole value or its first or last character "
            "(exact, prefix*, *suffix or * as in Istio)"
        )
    return None


def _principal_problem(value: str) -> str | None:
    """Why ``value`` is not a usable ``principals``/``notPrincipals`` entry, or None."""
    if value.startswith(_SPIFFE_PREFIX):
        return (
            f"invalid principal {_quote(value)}: write principals without 'spiffe://', "
            "as <trust-domain>/ns/<namespace>/sa/<service-account>"
        )
    problem = _wildcard_problem(value)
    if problem:
        return f"invalid principal {problem}"
    if value == "*":
        return None
    literal = value.strip("*")
    if value.startswith("*") or value.endswith("*"):
        bad = _first_outside(literal, _PRINCIPAL_CHARS)
        if bad:
            return (
                f"invalid principal {_quote(value)}: character {bad!r} cannot occur in a "
                "SPIFFE ID (only A-Z a-z 0-9 . - _ /)"
            )
        return None
    try:
        sid = SpiffeId.parse(_SPIFFE_PREFIX + value)
    except InvalidSpiffeId as exc:
        return f"invalid principal {_quote(value)}: {exc}"
    if sid.istio_namespace is None:
        return (
            f"invalid principal {_quote(value)}: expected "
            "<trust-domain>/ns/<namespace>/sa/<service-account> (or a * wildcard at one end)"
        )
    return None


def _namespace_value_problem(value: str) -> str | None:
    problem = _wildcard_problem(value)
    if problem:
        return f"invalid namespace {problem}"
    bad = _first_outside(value.strip("*"), _SEGMENT_CHARS)
    if bad:
        return f"invalid namespace {_quote(value)}: character {bad!r} is not allowed"
    return None


def _path_problem(value: str) -> str | None:
    problem = _wildcard_problem(value)
    if problem:
        return f"invalid path {problem}"
    if "{" in value or "}" in value:
        return f"invalid path {_quote(value)}: path templates ({{*}}, {{**}}) are not supported"
    if any(not ("!" <= char <= "~") for char in value):
        return (
            f"invalid path {_quote(value)}: whitespace, control and non-ASCII characters "
            "are not allowed"
        )
    if not value.startswith(("/", "*")):
        return f"invalid path {_quote(value)}: a path starts with '/' (or is '*' / '*suffix')"
    return None


def _method_problem(value: str) -> str | None:
    problem = _wildcard_problem(value)
    if problem:
        return f"invalid method {problem}"
    bad = _first_outside(value.strip("*"), _TOKEN_CHARS)
    if bad:
        return f"invalid method {_quote(value)}: character {bad!r} is not allowed"
    return None


def _ports(container: Mapping[str, Any], key: str, at: _At) -> tuple[int, ...]:
    """Istio writes ports as strings ("8080"); plain integers are accepted too."""
    if key not in container:
        return ()
    where = at.key(container, key)
    values = _list(container[key], where)
    return tuple(_port(item, where.item(values, index)) for index, item in enumerate(values))


def _port(value: object, at: _At) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise at.error(f"expected a port number, got {_type_name(value)}")
    if not 1 <= number <= 65535:
        raise at.error(f"port {number} is not in 1-65535")
    return number


def _mtls_mode(container: Mapping[str, Any], at: _At) -> MtlsMode | None:
    body = _mapping(container, at, {"mode"})
    if "mode" not in body or body["mode"] is None:
        return None
    where = at.key(body, "mode")
    mode = _string(body["mode"], where)
    if mode == "UNSET":
        return None
    try:
        return MtlsMode(mode)
    except ValueError:
        known = ", ".join(["UNSET", *MtlsMode])
        raise where.error(f"unknown mTLS mode {_quote(mode)} (expected one of {known})") from None


def _selector(spec: Mapping[str, Any], at: _At) -> dict[str, str]:
    if "selector" not in spec:
        return {}
    where = at.key(spec, "selector")
    body = _mapping(spec["selector"], where, {"matchLabels"})
    if "matchLabels" not in body:
        return {}
    labels_at = where.key(body, "matchLabels")
    labels = _labels(body["matchLabels"], labels_at, what="labels")
    for key, value in labels.items():
        if "*" in key or "*" in value:
            raise labels_at.key(body["matchLabels"], key).error(
                "wildcards are not supported in a selector"
            )
    return _shared(check_labels, labels, labels_at)


# --- objects ------------------------------------------------------------------------------------

_NOT_SUPPORTED = "is not supported by meshtrust"


def _parse_peer_authentication(
    raw_spec: object, at: _At, namespace: str, name: str, line: int | None
) -> PeerAuthentication:
    spec = _mapping(raw_spec, at, {"selector", "mtls", "portLevelMtls"})
    selector = _selector(spec, at)
    mode = _mtls_mode(spec["mtls"], at.key(spec, "mtls")) if "mtls" in spec else None
    port_modes: dict[int, MtlsMode | None] = {}
    if "portLevelMtls" in spec and spec["portLevelMtls"] is not None:
        where = at.key(spec, "portLevelMtls")
        ports = spec["portLevelMtls"]
        if not isinstance(ports, dict):
            raise where.error(f"expected a mapping of port to mtls, got {_type_name(ports)}")
        if not ports:
            raise where.error("portLevelMtls, if present, must have at least one port")
        if not selector:
            # Istio's validation refuses it too: port-level settings only mean something for
            # the workloads a selector names.
            raise where.error(
                "a mesh- or namespace-wide PeerAuthentication (no selector) cannot have "
                "portLevelMtls; add spec.selector.matchLabels"
            )
        for port, body in ports.items():
            port_at = where.key(ports, port)
            port_at = _At(port_at.file, port_at.obj, f"{where.field}[{port}]", port_at.line)
            number = _port(port, port_at)
            if number in port_modes:
                raise port_at.error(f"port {number} is given more than once")
            port_modes[number] = _mtls_mode(body, port_at)
    return PeerAuthentication(
        namespace=namespace,
        name=name,
        selector=selector or None,
        mode=mode,
        port_level_mtls=port_modes,
        file=at.file,
        line=line,
    )


_SOURCE_FIELDS = {"principals", "notPrincipals", "namespaces", "notNamespaces"}
_SOURCE_UNSUPPORTED = {
    name: f"{name} {_NOT_SUPPORTED} (supported: {', '.join(sorted(_SOURCE_FIELDS))})"
    for name in (
        "requestPrincipals",
        "notRequestPrincipals",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
        "serviceAccounts",
        "notServiceAccounts",
    )
}
_OPERATION_FIELDS = {"ports", "notPorts", "paths", "notPaths", "methods", "notMethods"}
_OPERATION_UNSUPPORTED = {
    name: f"{name} {_NOT_SUPPORTED} (supported: {', '.join(sorted(_OPERATION_FIELDS))})"
    for name in ("hosts", "notHosts")
}


def _parse_source(raw: object, at: _At) -> Source:
    body = _mapping(raw, at, _SOURCE_FIELDS, _SOURCE_UNSUPPORTED)
    source = Source(
        principals=_strings(body, "principals", at, _principal_problem),
        not_principals=_strings(body, "notPrincipals", at, _principal_problem),
        namespaces=_strings(body, "namespaces", at, _namespace_value_problem),
        not_namespaces=_strings(body, "notNamespaces", at, _namespace_value_problem),
    )
    if source == Source():
        raise at.error("a source must set at least one of " + ", ".join(sorted(_SOURCE_FIELDS)))
    return source


def _parse_operation(raw: object, at: _At) -> Operation:
    body = _mapping(raw, at, _OPERATION_FIELDS, _OPERATION_UNSUPPORTED)
    operation = Operation(
        ports=_ports(body, "ports", at),
        not_ports=_ports(body, "notPorts", at),
        paths=_strings(body, "paths", at, _path_problem),
        not_paths=_strings(body, "notPaths", at, _path_problem),
        methods=_strings(body, "methods", at, _method_problem),
        not_methods=_strings(body, "notMethods", at, _method_problem),
    )
    if operation == Operation():
        raise at.error(
            "an operation must set at least one of " + ", ".join(sorted(_OPERATION_FIELDS))
        )
    return operation


def _parse_clauses(
    rule: Mapping[str, Any], key: str, inner: str, at: _At
) -> list[tuple[Mapping[str, Any], _At]]:
    """``from: [{source: ...}]`` / ``to: [{operation: ...}]``: the inner bodies."""
    if key not in rule:
        return []
    where = at.key(rule, key)
    items = _list(rule[key], where)
    if rule[key] is not None and not items:
        raise where.error(f"'{key}' must not be an empty list (leave it out to match any)")
    out = []
    for index, item in enumerate(items):
        item_at = where.item(items, index)
        if item is None:
            raise item_at.error(f"expected a mapping with '{inner}', got null")
        clause = _mapping(item, item_at, {inner})
        if clause.get(inner) is None:
            raise item_at.error(f"'{inner}' is missing")
        out.append((clause[inner], item_at.key(clause, inner)))
    return out


def _parse_rule(body: object, at: _At) -> Rule:
    if body is None:
        raise at.error("a rule must not be null (use {} for a rule that matches everything)")
    rule = _mapping(body, at, {"from", "to"}, {"when": f"when {_NOT_SUPPORTED}"})
    sources = tuple(
        _parse_source(s, s_at) for s, s_at in _parse_clauses(rule, "from", "source", at)
    )
    operations = tuple(
        _parse_operation(o, o_at) for o, o_at in _parse_clauses(rule, "to", "operation", at)
    )
    return Rule(sources=sources, operations=operations)


def _parse_authorization_policy(
    raw_spec: object, at: _At, namespace: str, name: str, line: int | None
) -> AuthorizationPolicy:
    spec = _mapping(
        raw_spec,
        at,
        {"selector", "action", "rules"},
        {
            "provider": f"provider (CUSTOM authorization) {_NOT_SUPPORTED}",
            "targetRef": f"targetRef {_NOT_SUPPORTED}; use selector.matchLabels",
            "targetRefs": f"targetRefs {_NOT_SUPPORTED}; use selector.matchLabels",
        },
    )
    selector = _selector(spec, at)
    action = Action.ALLOW
    if spec.get("action") is not None:
        where = at.key(spec, "action")
        text = _string(spec["action"], where)
        if text in ("AUDIT", "CUSTOM"):
            raise where.error(f"action {text} {_NOT_SUPPORTED} (supported: ALLOW, DENY)")
        try:
            action = Action(text)
        except ValueError:
            raise where.error(f"unknown action {_quote(text)} (expected ALLOW or DENY)") from None
    rules: list[Rule] = []
    if "rules" in spec:
        where = at.key(spec, "rules")
        items = _list(spec["rules"], where)
        rules = [_parse_rule(item, where.item(items, index)) for index, item in enumerate(items)]
    if action is Action.DENY and not rules:
        # Istio's validation refuses this too: it would deny nothing, which is never what the
        # author of a DENY policy meant.
        raise at.key(spec, "rules").error(
            "a DENY policy without rules would never deny anything; add an empty rule {} "
            "to deny every request"
        )
    return AuthorizationPolicy(
        namespace=namespace,
        name=name,
        selector=selector,
        action=action,
        rules=tuple(rules),
        file=at.file,
        line=line,
    )


# --- services of another mesh: ServiceEntry, DestinationRule --------------------------------

_SE_UNSUPPORTED = {
    "addresses": f"addresses (virtual IPs) {_NOT_SUPPORTED}; upstreams name the host",
    "workloadSelector": f"workloadSelector {_NOT_SUPPORTED}; list endpoints",
    "exportTo": f"exportTo {_NOT_SUPPORTED} (every entry is visible mesh-wide)",
    "trafficPolicy": "trafficPolicy is not a ServiceEntry field: put it in a DestinationRule "
    "whose host is this entry's host (trafficPolicy.tls.mode: ISTIO_MUTUAL)",
}
_SE_PROTOCOLS = ("HTTP", "HTTPS", "HTTP2", "GRPC", "TCP", "TLS")
_ENDPOINT_UNSUPPORTED = {
    "network": f"network {_NOT_SUPPORTED}",
    "locality": f"locality {_NOT_SUPPORTED}",
    "weight": f"weight {_NOT_SUPPORTED}",
}
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")


def _host(value: object, at: _At, *, wildcard: bool = True) -> str:
    text = _string(value, at)
    name = text[2:] if wildcard and text.startswith("*.") else text
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or _first_outside(name, _HOST_CHARS) is not None
        or any(
            not label or len(label) > 63 or label[0] == "-" or label[-1] == "-" for label in labels
        )
    ):
        form = "a lower-case DNS name" + (" or *.suffix" if wildcard else "")
        raise at.error(f"{_quote(text)} is not {form}")
    return text


def _san_list(container: Mapping[str, Any], at: _At) -> tuple[str, ...]:
    def problem(value: str) -> str | None:
        try:
            SpiffeId.parse(value)
        except InvalidSpiffeId as exc:
            return f"subjectAltNames are SPIFFE IDs here: {exc}"
        return None

    return _strings(container, "subjectAltNames", at, problem)


def _se_port(raw: object, at: _At) -> ServicePort:
    body = _mapping(raw, at, {"number", "name", "protocol", "targetPort"})
    if "number" not in body:
        raise at.error("ports[].number is missing")
    number = _port(body["number"], at.key(body, "number"))
    name = (
        _shared(
            check_dns_label,
            _string(body.get("name", ""), at.key(body, "name")),
            at.key(body, "name"),
        )
        if body.get("name")
        else f"port-{number}"
    )
    protocol = "TCP"
    if body.get("protocol") is not None:
        where = at.key(body, "protocol")
        protocol = _string(body["protocol"], where).upper()
        if protocol not in _SE_PROTOCOLS:
            raise where.error(
                f"protocol {_quote(protocol)} {_NOT_SUPPORTED} "
                f"(supported: {', '.join(_SE_PROTOCOLS)})"
            )
    target = (
        _port(body["targetPort"], at.key(body, "targetPort"))
        if body.get("targetPort") is not None
        else None
    )
    return ServicePort(number, name, protocol, target)


def _se_endpoint(raw: object, at: _At, resolution: str) -> ServiceEndpoint:
    body = _mapping(
        raw, at, {"address", "ports", "labels", "serviceAccount"}, _ENDPOINT_UNSUPPORTED
    )
    if body.get("address") is None:
        raise at.error("endpoints[].address is missing")
    where = at.key(body, "address")
    address = _string(body["address"], where)
    if resolution == "STATIC":
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise where.error(
                f"{_quote(address)} is not an IP address (resolution: STATIC)"
            ) from None
    else:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            _host(address, where, wildcard=False)
    ports: dict[str, int] = {}
    if body.get("ports") is not None:
        ports_at = at.key(body, "ports")
        raw_ports = body["ports"]
        if not isinstance(raw_ports, dict):
            raise ports_at.error(
                f"expected a mapping of port name to number, got {_type_name(raw_ports)}"
            )
        for key, value in raw_ports.items():
            ports[str(key)] = _port(value, ports_at.key(raw_ports, key))
    labels = (
        _labels(body.get("labels"), at.key(body, "labels"), what="labels")
        if "labels" in body
        else {}
    )
    account = None
    if body.get("serviceAccount") is not None:
        sa_at = at.key(body, "serviceAccount")
        account = _shared(check_dns_subdomain, _string(body["serviceAccount"], sa_at), sa_at)
    return ServiceEndpoint(address, ports, labels, account)


def _parse_service_entry(
    raw_spec: object, at: _At, namespace: str, name: str, line: int | None
) -> ServiceEntry:
    fields = {"hosts", "ports", "endpoints", "location", "resolution", "subjectAltNames"}
    spec = _mapping(raw_spec, at, fields, _SE_UNSUPPORTED)
    hosts_at = at.key(spec, "hosts")
    hosts_raw = _list(spec.get("hosts"), hosts_at)
    if not hosts_raw:
        raise hosts_at.error("a ServiceEntry needs at least one host")
    hosts = tuple(_host(h, hosts_at.item(hosts_raw, i)) for i, h in enumerate(hosts_raw))
    location = "MESH_EXTERNAL"  # Istio's default
    if spec.get("location") is not None:
        location = _string(spec["location"], at.key(spec, "location"))
    if location != "MESH_INTERNAL":
        raise at.key(spec, "location").error(
            f"location {_quote(location)} {_NOT_SUPPORTED}: services of another mesh are "
            "MESH_INTERNAL (mutual TLS with their identity)"
            + (" (location defaults to MESH_EXTERNAL)" if "location" not in spec else "")
        )
    resolution = "NONE"
    if spec.get("resolution") is not None:
        resolution = _string(spec["resolution"], at.key(spec, "resolution"))
    if resolution not in ("STATIC", "DNS"):
        raise at.key(spec, "resolution").error(
            f"resolution {_quote(resolution)} {_NOT_SUPPORTED} (supported: STATIC, DNS)"
            + (" (resolution defaults to NONE)" if "resolution" not in spec else "")
        )
    ports_at = at.key(spec, "ports")
    ports_raw = _list(spec.get("ports"), ports_at)
    if not ports_raw:
        raise ports_at.error("a ServiceEntry needs at least one port")
    ports = tuple(_se_port(p, ports_at.item(ports_raw, i)) for i, p in enumerate(ports_raw))
    numbers = [p.number for p in ports]
    for i, number in enumerate(numbers):
        if number in numbers[:i]:
            raise ports_at.item(ports_raw, i).error(f"port {number} is given more than once")
    endpoints_at = at.key(spec, "endpoints")
    endpoints_raw = _list(spec.get("endpoints"), endpoints_at)
    endpoints = tuple(
        _se_endpoint(e, endpoints_at.item(endpoints_raw, i), resolution)
        for i, e in enumerate(endpoints_raw)
    )
    if resolution == "STATIC" and not endpoints:
        raise endpoints_at.error("resolution: STATIC needs endpoints")
    if resolution == "DNS" and not endpoints and any(h.startswith("*") for h in hosts):
        raise endpoints_at.error("resolution: DNS with a wildcard host needs endpoints")
    sans = _san_list(spec, at)
    return ServiceEntry(namespace, name, hosts, ports, endpoints, resolution, sans, at.file, line)


_DR_UNSUPPORTED = {
    "subsets": f"subsets {_NOT_SUPPORTED}",
    "exportTo": f"exportTo {_NOT_SUPPORTED}",
    "workloadSelector": f"workloadSelector {_NOT_SUPPORTED}",
}
_TRAFFIC_UNSUPPORTED = {
    key: f"trafficPolicy.{key} {_NOT_SUPPORTED}"
    for key in (
        "loadBalancer",
        "connectionPool",
        "outlierDetection",
        "portLevelSettings",
        "tunnel",
        "proxyProtocol",
    )
}
_TLS_UNSUPPORTED = {
    key: f"tls.{key} {_NOT_SUPPORTED}: ISTIO_MUTUAL uses the workload's own certificate"
    for key in (
        "clientCertificate",
        "privateKey",
        "caCertificates",
        "credentialName",
        "insecureSkipVerify",
        "caCrl",
    )
}


def _parse_destination_rule(
    raw_spec: object, at: _At, namespace: str, name: str, line: int | None
) -> DestinationRule:
    spec = _mapping(raw_spec, at, {"host", "trafficPolicy"}, _DR_UNSUPPORTED)
    if spec.get("host") is None:
        raise at.key(spec, "host").error("a DestinationRule needs a host")
    host = _host(spec["host"], at.key(spec, "host"))
    mode: str | None = None
    sans: tuple[str, ...] = ()
    sni: str | None = None
    if spec.get("trafficPolicy") is not None:
        traffic_at = at.key(spec, "trafficPolicy")
        traffic = _mapping(spec["trafficPolicy"], traffic_at, {"tls"}, _TRAFFIC_UNSUPPORTED)
        if traffic.get("tls") is not None:
            tls_at = traffic_at.key(traffic, "tls")
            tls = _mapping(
                traffic["tls"], tls_at, {"mode", "subjectAltNames", "sni"}, _TLS_UNSUPPORTED
            )
            mode_at = tls_at.key(tls, "mode")
            mode = _string(tls.get("mode", ""), mode_at)
            if mode != "ISTIO_MUTUAL":
                raise mode_at.error(
                    f"tls mode {_quote(mode)} {_NOT_SUPPORTED} (supported: ISTIO_MUTUAL)"
                )
            sans = _san_list(tls, tls_at)
            if tls.get("sni") is not None:
                sni = _host(tls["sni"], tls_at.key(tls, "sni"), wildcard=False)
    return DestinationRule(namespace, name, host, mode, sans, sni, at.file, line)


def _parse_metadata(raw: Mapping[str, Any], at: _At) -> tuple[str, str]:
    """``(namespace, name)``; unknown metadata keys are ignored, as Kubernetes does."""
    if raw.get("metadata") is None:
        raise _At(at.file, at.obj, "metadata.name", at.line).error("metadata.name is missing")
    where = at.key(raw, "metadata")
    metadata = raw["metadata"]
    if not isinstance(metadata, dict):
        raise where.error(f"expected a mapping, got {_type_name(metadata)}")
    if metadata.get("name") is None:
        missing = _At(where.file, where.obj, "metadata.name", where.line)
        raise missing.error("metadata.name is missing")
    name_at = where.key(metadata, "name")
    name = _shared(check_dns_subdomain, _string(metadata["name"], name_at), name_at)
    namespace = DEFAULT_NAMESPACE
    if metadata.get("namespace") is not None:
        ns_at = where.key(metadata, "namespace")
        namespace = _shared(check_dns_label, _string(metadata["namespace"], ns_at), ns_at)
    if "labels" in metadata:
        labels_at = where.key(metadata, "labels")
        _shared(check_labels, _labels(metadata["labels"], labels_at, what="labels"), labels_at)
    if "annotations" in metadata:  # annotation values are free text
        _labels(metadata["annotations"], where.key(metadata, "annotations"), what="annotations")
    return namespace, name


_KINDS = (AUTHORIZATION_POLICY, PEER_AUTHENTICATION, SERVICE_ENTRY, DESTINATION_RULE)
_Object = PeerAuthentication | AuthorizationPolicy | ServiceEntry | DestinationRule


def _api_versions(kind: str) -> tuple[str, ...]:
    return NETWORKING_API_VERSIONS if kind in (SERVICE_ENTRY, DESTINATION_RULE) else API_VERSIONS


def _parse_object(raw: object, at: _At, *, in_list: bool = False) -> list[_Object]:
    """One document (or ``kind: List`` item): its policies."""
    if not isinstance(raw, dict):
        raise at.error(
            "expected a Kubernetes object (apiVersion, kind, metadata, spec), "
            f"got {_type_name(raw)}"
        )
    if raw.get("kind") is None:
        raise _At(at.file, at.obj, "kind", at.line).error("kind is missing")
    kind = _string(raw["kind"], at.key(raw, "kind"))
    if kind == "List":
        if in_list:
            raise at.key(raw, "kind").error("a List cannot contain another List")
        body = _mapping(raw, at, {"apiVersion", "kind", "items", "metadata"})
        where = at.key(body, "items")
        items = _list(body.get("items"), where)
        out: list[_Object] = []
        for index, item in enumerate(items):
            item_at = where.item(items, index)
            item_obj = _At(item_at.file, f"{at.obj}, {item_at.field}", "", item_at.line)
            out += _parse_object(item, item_obj, in_list=True)
        return out
    if kind not in _KINDS:
        raise at.key(raw, "kind").error(
            f"unknown kind {_quote(kind)} (supported: {', '.join(_KINDS)})"
        )
    at = at.naming(f"{kind} {at.obj}")
    body = _mapping(raw, at, {"apiVersion", "kind", "metadata", "spec", "status"})
    if body.get("apiVersion") is None:
        raise _At(at.file, at.obj, "apiVersion", at.line).error("apiVersion is missing")
    version_at = at.key(body, "apiVersion")
    version = _string(body["apiVersion"], version_at)
    if version not in _api_versions(kind):
        raise version_at.error(
            f"unsupported apiVersion {_quote(version)} for {kind} "
            f"(supported: {', '.join(_api_versions(kind))})"
        )
    namespace, name = _parse_metadata(body, at)
    line = at.line
    at = _At(at.file, f"{kind} {namespace}/{name}", "", line)
    spec = body.get("spec")
    spec_at = at.key(body, "spec") if "spec" in body else at
    spec_at = _At(spec_at.file, spec_at.obj, "spec", spec_at.line)
    if "spec" in body and spec is None:
        # Likely a spec whose indentation went wrong; an empty one must be written as {}.
        raise spec_at.error(
            "spec is null; write the spec's fields indented below it, or spec: {} for an "
            "empty spec"
            + (
                " (an AuthorizationPolicy with no rules denies every request)"
                if kind == AUTHORIZATION_POLICY
                else ""
            )
        )
    if kind == PEER_AUTHENTICATION:
        return [_parse_peer_authentication(spec, spec_at, namespace, name, line)]
    if kind == SERVICE_ENTRY:
        return [_parse_service_entry(spec, spec_at, namespace, name, line)]
    if kind == DESTINATION_RULE:
        return [_parse_destination_rule(spec, spec_at, namespace, name, line)]
    return [_parse_authorization_policy(spec, spec_at, namespace, name, line)]


def _documents(path: Path) -> list[tuple[int, object]]:
    """The documents of ``path``, read by the one config loader (duplicate keys, ``<<`` and
    oversized or too deeply nested input are refused there)."""
    try:
        return load_yaml_documents(path)
    except YamlError as exc:
        obj = f"document {exc.document}" if exc.document else ""
        raise PolicyError(path, obj, exc.field, exc.problem, line=exc.line) from None


def load_policy_files(paths: Sequence[Path]) -> PolicySet:
    """Read and validate every policy in ``paths``, all or nothing.

    Files may hold several YAML documents and ``kind: List`` objects; empty files and empty
    documents are fine. Order matters only among equally specific PeerAuthentications (the
    first loaded wins, standing in for Istio's oldest-wins). Raises :class:`PolicyError` for
    the first problem found in any file (unreadable file, bad YAML, unknown kind or field,
    wrong type, bad principal/port/mode/action, a duplicate kind+namespace+name, ...).
    """
    peer: list[PeerAuthentication] = []
    authz: list[AuthorizationPolicy] = []
    entries: list[ServiceEntry] = []
    rules: list[DestinationRule] = []
    seen: dict[tuple[str, str, str], tuple[Path, int | None]] = {}
    for path in map(Path, paths):
        for number, document in _documents(path):
            line = document.line if isinstance(document, LineMap | LineSeq) else None
            for policy in _parse_object(document, _At(path, f"document {number}", "", line)):
                kind = policy.obj.split(" ", 1)[0]
                key = (kind, policy.namespace, policy.name)
                if key in seen:
                    first_file, first_line = seen[key]
                    first = f"{first_file}" + (f", line {first_line}" if first_line else "")
                    raise PolicyError(
                        path,
                        policy.obj,
                        "metadata.name",
                        f"defined more than once (first in {first})",
                        line=policy.line,
                    )
                seen[key] = (path, policy.line)
                if isinstance(policy, PeerAuthentication):
                    peer.append(policy)
                elif isinstance(policy, AuthorizationPolicy):
                    authz.append(policy)
                elif isinstance(policy, ServiceEntry):
                    entries.append(policy)
                else:
                    rules.append(policy)
    return PolicySet(
        peer_authentications=tuple(peer),
        authorization_policies=tuple(authz),
        service_entries=tuple(entries),
        destination_rules=tuple(rules),
    )
