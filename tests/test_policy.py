"""Istio policies: strict loading, Istio's selection and precedence, and their Envoy RBAC form.

Compiled filters are checked three ways: they parse as Envoy's own protobufs (xds-protos),
they behave as Istio says when run through a small RBAC evaluator written here (exact,
prefix, suffix, safe_regex; and/or/not; DENY then ALLOW), and — in the slow test — the real
Envoy accepts them in ``--mode validate``.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrust.envoy.bootstrap import envoy_binary
from meshtrust.errors import InvalidInput
from meshtrust.policy import (
    HTTP_RBAC_FILTER,
    HTTP_RBAC_TYPE,
    NETWORK_RBAC_FILTER,
    NETWORK_RBAC_TYPE,
    InboundPolicy,
    MtlsMode,
    PolicyError,
    PolicySet,
    Protocol,
    WorkloadRef,
    load_policy_files,
)
from meshtrust.spiffe import SpiffeId

TD = "example.org"
A = "spiffe://example.org/ns/default/sa/a"
C = "spiffe://example.org/ns/default/sa/c"
OTHER_NS = "spiffe://example.org/ns/other/sa/a"
FOREIGN = "spiffe://elsewhere.net/ns/default/sa/a"


# --- helpers ------------------------------------------------------------------------------------


def workload(
    name: str = "b",
    namespace: str = "default",
    *,
    port: int = 8080,
    protocol: Protocol = Protocol.HTTP,
    labels: Mapping[str, str] | None = None,
) -> WorkloadRef:
    return WorkloadRef(
        name=name,
        namespace=namespace,
        spiffe_id=SpiffeId.for_workload(TD, namespace, name),
        app_port=port,
        protocol=protocol,
        labels={"app": name} if labels is None else dict(labels),
    )


def pa(
    namespace: str,
    name: str = "default",
    *,
    mode: str | None = None,
    selector: Mapping[str, str] | None = None,
    ports: Mapping[int, str | None] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if selector is not None:
        spec["selector"] = {"matchLabels": dict(selector)}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if ports is not None:
        spec["portLevelMtls"] = {
            port: ({} if m is None else {"mode": m}) for port, m in ports.items()
        }
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def ap(namespace: str, name: str, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
    }
    if spec is not None:
        doc["spec"] = dict(spec)
    return doc


def write(path: Path, *docs: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False))
    return path


def load(tmp_path: Path, *docs: Mapping[str, Any]) -> PolicySet:
    return load_policy_files([write(tmp_path / "policies.yaml", *docs)])


def parse_envoy_filter(entry: Mapping[str, Any]) -> Any:
    """``entry`` as Envoy's own RBAC message; unknown field names or enum values raise."""
    typed = dict(entry["typed_config"])
    type_url = typed.pop("@type")
    if entry["name"] == NETWORK_RBAC_FILTER:
        assert type_url == NETWORK_RBAC_TYPE
        message: Any = network_rbac_pb2.RBAC()
    else:
        assert entry["name"] == HTTP_RBAC_FILTER
        assert type_url == HTTP_RBAC_TYPE
        message = http_rbac_pb2.RBAC()
    json_format.ParseDict(typed, message)
    # What ParseDict cannot see but Envoy's validation refuses: empty permission/principal lists.
    for policy in message.rules.policies.values():
        assert len(policy.permissions) >= 1 and len(policy.principals) >= 1
    return message


def inbound(policies: PolicySet, wl: WorkloadRef, root: str = "istio-system") -> InboundPolicy:
    """``inbound_for`` plus the checks every compiled result must pass."""
    result = policies.inbound_for(wl, root_namespace=root, trust_domain=TD)
    actions = []
    for entry in result.rbac_filters:
        expected = NETWORK_RBAC_FILTER if wl.protocol is Protocol.TCP else HTTP_RBAC_FILTER
        assert entry["name"] == expected
        parse_envoy_filter(entry)
        actions.append(entry["typed_config"]["rules"]["action"])
    assert actions in ([], ["DENY"], ["ALLOW"], ["DENY", "ALLOW"])
    json.dumps(result.rbac_filters)  # plain JSON data, ready for a bootstrap file
    return result


# --- a tiny Envoy RBAC evaluator -----------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What RBAC sees: the peer's principal (None for plaintext), and for HTTP path and method."""

    principal: str | None = None
    path: str = "/"
    method: str = "GET"


def string_matches(matcher: Mapping[str, Any], value: str) -> bool:
    (kind,) = matcher.keys()
    if kind == "exact":
        return bool(value == matcher["exact"])
    if kind == "prefix":
        assert matcher["prefix"], "Envoy refuses an empty prefix"
        return value.startswith(matcher["prefix"])
    if kind == "suffix":
        assert matcher["suffix"], "Envoy refuses an empty suffix"
        return value.endswith(matcher["suffix"])
    if kind == "safe_regex":
        # Envoy's safe_regex is RE2 and must match the whole value.
        return re.fullmatch(matcher["safe_regex"]["regex"], value) is not None
    raise AssertionError(f"unexpected string matcher {matcher}")


def principal_matches(principal: Mapping[str, Any], request: Request) -> bool:
    (kind,) = principal.keys()
    if kind == "any":
        return bool(principal["any"])
    if kind == "and_ids":
        return all(principal_matches(p, request) for p in principal["and_ids"]["ids"])
    if kind == "or_ids":
        return any(principal_matches(p, request) for p in principal["or_ids"]["ids"])
    if kind == "not_id":
        return not principal_matches(principal["not_id"], request)
    if kind == "authenticated":
        # No TLS (plaintext in PERMISSIVE): "authenticated" never matches.
        return request.principal is not None and string_matches(
            principal["authenticated"]["principal_name"], request.principal
        )
    raise AssertionError(f"unexpected principal {principal}")


