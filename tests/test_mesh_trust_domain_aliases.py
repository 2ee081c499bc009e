"""mesh.yaml ``trustDomainAliases`` (Istio's meshConfig name): checked with the mesh file's
lines, handed to every agent (its ``trust-domain-aliases``, which it compiles its sidecar's
policies with), and known to ``analyze``/``describe``: a principal of an alias is the mesh's
own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust.agent.config import AgentConfig, load_agent_settings
from meshtrust.errors import ConfigError
from meshtrust.mesh import load_mesh_config, plan_mesh
from meshtrust.mesh.access import inbound_of
from meshtrust.mesh.analyze import analyze_file
from meshtrust.mesh.describe import describe_workload
from meshtrust.policy import load_policy_files
from meshtrust.spiffe import TrustDomain

#: A policy written before the mesh was renamed old.test -> new.test.
OLD_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-callers, namespace: default}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules: [{from: [{source: {principals: [old.test/ns/default/sa/web]}}]}]
"""


def mesh_file(directory: Path, **change: Any) -> Path:
    (directory / "p.yaml").write_text(OLD_POLICY)
    mesh: dict[str, Any] = {
        "trustDomain": "new.test",
        "workDir": "work",
        "ca": {"listen": "127.0.0.1:25999"},
        "services": [
            {"name": "web", "port": 25001, "upstreams": [{"service": "db", "localPort": 25101}]},
            {"name": "db", "port": 25002},
        ],
        "policies": ["p.yaml"],
        **change,
    }
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    return path


def ports() -> Callable[[], int]:
    it: Iterator[int] = iter(range(40001, 40100))
    return lambda: next(it)


def test_every_agent_gets_the_aliases_and_compiles_the_policies_with_them(tmp_path: Path) -> None:
    config = load_mesh_config(mesh_file(tmp_path, trustDomainAliases=["old.test", "older.test"]))
    assert config.trust_domain_aliases == (
        TrustDomain.parse("old.test"),
        TrustDomain.parse("older.test"),
    )
    plan = plan_mesh(config, ports(), python="/py", environ={})
    for svc in plan.services:
        written = svc.agent_config.path
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text(svc.agent_config.content)
        settings: dict[str, Any] = load_agent_settings(written)
        agent = AgentConfig(**settings)  # what the agent reads
        assert agent.trust_domain_aliases == config.trust_domain_aliases
    # The agent compiles with them: new.test's web is old.test's web to db's sidecar.
    policies = load_policy_files(list(config.policy_files))
    inbound = inbound_of(config, policies, config.service("db"))
    assert inbound.decide("spiffe://new.test/ns/default/sa/web").verdict.value == "allow"
    assert inbound.decide("spiffe://new.test/ns/default/sa/db").verdict.value == "deny"


def test_without_aliases_the_agent_config_has_none(tmp_path: Path) -> None:
    config = load_mesh_config(mesh_file(tmp_path))
    assert config.trust_domain_aliases == ()
    plan = plan_mesh(config, ports(), python="/py", environ={})
    assert "trust-domain-aliases" not in yaml.safe_load(plan.services[0].agent_config.content)


@pytest.mark.parametrize(
    ("aliases", "index", "problem"),
    [
        (["old.test", "Old Test"], 1, "trust domain"),
        (["new.test"], 0, "is the mesh's own trust domain (trustDomain), not an alias"),
        (["old.test", "old.test"], 1, "old.test is listed twice"),
        ([7], 0, "expected a string"),
    ],
)
def test_a_bad_alias_names_the_mesh_files_line_and_field(
    tmp_path: Path, aliases: list[Any], index: int, problem: str
) -> None:
    path = mesh_file(tmp_path, trustDomainAliases=aliases)
    lines = path.read_text().splitlines()
    start = next(i for i, text in enumerate(lines, 1) if text.startswith("trustDomainAliases"))
    with pytest.raises(ConfigError) as info:
        load_mesh_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{start + 1 + index}: trustDomainAliases[{index}]: ")
    assert problem in message, message


def test_a_string_instead_of_a_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trustDomainAliases: expected a list"):
        load_mesh_config(mesh_file(tmp_path, trustDomainAliases="old.test"))


def test_analyze_takes_a_principal_of_an_alias_as_the_meshs_own(tmp_path: Path) -> None:
    # Without the alias the old principal is of an unknown trust domain (MT0301), matches no
    # service (MT0203) and web's call to db is denied (MT0401); with it, nothing to report.
    before = analyze_file(mesh_file(tmp_path))
    assert sorted(f.code for f in before.findings) == ["MT0203", "MT0301", "MT0401"], (
        before.findings
    )
    after = analyze_file(mesh_file(tmp_path, trustDomainAliases=["old.test"]))
    assert after.findings == (), after.findings
    assert not after.failed()
    # describe agrees (the same compiled policy).
    config = load_mesh_config(mesh_file(tmp_path, trustDomainAliases=["old.test"]))
    doc = describe_workload(config, load_policy_files(list(config.policy_files)), "web")
    assert doc["upstreams"][0]["verdict"] == "allow", doc["upstreams"]
