"""``meshtrust.mesh.access``, the verdicts ``describe`` and ``analyze`` give, against the
request-by-request Envoy RBAC evaluator of ``tests/test_policy.py``: what access calls
``allow`` is allowed for every request, ``deny`` for none, whatever the path and method."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrust.mesh.access import Verdict, decide
from meshtrust.policy import MtlsMode, Protocol, load_policy_files
from tests.test_policy import Request, allowed, ap, inbound, workload, write

PEERS = [f"spiffe://example.org/ns/{ns}/sa/{sa}" for ns in ("default", "ops") for sa in "ab"]
PRINCIPALS = ["example.org/ns/default/sa/a", "example.org/ns/ops/*", "*/sa/b", "*"]
PATHS = ["/", "/api/x", "/admin"]
METHODS = ["GET", "POST"]

sources = st.fixed_dictionaries(
    {},
    optional={
        "principals": st.lists(st.sampled_from(PRINCIPALS), min_size=1, max_size=2),
        "notPrincipals": st.lists(st.sampled_from(PRINCIPALS), min_size=1, max_size=1),
        "namespaces": st.lists(st.sampled_from(["default", "ops"]), min_size=1, max_size=1),
    },
).filter(bool)
operations = st.fixed_dictionaries(
    {},
    optional={
        "paths": st.lists(st.sampled_from(["/api/*", "/admin", "*"]), min_size=1, max_size=2),
        "methods": st.lists(st.sampled_from(METHODS + ["*"]), min_size=1, max_size=1),
        "notPaths": st.lists(st.just("/admin"), min_size=1, max_size=1),
    },
).filter(bool)
rules = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(st.builds(lambda s: {"source": s}, sources), min_size=1, max_size=2),
        "to": st.lists(st.builds(lambda o: {"operation": o}, operations), min_size=1, max_size=1),
    },
)
policies = st.lists(
    st.tuples(st.sampled_from(["ALLOW", "DENY"]), st.lists(rules, min_size=1, max_size=2)),
    min_size=1,
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(chosen=policies, mode=st.sampled_from([MtlsMode.STRICT, MtlsMode.PERMISSIVE]))
def test_verdicts_agree_with_envoys_rbac_request_by_request(
    tmp_path_factory: pytest.TempPathFactory,
    chosen: list[tuple[str, list[dict[str, Any]]]],
    mode: MtlsMode,
) -> None:
    docs = [
        ap("default", f"p{i}", {"action": action, "rules": body})
        for i, (action, body) in enumerate(chosen)
    ]
    path = tmp_path_factory.mktemp("access") / "p.yaml"
    loaded = load_policy_files([write(path, *docs)])
    filters = inbound(loaded, workload(protocol=Protocol.HTTP)).rbac_filters
    for peer in [*PEERS, None]:
        verdict = decide(mode, filters, peer).verdict
        outcomes = {
            allowed(filters, Request(peer, path=p, method=m)) for p in PATHS for m in METHODS
        }
        if peer is None and mode is MtlsMode.STRICT:
            assert verdict is Verdict.DENY  # refused before RBAC runs
        elif verdict is Verdict.ALLOW:
            assert outcomes == {True}, (peer, chosen)
        elif verdict is Verdict.DENY:
            assert outcomes == {False}, (peer, chosen)


def test_partial_is_a_mix_when_the_requests_tell_it_apart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    doc = ap("default", "reads", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    path = tmp_path_factory.mktemp("access") / "p.yaml"
    filters = inbound(load_policy_files([write(path, doc)]), workload()).rbac_filters
    assert decide(MtlsMode.STRICT, filters, PEERS[0]).verdict is Verdict.PARTIAL
    assert allowed(filters, Request(PEERS[0], method="GET"))
    assert not allowed(filters, Request(PEERS[0], method="POST"))


def test_disable_refuses_mesh_callers_and_lets_plain_text_through() -> None:
    assert decide(MtlsMode.DISABLE, (), PEERS[0]).verdict is Verdict.DENY
    assert decide(MtlsMode.DISABLE, (), None).verdict is Verdict.ALLOW
    assert decide(MtlsMode.PERMISSIVE, (), None).verdict is Verdict.ALLOW