def permission_matches(permission: Mapping[str, Any], request: Request) -> bool:
    (kind,) = permission.keys()
    if kind == "any":
        return bool(permission["any"])
    if kind == "and_rules":
        return all(permission_matches(p, request) for p in permission["and_rules"]["rules"])
    if kind == "or_rules":
        return any(permission_matches(p, request) for p in permission["or_rules"]["rules"])
    if kind == "not_rule":
        return not permission_matches(permission["not_rule"], request)
    if kind == "url_path":
        return string_matches(permission["url_path"]["path"], request.path)
    if kind == "header":
        header = permission["header"]
        assert header["name"] == ":method"
        if header.get("present_match"):
            return True
        return string_matches(header["string_match"], request.method)
    raise AssertionError(f"unexpected permission {permission}")


def matched_policies(entry: Mapping[str, Any], request: Request) -> list[str]:
    policies = entry["typed_config"]["rules"].get("policies", {})
    return [
        name
        for name, policy in policies.items()
        if any(permission_matches(p, request) for p in policy["permissions"])
        and any(principal_matches(p, request) for p in policy["principals"])
    ]


def allowed(filters: Sequence[Mapping[str, Any]], request: Request) -> bool:
    """Envoy's chain of RBAC filters: DENY denies on a match, ALLOW denies on no match."""
    for entry in filters:
        action = entry["typed_config"]["rules"]["action"]
        matched = bool(matched_policies(entry, request))
        if (action == "DENY" and matched) or (action == "ALLOW" and not matched):
            return False
    return True


# --- loading: errors name the file, the object and the field ------------------------------------

GOOD_AP = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-a
  namespace: default
spec:
  rules:
  - from:
    - source:
        principals: ["example.org/ns/default/sa/a"]
"""


def ap_with_source(source: str) -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-a
  namespace: default
spec:
  rules:
  - from:
    - source:
        {source}
"""


