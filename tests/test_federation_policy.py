"""Trust-domain aliases in AuthorizationPolicy principals (Istio's ``trustDomainAliases``):
identities of an alias are the mesh's own, so a trust domain can be renamed without
rewriting policies; principals of federated trust domains are kept as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshtrust.errors import InvalidSpiffeId
from meshtrust.policy import load_policy_files
from meshtrust.policy.model import Protocol, WorkloadRef
from meshtrust.spiffe import SpiffeId

API = WorkloadRef(
    name="api",
    namespace="default",
    spiffe_id=SpiffeId.parse("spiffe://new.test/ns/default/sa/api"),
    app_port=8080,
    protocol=Protocol.HTTP,
    labels={"app": "api"},
)

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - old.test/ns/default/sa/web
        - cluster.local/ns/default/sa/ops
        - east.test/ns/default/sa/web
        - "*/ns/default/sa/any"
        notPrincipals: [old.test/ns/default/sa/banned]
"""


def _names(matchers: Any) -> list[str]:
    """Every principal_name string matched anywhere in ``matchers``."""
    found: list[str] = []
    if isinstance(matchers, dict):
        for key, value in matchers.items():
            if key == "principal_name":
                found.append(value.get("exact") or value.get("suffix") or str(value))
            else:
                found.extend(_names(value))
    elif isinstance(matchers, list):
        for item in matchers:
            found.extend(_names(item))
    return found


def _principals(tmp_path: Path, aliases: tuple[str, ...]) -> list[str]:
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy_files([tmp_path / "p.yaml"]).inbound_for(
        API, trust_domain="new.test", trust_domain_aliases=aliases
    )
    (rbac,) = policy.rbac_filters
    return _names(rbac["typed_config"]["rules"]["policies"])


def test_principals_of_an_alias_match_in_every_trust_domain_of_the_mesh(tmp_path: Path) -> None:
    names = _principals(tmp_path, ("old.test",))
    assert names == [
        "spiffe://new.test/ns/default/sa/web",
        "spiffe://old.test/ns/default/sa/web",
        "spiffe://new.test/ns/default/sa/ops",
        "spiffe://old.test/ns/default/sa/ops",
        "spiffe://east.test/ns/default/sa/web",  # a federated trust domain: as written
        "{'safe_regex': {'regex': 'spiffe://.*/ns/default/sa/any'}}",  # `*/...`: as written
        "spiffe://new.test/ns/default/sa/banned",
        "spiffe://old.test/ns/default/sa/banned",
    ]


def test_without_aliases_only_cluster_local_is_rewritten(tmp_path: Path) -> None:
    names = _principals(tmp_path, ())
    assert "spiffe://old.test/ns/default/sa/web" in names  # another trust domain, as written
    assert "spiffe://new.test/ns/default/sa/web" not in names
    assert "spiffe://new.test/ns/default/sa/ops" in names


def test_a_bad_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpiffeId):
        _principals(tmp_path, ("Old.Test",))
