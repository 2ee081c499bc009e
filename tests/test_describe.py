"""``meshtrust describe``: what applies to a workload and who may call it, on the examples'
meshes and on small meshes made for one rule each; and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from meshtrust.cli import cli
from meshtrust.mesh.config import load_mesh_config
from meshtrust.mesh.describe import describe_workload
from meshtrust.policy import load_policy_files

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart" / "mesh.yaml"
QUICKSTART_POLICIES = QUICKSTART.parent / "policies.yaml"


def describe(path: Path, name: str) -> dict[str, Any]:
    config = load_mesh_config(path)
    return describe_workload(config, load_policy_files(list(config.policy_files)), name)


def verdicts(doc: dict[str, Any]) -> dict[str, str]:
    return {c["caller"]: c["verdict"] for c in doc["callers"]}


def line_of(path: Path, text: str) -> int:
    """The line of the document holding ``text`` (its apiVersion line)."""
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if text in line)
    return next(i for i in range(at, -1, -1) if lines[i].startswith("apiVersion")) + 1


# Who may call each quickstart service, as its README tells it: web -> backend -> db, and
# web -> db refused; nobody speaks plain text (STRICT mesh-wide).
QUICKSTART_CALLERS = {
    "web": {"backend": "allow", "db": "allow", "(any other identity)": "allow"},
    "backend": {"web": "allow", "db": "deny", "(any other identity)": "deny"},
    "db": {"web": "deny", "backend": "allow", "(any other identity)": "deny"},
}


@pytest.mark.parametrize("name", QUICKSTART_CALLERS)
def test_who_may_call_each_quickstart_service(name: str) -> None:
    doc = describe(QUICKSTART, name)
    assert verdicts(doc) == {**QUICKSTART_CALLERS[name], "(plain text)": "deny"}
    assert doc["spiffe_id"] == f"spiffe://cluster.local/ns/default/sa/{name}"
    assert doc["mtls_mode"] == "STRICT"
    assert doc["peer_authentications"] == [
        {
            "level": "mesh",
            "name": "istio-system/default",
            "mode": "STRICT",
            "port_level_mtls": {},
            "file": str(QUICKSTART_POLICIES),
            "line": line_of(QUICKSTART_POLICIES, "kind: PeerAuthentication"),
        }
    ]
    plain = next(c for c in doc["callers"] if c["spiffe_id"] is None)
    assert plain["reason"] == "STRICT mTLS refuses plain text"


def test_the_policies_that_apply_with_file_and_line() -> None:
    doc = describe(QUICKSTART, "db")
    line = line_of(QUICKSTART_POLICIES, "name: db-allow-backend")
    assert doc["authorization_policies"] == [
        {
            "name": "default/db-allow-backend",
            "action": "ALLOW",
            "rules": 1,
            "file": str(QUICKSTART_POLICIES),
            "line": line,
        }
    ]
    web = next(c for c in doc["callers"] if c["caller"] == "web")
    assert web["reason"] == "no ALLOW rule matches this caller"
    assert web["policies"] == [
        {
            "name": "default/db-allow-backend",
            "rule": "default.db-allow-backend[0]",
            "file": str(QUICKSTART_POLICIES),
            "line": line,
        }
    ]
    assert doc["ports"] == [
        {"port": 18082, "inbound_port": 16082, "mode": "STRICT", "port_level": False}
    ]


def test_upstreams_say_whether_the_callee_lets_it_in() -> None:
    doc = describe(QUICKSTART, "web")
    assert [(u["service"], u["local_port"], u["verdict"]) for u in doc["upstreams"]] == [
        ("backend", 19001, "allow"),
        ("db", 19002, "deny"),
    ]


MESH = """\
trustDomain: example.org
workDir: ./work
services:
  - {name: api, port: 18080}
  - {name: ops, namespace: tools, port: 18081, upstreams: [{service: api, localPort: 19001}]}
  - {name: pay, port: 18082}
policies: [policies.yaml]
"""
POLICIES = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: api-ports, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  mtls: {mode: STRICT}
  portLevelMtls: {'18080': {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-reads, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  rules:
    - from: [{source: {namespaces: [tools]}}]
      to: [{operation: {methods: [GET]}}]
    - from: [{source: {principals: [example.org/ns/default/sa/pay]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-plain-text, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules: [{from: [{source: {notPrincipals: ["*"]}}]}]
"""


def test_port_level_mode_partial_callers_and_deny(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    (tmp_path / "policies.yaml").write_text(POLICIES)
    doc = describe(tmp_path / "mesh.yaml", "api")
    # portLevelMtls on the app port wins over the workload's STRICT.
    assert doc["mtls_mode"] == "PERMISSIVE"
    assert doc["ports"][0] == {
        "port": 18080,
        "inbound_port": None,
        "mode": "PERMISSIVE",
        "port_level": True,
    }
    assert [pa["level"] for pa in doc["peer_authentications"]] == ["workload"]
    assert doc["peer_authentications"][0]["port_level_mtls"] == {"18080": "PERMISSIVE"}
    assert verdicts(doc) == {
        "ops": "partial",  # GET only
        "pay": "allow",
        "(any other identity)": "deny",
        "(plain text)": "deny",  # PERMISSIVE lets it through TLS, the DENY policy does not
    }
    by = {c["caller"]: c for c in doc["callers"]}
    assert [p["name"] for p in by["(plain text)"]["policies"]] == ["default/no-plain-text"]
    assert [p["rule"] for p in by["pay"]["policies"]] == ["default.api-reads[1]"]
    ops = describe(tmp_path / "mesh.yaml", "ops")
    assert ops["upstreams"][0]["verdict"] == "partial"


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_formats_carry_the_same_document() -> None:
    as_json = run("describe", "db", "--mesh", QUICKSTART, "-o", "json")
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.stdout)
    assert document == describe(QUICKSTART, "db")
    alias = run("describe", "db", "--mesh", QUICKSTART, "--json")
    assert json.loads(alias.stdout) == document
    as_yaml = run("describe", "db", "--mesh", QUICKSTART, "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout) == document
    table = run("describe", "db", "--mesh", QUICKSTART)
    assert table.exit_code == 0, table.output
    for text in ("Who may call it", "backend", "allow", "deny", "STRICT mTLS refuses plain",
                 "default/db-allow-backend", "policies.yaml:21", "istio-system/default"):
        assert text in table.output, text  # fmt: skip


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = run("describe", "nope", "--mesh", QUICKSTART)
    assert result.exit_code == 2
    assert "no service 'nope'" in result.output and "services: web, backend, db" in result.output
    assert "Traceback" not in result.output
    (tmp_path / "mesh.yaml").write_text(MESH)
    (tmp_path / "policies.yaml").write_text("kind: Nope\n")
    result = run("describe", "api", "--mesh", tmp_path / "mesh.yaml")
    assert result.exit_code == 2
    assert "policies.yaml" in result.output and "Traceback" not in result.output