LOAD_ERRORS = [
    # (id, yaml, obj, field, line, words in the problem)
    (
        "bad-yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: [x\n",
        "document 1",
        "",
        4,
        "not valid YAML",
    ),
    (
        "bad-yaml-second-document",
        GOOD_AP + "---\nkind: PeerAuthentication\n  spec: 1\n",
        "document 2",
        "",
        13,
        "not valid YAML",
    ),
    (
        "duplicate-yaml-key",
        GOOD_AP + "  action: ALLOW\n  action: DENY\n",
        "document 1",
        "spec.action",
        12,
        "duplicate key 'action'",
    ),
    ("not-a-mapping", "- a\n- b\n", "document 1", "", 1, "expected a Kubernetes object"),
    (
        "unknown-kind",
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: x}\n",
        "document 1",
        "kind",
        2,
        "unknown kind 'RequestAuthentication'",
    ),
    (
        "missing-kind",
        "apiVersion: security.istio.io/v1\nmetadata: {name: x}\n",
        "document 1",
        "kind",
        1,
        "kind is missing",
    ),
    (
        "unsupported-api-version",
        GOOD_AP.replace("security.istio.io/v1", "security.istio.io/v1alpha1"),
        "AuthorizationPolicy document 1",
        "apiVersion",
        1,
        "unsupported apiVersion 'security.istio.io/v1alpha1'",
    ),
    (
        "missing-name",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: a}\n",
        "PeerAuthentication document 1",
        "metadata.name",
        3,
        "metadata.name is missing",
    ),
    (
        "bad-name",
        GOOD_AP.replace("name: allow-a", "name: Allow_A"),
        "AuthorizationPolicy document 1",
        "metadata.name",
        4,
        "'Allow_A' is not a DNS name",
    ),
    (
        "unknown-top-level-field",
        GOOD_AP + "specs: {}\n",
        "AuthorizationPolicy document 1",
        "specs",
        11,
        "unknown field 'specs'",
    ),
    (
        "unknown-spec-field",
        GOOD_AP + "  rule: []\n",
        "AuthorizationPolicy default/allow-a",
        "spec.rule",
        11,
        "unknown field 'rule' (known fields: action, rules, selector)",
    ),
    (
        "unknown-source-field",
        ap_with_source('principal: ["example.org/ns/default/sa/a"]'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.principal",
        10,
        "unknown field 'principal'",
    ),
    (
        "wrong-type",
        ap_with_source('principals: "example.org/ns/default/sa/a"'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.principals",
        10,
        "expected a list, got a string",
    ),
    (
        "bad-principal-star-in-the-middle",
        ap_with_source('principals: ["example.org/ns/default/sa/a", "example.org/*/sa/a"]'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.principals[1]",
        10,
        "invalid principal 'example.org/*/sa/a'",
    ),
    (
        "bad-principal-with-scheme",
        ap_with_source('principals: ["spiffe://example.org/ns/default/sa/a"]'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.principals[0]",
        10,
        "without 'spiffe://'",
    ),
    (
        "bad-principal-not-istio-form",
        ap_with_source('principals: ["default/sa/a"]'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.principals[0]",
        10,
        "<trust-domain>/ns/<namespace>/sa/<service-account>",
    ),
    (
        "bad-principal-upper-case-trust-domain",
        ap_with_source('notPrincipals: ["Example.org/ns/default/sa/a"]'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.notPrincipals[0]",
        10,
        "upper-case",
    ),
    (
        "bad-principal-two-stars",
        ap_with_source('principals: ["*/ns/default/*"]'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.principals[0]",
        10,
        "'*' may only be",
    ),
    (
        "empty-principal",
        ap_with_source('principals: [""]'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.principals[0]",
        10,
        "must not be empty",
    ),
    (
        "bad-namespace-value",
        ap_with_source('namespaces: ["a/b"]'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.namespaces[0]",
        10,
        "invalid namespace 'a/b'",
    ),
    (
        "unsupported-source-field",
        ap_with_source('ipBlocks: ["10.0.0.0/8"]'),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source.ipBlocks",
        10,
        "ipBlocks is not supported",
    ),
    (
        "empty-source",
        ap_with_source("{}"),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from[0].source",
        9,
        "must set at least one of",
    ),
    (
        "unknown-mtls-mode",
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: prod}\nspec:\n  mtls:\n    mode: strict\n",
        "PeerAuthentication prod/default",
        "spec.mtls.mode",
        6,
        "unknown mTLS mode 'strict' (expected one of UNSET, STRICT, PERMISSIVE, DISABLE)",
    ),
    (
        "unknown-port-level-mode",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: pay, namespace: prod}\nspec:\n  selector: {matchLabels: {app: pay}}\n"
        "  portLevelMtls:\n    8080: {mode: MUTUAL}\n",
        "PeerAuthentication prod/pay",
        "spec.portLevelMtls[8080].mode",
        7,
        "unknown mTLS mode 'MUTUAL'",
    ),
    (
        "port-level-mtls-without-selector",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: prod}\nspec:\n  portLevelMtls:\n"
        "    8080: {mode: DISABLE}\n",
        "PeerAuthentication prod/default",
        "spec.portLevelMtls",
        5,
        "cannot have portLevelMtls",
    ),
    (
        "port-level-port-zero",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: pay, namespace: prod}\nspec:\n  selector: {matchLabels: {app: pay}}\n"
        "  portLevelMtls:\n    0: {mode: DISABLE}\n",
        "PeerAuthentication prod/pay",
        "spec.portLevelMtls[0]",
        7,
        "port 0 is not in 1-65535",
    ),
    (
        "bad-port-too-big",
        GOOD_AP + '    to:\n    - operation:\n        ports: ["8080", "70000"]\n',
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].to[0].operation.ports[1]",
        13,
        "port 70000 is not in 1-65535",
    ),
    (
        "bad-port-name",
        GOOD_AP + "    to:\n    - operation:\n        notPorts: [http]\n",
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].to[0].operation.notPorts[0]",
        13,
        "expected a port number, got a string ('http')",
    ),
    (
        "bad-path",
        GOOD_AP + '    to:\n    - operation:\n        paths: ["/api/*/x"]\n',
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].to[0].operation.paths[0]",
        13,
        "invalid path '/api/*/x'",
    ),
    (
        "unsupported-hosts",
        GOOD_AP + "    to:\n    - operation:\n        hosts: [example.com]\n",
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].to[0].operation.hosts",
        13,
        "hosts is not supported",
    ),
    (
        "unsupported-when",
        GOOD_AP + "    when:\n    - key: request.headers[x]\n      values: [y]\n",
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].when",
        11,
        "when is not supported",
    ),
    (
        "empty-from",
        GOOD_AP.replace(
            '  - from:\n    - source:\n        principals: ["example.org/ns/default/sa/a"]\n',
            "  - from: []\n",
        ),
        "AuthorizationPolicy default/allow-a",
        "spec.rules[0].from",
        8,
        "must not be an empty list",
    ),
    (
        "audit-unsupported",
        GOOD_AP + "  action: AUDIT\n",
        "AuthorizationPolicy default/allow-a",
        "spec.action",
        11,
        "action AUDIT is not supported by meshtrust",
    ),
    (
        "custom-unsupported",
        GOOD_AP + "  action: CUSTOM\n",
        "AuthorizationPolicy default/allow-a",
        "spec.action",
        11,
        "action CUSTOM is not supported",
    ),
    (
        "unknown-action",
        GOOD_AP + "  action: REJECT\n",
        "AuthorizationPolicy default/allow-a",
        "spec.action",
        11,
        "unknown action 'REJECT'",
    ),
    (
        "deny-without-rules",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-all, namespace: default}\nspec:\n  action: DENY\n",
        "AuthorizationPolicy default/deny-all",
        "spec.rules",
        4,
        "add an empty rule {}",
    ),
    (
        "null-rule",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: x, namespace: default}\nspec:\n  rules:\n  -\n",
        "AuthorizationPolicy default/x",
        "spec.rules[0]",
        6,
        "must not be null",
    ),
    (
        "selector-wildcard",
        GOOD_AP + "  selector:\n    matchLabels: {app: '*'}\n",
        "AuthorizationPolicy default/allow-a",
        "spec.selector.matchLabels.app",
        12,
        "wildcards are not supported",
    ),
    (
        "list-item-error",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n"
        "  kind: PeerAuthentication\n  metadata: {name: x, namespace: a}\n"
        "  spec: {mtls: {mode: MAYBE}}\n",
        "PeerAuthentication a/x",
        "spec.mtls.mode",
        7,
        "unknown mTLS mode 'MAYBE'",
    ),
]


@pytest.mark.parametrize(
    ("text", "obj", "field", "line", "problem"),
    [pytest.param(*case[1:], id=case[0]) for case in LOAD_ERRORS],
)
def test_load_errors_name_file_object_and_field(
    tmp_path: Path, text: str, obj: str, field: str, line: int, problem: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy_files([path])
    error = info.value
    assert isinstance(error, InvalidInput)
    assert (error.file, error.obj, error.field, error.line) == (path, obj, field, line)
    message = str(error)
    assert problem in message
    assert str(path) in message and obj in message and field in message
    assert message.startswith(f"{path}:{line}: ")
    assert "Traceback" not in message


def test_duplicate_policy_across_files_names_both(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text(GOOD_AP)
    second = tmp_path / "b.yaml"
    second.write_text("# the same policy again\n" + GOOD_AP)
    with pytest.raises(PolicyError) as info:
        load_policy_files([first, second])
    error = info.value
    assert (error.file, error.obj, error.field) == (
        second,
        "AuthorizationPolicy default/allow-a",
        "metadata.name",
    )
    assert f"first in {first}, line 1" in str(error)
    # The same name in another kind or namespace is a different object.
    other = tmp_path / "c.yaml"
    other.write_text(GOOD_AP.replace("namespace: default", "namespace: prod"))
    write(tmp_path / "d.yaml", pa("default", "allow-a"))
    loaded = load_policy_files([first, other, tmp_path / "d.yaml"])
    assert len(loaded.authorization_policies) == 2 and len(loaded.peer_authentications) == 1


def test_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyError, match="cannot be read") as info:
        load_policy_files([missing])
    assert info.value.file == missing
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy_files([binary])


def test_one_bad_file_applies_nothing(tmp_path: Path) -> None:
    """All or nothing: the caller gets an error, not a half-loaded set, and keeps its old one."""
    good = tmp_path / "good.yaml"
    good.write_text(GOOD_AP)
    previous = load_policy_files([good])
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD_AP.replace("allow-a", "allow-b") + "  action: AUDIT\n")
    with pytest.raises(PolicyError):
        load_policy_files([good, bad])
    assert [p.name for p in previous.authorization_policies] == ["allow-a"]


def test_accepted_forms(tmp_path: Path) -> None:
    """Empty files and documents, v1beta1, kind: List, ports as integers, ignored metadata."""
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# nothing yet\n---\n---\n")
    (tmp_path / "mixed.yaml").write_text(
        """\
apiVersion: v1
kind: List
items:
- apiVersion: security.istio.io/v1beta1
  kind: PeerAuthentication
  metadata:
    name: default
    namespace: istio-system
    uid: 0b8a   # unknown metadata keys are ignored, as Kubernetes does
    creationTimestamp: "2024-01-01T00:00:00Z"
    labels: {team: sec}
  spec:
    mtls: {mode: STRICT}
  status: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ports, namespace: prod}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: [8080, "9090"], notPaths: ["/healthz"]}}]
  - {}
"""
    )
    loaded = load_policy_files(
        [tmp_path / "empty.yaml", tmp_path / "comments.yaml", tmp_path / "mixed.yaml"]
    )
    (mesh,) = loaded.peer_authentications
    assert (mesh.namespace, mesh.name, mesh.mode, mesh.selector) == (
        "istio-system",
        "default",
        MtlsMode.STRICT,
        None,
    )
    nothing, ports = loaded.authorization_policies
    # No namespace: Kubernetes' default namespace; no spec: an ALLOW policy with no rules.
    assert (nothing.namespace, nothing.action.value, nothing.rules) == ("default", "ALLOW", ())
    assert ports.rules[0].operations[0].ports == (8080, 9090)
    assert ports.rules[1].sources == () and ports.rules[1].operations == ()
    assert load_policy_files([]) == PolicySet()


# --- PeerAuthentication: which mode a workload gets -----------------------------------------------

MESH_STRICT = pa("istio-system", mode="STRICT")
PAY = {"app": "pay", "version": "v1"}

MODE_CASES = [
    # (id, policies, workload, expected mode)
    ("default-is-permissive", [], workload(), MtlsMode.PERMISSIVE),
    ("mesh-wide", [MESH_STRICT], workload(namespace="prod"), MtlsMode.STRICT),
    (
        "namespace-overrides-mesh",
        [MESH_STRICT, pa("legacy", mode="PERMISSIVE")],
        workload(namespace="legacy"),
        MtlsMode.PERMISSIVE,
    ),
    (
        "other-namespace-policy-does-not-apply",
        [MESH_STRICT, pa("legacy", mode="DISABLE")],
        workload(namespace="prod"),
        MtlsMode.STRICT,
    ),
    (
        "workload-overrides-namespace",
        [pa("prod", mode="STRICT"), pa("prod", "pay", mode="DISABLE", selector={"app": "pay"})],
        workload("pay", "prod", labels=PAY),
        MtlsMode.DISABLE,
    ),
    (
        "selector-must-match-all-labels",
        [
            pa("prod", mode="STRICT"),
            pa("prod", "pay", mode="DISABLE", selector={"app": "pay", "version": "v2"}),
        ],
        workload("pay", "prod", labels=PAY),
        MtlsMode.STRICT,
    ),
    (
        "selector-in-another-namespace-does-not-apply",
        [pa("dev", "pay", mode="DISABLE", selector={"app": "pay"})],
        workload("pay", "prod", labels=PAY),
        MtlsMode.PERMISSIVE,
    ),
    (
        "selector-in-root-namespace-is-ignored",
        [MESH_STRICT, pa("istio-system", "pay", mode="DISABLE", selector={"app": "pay"})],
        workload("pay", "prod", labels=PAY),
        MtlsMode.STRICT,
    ),
    (
        "unset-workload-inherits-namespace",
        [MESH_STRICT, pa("prod", mode="DISABLE"), pa("prod", "pay", selector={"app": "pay"})],
        workload("pay", "prod", labels=PAY),
        MtlsMode.DISABLE,
    ),
    (
        "explicit-unset-namespace-inherits-mesh",
        [MESH_STRICT, pa("prod", mode="UNSET")],
        workload(namespace="prod"),
        MtlsMode.STRICT,
    ),
    (
        "unset-everywhere-is-permissive",
        [pa("istio-system", mode="UNSET"), pa("prod")],
        workload(namespace="prod"),
        MtlsMode.PERMISSIVE,
    ),
    (
        "port-level-for-the-app-port",
        [pa("prod", "pay", mode="STRICT", selector={"app": "pay"}, ports={8080: "PERMISSIVE"})],
        workload("pay", "prod", labels=PAY),
        MtlsMode.PERMISSIVE,
    ),
    (
        "port-level-for-another-port",
        [pa("prod", "pay", mode="STRICT", selector={"app": "pay"}, ports={9090: "DISABLE"})],
        workload("pay", "prod", labels=PAY),
        MtlsMode.STRICT,
    ),
    (
        "port-level-unset-inherits-workload-level-result",
        [
            pa("prod", mode="DISABLE"),
            pa("prod", "pay", selector={"app": "pay"}, ports={8080: None}),
        ],
        workload("pay", "prod", labels=PAY),
        MtlsMode.DISABLE,
    ),
    (
        "port-level-beats-namespace-and-mesh",
        [
            MESH_STRICT,
            pa("prod", mode="STRICT"),
            pa("prod", "pay", selector={"app": "pay"}, ports={8080: "DISABLE"}),
        ],
        workload("pay", "prod", labels=PAY),
        MtlsMode.DISABLE,
    ),
    (
        "first-loaded-workload-policy-wins",
        [
            pa("prod", "pay-a", mode="DISABLE", selector={"app": "pay"}),
            pa("prod", "pay-b", mode="STRICT", selector={"version": "v1"}),
        ],
        workload("pay", "prod", labels=PAY),
        MtlsMode.DISABLE,
    ),
    (
        # The oldest (first) workload policy is chosen even when its mode is UNSET: Istio
        # picks the policy first, then resolves UNSET from the parent level.
        "first-loaded-wins-even-if-unset",
        [
            pa("prod", "pay-a", selector={"app": "pay"}),
            pa("prod", "pay-b", mode="DISABLE", selector={"app": "pay"}),
        ],
        workload("pay", "prod", labels=PAY),
        MtlsMode.PERMISSIVE,
    ),
    (
        "first-loaded-namespace-policy-wins",
        [pa("prod", "one", mode="STRICT"), pa("prod", "two", mode="DISABLE")],
        workload(namespace="prod"),
        MtlsMode.STRICT,
    ),
    (
        "workload-in-the-root-namespace-gets-the-mesh-policy",
        [MESH_STRICT],
        workload("gw", "istio-system"),
        MtlsMode.STRICT,
    ),
]


@pytest.mark.parametrize(
    ("policies", "wl", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in MODE_CASES],
)
def test_mtls_mode_selection(
    tmp_path: Path, policies: list[dict[str, Any]], wl: WorkloadRef, expected: MtlsMode
) -> None:
    loaded = load(tmp_path, *policies) if policies else PolicySet()
    assert inbound(loaded, wl).mode is expected


def test_root_namespace_is_configurable(tmp_path: Path) -> None:
    loaded = load(tmp_path, pa("mesh-root", mode="STRICT"), pa("istio-system", mode="DISABLE"))
    wl = workload(namespace="prod")
    assert inbound(loaded, wl, root="mesh-root").mode is MtlsMode.STRICT
    assert inbound(loaded, wl).mode is MtlsMode.DISABLE


# --- AuthorizationPolicy: selection, precedence and Istio's matching ----------------------------


def allow_from(*principals: str, **source: Any) -> dict[str, Any]:
    src = {"principals": list(principals), **source} if principals else dict(source)
    return {"rules": [{"from": [{"source": src}]}]}


PLAIN = Request(principal=None)

RBAC_CASES: list[tuple[str, list[dict[str, Any]], WorkloadRef, list[tuple[Request, bool]]]] = [
    # (id, policies, workload, [(request, allowed?)])
    ("no-policy-allows-all", [], workload(), [(Request(C), True), (PLAIN, True)]),
    (
        "allow-exact-principal",
        [ap("default", "allow-a", allow_from("example.org/ns/default/sa/a"))],
        workload(),
        [(Request(A), True), (Request(C), False), (PLAIN, False), (Request(FOREIGN), False)],
    ),
    (
        "allow-policy-without-rules-denies-all",
        [ap("default", "allow-nothing", {})],
        workload(),
        [(Request(A), False), (PLAIN, False)],
    ),
    (
        "allow-nothing-plus-another-allow",
        [
            ap("default", "allow-nothing"),
            ap("default", "allow-a", allow_from("example.org/ns/default/sa/a")),
        ],
        workload(),
        [(Request(A), True), (Request(C), False)],
    ),
    (
        "empty-rule-allows-all",
        [ap("default", "allow-all", {"rules": [{}]})],
        workload(),
        [(Request(C), True), (PLAIN, True)],
    ),
    (
        "deny-before-allow",
        [
            ap("default", "allow-all", {"rules": [{}]}),
            ap(
                "default",
                "deny-c",
                {"action": "DENY", **allow_from("example.org/ns/default/sa/c")},
            ),
        ],
        workload(),
        [(Request(A), True), (Request(C), False), (PLAIN, True)],
    ),
    (
        "deny-only-allows-the-rest",
        [ap("default", "deny-c", {"action": "DENY", **allow_from("example.org/ns/default/sa/c")})],
        workload(),
        [(Request(A), True), (Request(C), False), (PLAIN, True)],
    ),
    (
        "deny-empty-rule-denies-all",
        [
            ap("default", "allow-a", allow_from("example.org/ns/default/sa/a")),
            ap("default", "deny-all", {"action": "DENY", "rules": [{}]}),
        ],
        workload(),
        [(Request(A), False), (PLAIN, False)],
    ),
    (
        "principal-prefix",
        [ap("default", "allow", allow_from("example.org/ns/default/*"))],
        workload(),
        [(Request(A), True), (Request(C), True), (Request(OTHER_NS), False)],
    ),
    (
        "principal-suffix",
        [ap("default", "allow", allow_from("*/sa/a"))],
        workload(),
        [(Request(A), True), (Request(OTHER_NS), True), (Request(FOREIGN), True)]
        + [(Request(C), False), (Request("spiffe://example.org/ns/x/sa/ba"), False)],
    ),
    (
        "principal-star-is-any-authenticated-peer",
        [ap("default", "allow", allow_from("*"))],
        workload(),
        [(Request(A), True), (Request(FOREIGN), True), (PLAIN, False)],
    ),
    (
        "cluster-local-means-the-mesh-trust-domain",
        [
            ap("default", "allow", allow_from("cluster.local/ns/default/sa/a")),
            ap("default", "allow-prefix", allow_from("cluster.local/ns/other/sa/*")),
        ],
        workload(),
        [(Request(A), True), (Request(OTHER_NS), True), (Request(C), False)]
        + [(Request("spiffe://cluster.local/ns/default/sa/a"), False)],
    ),
    (
        "not-principals",
        [
            ap(
                "default",
                "allow",
                {"rules": [{"from": [{"source": {"notPrincipals": ["*/sa/c"]}}]}]},
            )
        ],
        workload(),
        # Plaintext has no principal, so it is "not c" — as in Istio (use principals: ["*"]).
        [(Request(A), True), (Request(C), False), (PLAIN, True)],
    ),
    (
        "namespaces",
        [ap("default", "allow", allow_from(namespaces=["other"]))],
        workload(),
        [(Request(OTHER_NS), True), (Request(A), False), (PLAIN, False)],
    ),
    (
        "namespaces-with-wildcard",
        [ap("default", "allow", allow_from(namespaces=["oth*"]))],
        workload(),
        [(Request(OTHER_NS), True), (Request(A), False)],
    ),
    (
        "not-namespaces-deny",
        [ap("default", "deny", {"action": "DENY", **allow_from(notNamespaces=["default"])})],
        workload(),
        [(Request(A), True), (Request(OTHER_NS), False)],
    ),
    (
        "fields-in-a-source-are-anded",
        [
            ap(
                "default",
                "allow",
                allow_from("*/sa/a", namespaces=["default"]),
            )
        ],
        workload(),
        [(Request(A), True), (Request(OTHER_NS), False), (Request(C), False)],
    ),
    (
        "sources-are-ored",
        [
            ap(
                "default",
                "allow",
                {
                    "rules": [
                        {
                            "from": [
                                {"source": {"principals": ["example.org/ns/default/sa/c"]}},
                                {"source": {"namespaces": ["other"]}},
                            ]
                        }
                    ]
                },
            )
        ],
        workload(),
        [(Request(C), True), (Request(OTHER_NS), True), (Request(A), False)],
    ),
    (
        "port-matching-the-app-port-is-dropped",
        [
            ap(
                "default",
                "allow",
                {
                    "rules": [
                        {
                            "from": [{"source": {"principals": ["*"]}}],
                            "to": [{"operation": {"ports": ["8080", "9090"]}}],
                        }
                    ]
                },
            )
        ],
        workload(),
        [(Request(A), True), (PLAIN, False)],
    ),
    (
        "port-not-matching-never-matches",
        [ap("default", "allow", {"rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]})],
        workload(),
        [(Request(A), False), (PLAIN, False)],
    ),
    (
        "not-ports-with-the-app-port-never-matches",
        [
            ap(
                "default",
                "deny",
                {"action": "DENY", "rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]},
            )
        ],
        workload(),
        [(Request(A), True), (PLAIN, True)],
    ),
    (
        "deny-on-another-port-does-not-deny",
        [
            ap(
                "default",
                "deny",
                {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [9090]}}]}]},
            )
        ],
        workload(),
        [(Request(A), True)],
    ),
    (
        "paths-and-methods",
        [
            ap(
                "default",
                "allow",
                {
                    "rules": [
                        {
                            "from": [{"source": {"principals": ["*"]}}],
                            "to": [
                                {"operation": {"methods": ["GET", "HEAD"], "paths": ["/api/*"]}},
                                {"operation": {"methods": ["POST"], "paths": ["/submit"]}},
                                {"operation": {"paths": ["*.css"]}},
                            ],
                        }
                    ]
                },
            )
        ],
        workload(),
        [
            (Request(A, "/api/v1", "GET"), True),
            (Request(A, "/api/v1", "HEAD"), True),
            (Request(A, "/api/v1", "DELETE"), False),
            (Request(A, "/submit", "POST"), True),
            (Request(A, "/submit/x", "POST"), False),
            (Request(A, "/style/site.css", "PUT"), True),
            (Request(A, "/admin", "GET"), False),
            (Request(None, "/api/v1", "GET"), False),
        ],
    ),
    (
        "not-paths-and-not-methods",
        [
            ap(
                "default",
                "deny",
                {
                    "action": "DENY",
                    "rules": [
                        {"to": [{"operation": {"notPaths": ["/public/*"], "notMethods": ["GET"]}}]}
                    ],
                },
            )
        ],
        workload(),
        [
            (Request(A, "/public/x", "POST"), True),
            (Request(A, "/private", "GET"), True),
            (Request(A, "/private", "POST"), False),
        ],
    ),
    (
        "method-star-and-path-star",
        [
            ap(
                "default",
                "allow",
                {"rules": [{"to": [{"operation": {"methods": ["*"], "paths": ["*"]}}]}]},
            )
        ],
        workload(),
        [(Request(A, "/x", "PATCH"), True), (PLAIN, True)],
    ),
    (
        "rules-are-ored-from-and-to-anded",
        [
            ap(
                "default",
                "allow",
                {
                    "rules": [
                        {
                            "from": [{"source": {"principals": ["example.org/ns/default/sa/a"]}}],
                            "to": [{"operation": {"methods": ["GET"]}}],
                        },
                        {"from": [{"source": {"namespaces": ["other"]}}]},
                    ]
                },
            )
        ],
        workload(),
        [
            (Request(A, method="GET"), True),
            (Request(A, method="POST"), False),
            (Request(OTHER_NS, method="POST"), True),
            (Request(C, method="GET"), False),
        ],
    ),
    (
        "root-namespace-policy-applies-everywhere",
        [ap("istio-system", "deny-c", {"action": "DENY", **allow_from("*/sa/c")})],
        workload("pay", "prod"),
        [(Request(C), False), (Request(A), True)],
    ),
    (
        "root-namespace-selector-narrows",
        [
            ap(
                "istio-system",
                "deny-c",
                {
                    "action": "DENY",
                    "selector": {"matchLabels": {"app": "web"}},
                    **allow_from("*/sa/c"),
                },
            )
        ],
        workload("pay", "prod"),
        [(Request(C), True)],
    ),
    (
        "other-namespace-policy-does-not-apply",
        [ap("dev", "allow-nothing")],
        workload("pay", "prod"),
        [(Request(A), True)],
    ),
    (
        "selector-must-match",
        [
            ap("default", "web-only", {"selector": {"matchLabels": {"app": "web"}}}),
            ap("default", "b-only", {"selector": {"matchLabels": {"app": "b"}}, **allow_from("*")}),
        ],
        workload(),
        [(Request(A), True), (PLAIN, False)],
    ),
]


@pytest.mark.parametrize(
    ("policies", "wl", "requests"),
    [pytest.param(*case[1:], id=case[0]) for case in RBAC_CASES],
)
def test_rbac(
    tmp_path: Path,
    policies: list[dict[str, Any]],
    wl: WorkloadRef,
    requests: list[tuple[Request, bool]],
) -> None:
    loaded = load(tmp_path, *policies) if policies else PolicySet()
    filters = inbound(loaded, wl).rbac_filters
    for request, expected in requests:
        assert allowed(filters, request) is expected, (request, json.dumps(filters, indent=1))


def test_compiled_shape(tmp_path: Path) -> None:
    """DENY filter first, ALLOW second; one Envoy policy per rule, named namespace.name[rule]."""
    loaded = load(
        tmp_path,
        ap("default", "allow-a", allow_from("example.org/ns/default/sa/a")),
        ap(
            "istio-system",
            "deny",
            {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}, {}]},
        ),
        ap("default", "allow-nothing"),
    )
    deny, allow = inbound(loaded, workload()).rbac_filters
    assert deny["typed_config"]["rules"]["action"] == "DENY"
    assert list(deny["typed_config"]["rules"]["policies"]) == [
        "istio-system.deny[0]",
        "istio-system.deny[1]",
    ]
    assert allow["typed_config"]["rules"]["action"] == "ALLOW"
    policies = allow["typed_config"]["rules"]["policies"]
    assert list(policies) == ["default.allow-a[0]", "default.allow-nothing"]
    assert policies["default.allow-a[0]"] == {
        "permissions": [{"any": True}],
        "principals": [
            {"authenticated": {"principal_name": {"exact": A}}},
        ],
    }
    assert deny["typed_config"]["rules"]["policies"]["istio-system.deny[0]"]["principals"] == [
        {"authenticated": {"principal_name": {"safe_regex": {"regex": ".*/ns/evil/.*"}}}}
    ]


def test_principal_mapping_is_istios(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        ap(
            "default",
            "allow",
            allow_from(
                "example.org/ns/default/sa/a",
                "example.org/ns/*",
                "*/sa/a.b",
                "*",
            ),
        ),
    )
    (allow,) = inbound(loaded, workload()).rbac_filters
    (policy,) = allow["typed_config"]["rules"]["policies"].values()
    matchers = [
        p["authenticated"]["principal_name"] for p in policy["principals"][0]["or_ids"]["ids"]
    ]
    assert matchers == [
        {"exact": "spiffe://example.org/ns/default/sa/a"},
        {"prefix": "spiffe://example.org/ns/"},
        # Istio's current form for "*suffix" (a regex anchored on spiffe://), quoted.
        {"safe_regex": {"regex": "spiffe://.*/sa/a\\.b"}},
        {"safe_regex": {"regex": ".+"}},
    ]


def test_tcp_workload_gets_network_filters(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        ap("default", "deny-c", {"action": "DENY", **allow_from("*/sa/c")}),
        ap("default", "allow-all", {"rules": [{}]}),
    )
    filters = inbound(loaded, workload(protocol=Protocol.TCP)).rbac_filters
    assert [f["name"] for f in filters] == [NETWORK_RBAC_FILTER, NETWORK_RBAC_FILTER]
    assert [parse_envoy_filter(f).stat_prefix for f in filters] == [
        "inbound_rbac_deny.",
        "inbound_rbac_allow.",
    ]
    assert not allowed(filters, Request(C)) and allowed(filters, Request(A))


HTTP_ONLY_ALLOW = ap(
    "default",
    "allow-get",
    {
        "rules": [
            {
                "from": [{"source": {"principals": ["*"]}}],
                "to": [{"operation": {"methods": ["GET"]}}],
            },
            {"from": [{"source": {"principals": ["example.org/ns/default/sa/c"]}}]},
        ]
    },
)
HTTP_ONLY_DENY = ap(
    "default",
    "deny-admin",
    {
        "action": "DENY",
        "rules": [
            {
                "from": [{"source": {"principals": ["example.org/ns/default/sa/c"]}}],
                "to": [{"operation": {"paths": ["/admin*"], "ports": ["8080"]}}],
            }
        ],
    },
)


def test_http_only_fields_in_allow_on_tcp_skip_the_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = load(tmp_path, HTTP_ONLY_ALLOW)
    with caplog.at_level(logging.WARNING, logger="meshtrust.policy"):
        filters = inbound(loaded, workload(protocol=Protocol.TCP)).rbac_filters
    # Rule 0 (methods) is ignored: it would otherwise allow every authenticated peer.
    assert not allowed(filters, Request(A))
    assert allowed(filters, Request(C))
    assert "AuthorizationPolicy default/allow-get" in caplog.text
    assert "methods" in caplog.text and "ignored" in caplog.text
    # The same policy on an HTTP workload keeps both rules.
    http = inbound(loaded, workload()).rbac_filters
    assert allowed(http, Request(A, method="GET")) and not allowed(http, Request(A, method="PUT"))


def test_http_only_fields_in_deny_on_tcp_deny_wider(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = load(tmp_path, HTTP_ONLY_DENY)
    with caplog.at_level(logging.WARNING, logger="meshtrust.policy"):
        filters = inbound(loaded, workload(protocol=Protocol.TCP)).rbac_filters
    # The path condition is dropped: c is denied every connection, others are not.
    assert not allowed(filters, Request(C))
    assert allowed(filters, Request(A))
    assert "AuthorizationPolicy default/deny-admin" in caplog.text and "paths" in caplog.text
    http = inbound(loaded, workload()).rbac_filters
    assert not allowed(http, Request(C, "/admin/x")) and allowed(http, Request(C, "/x"))


def test_trust_domain_argument_is_validated() -> None:
    with pytest.raises(InvalidInput):
        PolicySet().inbound_for(workload(), trust_domain="Not A Domain")


# --- Istio's principal matching, property-based -------------------------------------------------

TRUST_DOMAINS = ["example.org", "td", "a.b-c"]
NAMESPACES = ["default", "prod", "a", "ns"]
ACCOUNTS = ["web", "api", "a", "w-eb"]

spiffe_ids = st.builds(
    SpiffeId.for_workload,
    st.sampled_from(TRUST_DOMAINS),
    st.sampled_from(NAMESPACES),
    st.sampled_from(ACCOUNTS),
)


@st.composite
def principals(draw: st.DrawFn) -> str:
    """An Istio principal value: exact, prefix*, *suffix or *, cut from a random identity."""
    value = str(draw(spiffe_ids)).removeprefix("spiffe://")
    form = draw(st.sampled_from(["exact", "prefix", "suffix", "any"]))
    if form == "exact":
        return value
    if form == "any":
        return "*"
    if form == "prefix":
        return value[: draw(st.integers(1, len(value) - 1))] + "*"
    # Suffixes may reach past the identity ("*//td/ns/..."): they must then match nothing,
    # which a plain suffix matcher on the whole URI "spiffe://td/ns/..." would get wrong.
    tail = "//" + value
    return "*" + tail[draw(st.integers(0, len(tail) - 1)) :]


def istio_matches(principal: str, spiffe_id: SpiffeId) -> bool:
    """Istio's documented rule, on the peer identity without ``spiffe://``."""
    peer = str(spiffe_id).removeprefix("spiffe://")
    if principal == "*":
        return bool(peer)
    if principal.startswith("*"):
        return peer.endswith(principal[1:])
    if principal.endswith("*"):
        return peer.startswith(principal[:-1])
    return peer == principal


@settings(max_examples=300, deadline=None)
@given(
    allow=st.lists(principals(), min_size=1, max_size=4),
    deny=st.lists(principals(), max_size=3),
    peers=st.lists(spiffe_ids, min_size=1, max_size=8),
    protocol=st.sampled_from(Protocol),
)
def test_compiled_principals_match_as_istio_says(
    tmp_path_factory: pytest.TempPathFactory,
    allow: list[str],
    deny: list[str],
    peers: list[SpiffeId],
    protocol: Protocol,
) -> None:
    source: dict[str, Any] = {"principals": allow}
    if deny:
        source["notPrincipals"] = deny
    path = tmp_path_factory.mktemp("hypothesis") / "p.yaml"
    loaded = load_policy_files(
        [write(path, ap("default", "allow", {"rules": [{"from": [{"source": source}]}]}))]
    )
    filters = inbound(loaded, workload(protocol=protocol)).rbac_filters
    for peer in peers:
        expected = any(istio_matches(p, peer) for p in allow) and not any(
            istio_matches(p, peer) for p in deny
        )
        assert allowed(filters, Request(str(peer))) is expected, (peer, allow, deny)
    assert not allowed(filters, PLAIN)


# --- the real Envoy accepts what we compile ---------------------------------------------------

EVERYTHING = [
    ap("istio-system", "deny-evil", {"action": "DENY", **allow_from(namespaces=["evil", "ev*"])}),
    ap(
        "default",
        "deny-admin",
        {
            "action": "DENY",
            "rules": [
                {
                    "from": [
                        {"source": {"notPrincipals": ["*/sa/admin"], "notNamespaces": ["*-ops"]}}
                    ],
                    "to": [{"operation": {"paths": ["/admin*"], "notMethods": ["GET", "*S"]}}],
                }
            ],
        },
    ),
    ap(
        "default",
        "allow-some",
        {
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": ["example.org/ns/default/sa/a", "td/*", "*.b/x", "*"]
                            }
                        },
                        {"source": {"namespaces": ["*"]}},
                    ],
                    "to": [
                        {
                            "operation": {
                                "ports": ["8080"],
                                "methods": ["*", "GE*"],
                                "paths": ["*", "*.js", "/x"],
                            }
                        },
                        {"operation": {"notPaths": ["/private/*"]}},
                    ],
                },
                {},
            ]
        },
    ),
    ap("default", "allow-nothing"),
]


def validation_bootstrap(
    tcp: Sequence[Mapping[str, Any]], http: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    def address(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound-tcp",
                    "address": address(15006),
                    "filter_chains": [
                        {
                            "filters": [
                                *tcp,
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.tcp_proxy.v3.TcpProxy",
                                        "stat_prefix": "inbound",
                                        "cluster": "app",
                                    },
                                },
                            ]
                        }
                    ],
                },
                {
                    "name": "inbound-http",
                    "address": address(15007),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "inbound",
                                        "http_filters": [
                                            *http,
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "app",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "app"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                    },
                                }
                            ]
                        }
                    ],
                },
            ],
            "clusters": [
                {
                    "name": "app",
                    "load_assignment": {
                        "cluster_name": "app",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(8080)}}]}],
                    },
                }
            ],
        }
    }


@pytest.mark.slow
def test_real_envoy_accepts_the_compiled_filters(tmp_path: Path) -> None:
    loaded = load(tmp_path, *EVERYTHING)
    tcp = inbound(loaded, workload(protocol=Protocol.TCP)).rbac_filters
    http = inbound(loaded, workload()).rbac_filters
    assert len(tcp) == 2 and len(http) == 2
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(validation_bootstrap(tcp, http)))
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_policy_modules_import_in_one_direction() -> None:
    """istio (YAML -> objects, PolicySet) -> compile (objects -> Envoy) -> objects, and istio ->
    networking (ServiceEntry, DestinationRule): no module
    imports one that imports it back, so none needs an import inside a function."""
    import ast

    import meshtrust.policy

    package = Path(meshtrust.policy.__file__).parent
    allowed = {
        "objects": {"model"},
        "model": set(),
        "compile": {"objects", "model"},
        "networking": set(),
        "istio": {"objects", "model", "compile", "networking"},
    }
    for module, may_import in allowed.items():
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {
            node.module.removeprefix("meshtrust.policy.")
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("meshtrust.policy.")
        }
        assert imported <= may_import, (module, imported - may_import)
        nested = [
            node
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(function)
            if isinstance(node, ast.Import | ast.ImportFrom)
        ]
        assert not nested, module
