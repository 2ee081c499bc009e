"""``meshtrust analyze``: one table row per finding, each asserted with its file and line.

Every case writes a real mesh file and policy file (the analyzer reads them with the one
config loader, as the CLI does) and checks the exact set of (code, file, line) found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from meshtrust.mesh.analyze import MESSAGES, Level, analyze_file

MESH = """\
trustDomain: example.org
workDir: ./work
services:
  - name: web
    port: 18080
    upstreams:
      - service: backend
        localPort: 19001
  - name: backend
    port: 18081
    protocol: {backend_protocol}
    upstreams:
      - service: db
        localPort: 19003
  - name: db
    port: 18082
policies: [policies.yaml]
"""
WEB = "example.org/ns/default/sa/web"
NOBODY = "example.org/ns/default/sa/nobody"
WEB_TO_BACKEND_LINE = 7  # services[0].upstreams[0]
BACKEND_TO_DB_LINE = 13  # services[1].upstreams[0]

STRICT = """\
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""
BACKEND_FROM_WEB = """\
kind: AuthorizationPolicy
metadata: {name: backend-from-web, namespace: default}
spec:
  selector: {matchLabels: {app: backend}}
  rules: [{from: [{source: {principals: [example.org/ns/default/sa/web]}}]}]
"""
DB_FROM_BACKEND = """\
kind: AuthorizationPolicy
metadata: {name: db-from-backend, namespace: default}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/backend]}}]}]
"""


def _authz(name: str, spec: str, namespace: str = "default") -> str:
    return f"kind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\n{spec}"


def _peer(name: str, spec: str, namespace: str = "default") -> str:
    return f"kind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\n{spec}"


@dataclass
class Files:
    mesh: Path
    policies: Path
    starts: list[int]  # the line each policy document starts on (its apiVersion)


def write(directory: Path, documents: list[str], backend_protocol: str = "http") -> Files:
    """The mesh above and ``documents`` as policies.yaml; remembers each document's line."""
    text, starts, line = "", [], 1
    for document in documents:
        body = f"apiVersion: security.istio.io/v1\n{document}"
        starts.append(line)
        text += body + "---\n"
        line += body.count("\n") + 1
    (directory / "policies.yaml").write_text(text)
    mesh = directory / "mesh.yaml"
    mesh.write_text(MESH.format(backend_protocol=backend_protocol))
    return Files(mesh, directory / "policies.yaml", starts)


# Each case: policy documents, then the expected findings as (code, "mesh"|policy index, line
# in the mesh file or None for the policy's own line).
CASES: dict[str, tuple[list[str], str, list[tuple[str, str | int, int | None]]]] = {
    "a clean mesh": ([STRICT, BACKEND_FROM_WEB, DB_FROM_BACKEND], "http", []),
    "no policies at all": ([], "http", []),
    "a selector that matches no service": (
        [_authz("ghost", "spec:\n  selector: {matchLabels: {app: ghost}}\n  rules: [{}]\n")],
        "http",
        [("MT0127", 0, None)],
    ),
    "a namespace without services": (
        [_authz("elsewhere", "spec: {rules: [{}]}\n", namespace="other")],
        "http",
        [("MT0127", 0, None)],
    ),
    "a selector in the root namespace (ignored by Istio)": (
        [_peer("root-sel", "spec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n",
               namespace="istio-system")],
        "http",
        [("MT0127", 0, None)],
    ),  # fmt: skip
    "an ALLOW policy without rules": (
        [_authz("db-nothing", "spec:\n  selector: {matchLabels: {app: db}}\n")],
        "http",
        [("MT0201", 0, None), ("MT0401", "mesh", BACKEND_TO_DB_LINE)],
    ),
    "ALLOW rules that can never match (a port that is not the app's)": (
        [_authz("db-wrong-port", "spec:\n  selector: {matchLabels: {app: db}}\n"
                "  rules: [{to: [{operation: {ports: ['9999']}}]}]\n")],
        "http",
        [("MT0202", 0, None), ("MT0401", "mesh", BACKEND_TO_DB_LINE)],
    ),  # fmt: skip
    "ALLOW rules with paths on a TCP service": (
        [_authz("backend-paths", "spec:\n  selector: {matchLabels: {app: backend}}\n"
                "  rules: [{to: [{operation: {paths: [/api]}}]}]\n")],
        "tcp",
        [("MT0202", 0, None), ("MT0204", 0, None), ("MT0401", "mesh", WEB_TO_BACKEND_LINE)],
    ),  # fmt: skip
    "a DENY rule with methods on a TCP service denies every connection": (
        [_authz("backend-no-post", "spec:\n  selector: {matchLabels: {app: backend}}\n"
                "  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n")],
        "tcp",
        [("MT0204", 0, None), ("MT0401", "mesh", WEB_TO_BACKEND_LINE)],
    ),  # fmt: skip
    "the same DENY rule on an HTTP service is no finding": (
        [_authz("backend-no-post", "spec:\n  selector: {matchLabels: {app: backend}}\n"
                "  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n")],
        "http",
        [("MT0402", "mesh", WEB_TO_BACKEND_LINE)],
    ),  # fmt: skip
    "an ALLOW policy that matches no identity of the mesh": (
        [BACKEND_FROM_WEB,
         _authz("db-from-nobody", "spec:\n  selector: {matchLabels: {app: db}}\n"
                "  rules: [{from: [{source: {principals: [" + NOBODY + "]}}]}]\n")],
        "http",
        [("MT0203", 1, None), ("MT0401", "mesh", BACKEND_TO_DB_LINE)],
    ),  # fmt: skip
    "a principal of another trust domain": (
        [BACKEND_FROM_WEB,
         _authz("db-typo", "spec:\n  selector: {matchLabels: {app: db}}\n  rules:\n"
                "    - from: [{source: {principals: [example.org/ns/default/sa/backend,"
                " exmaple.org/ns/default/sa/web]}}]\n")],
        "http",
        [("MT0301", 1, None)],
    ),  # fmt: skip
    "a trust domain in a prefix wildcard": (
        [_authz("db-prefix", "spec:\n  selector: {matchLabels: {app: db}}\n  rules:\n"
                "    - from: [{source: {notPrincipals: [other.org/ns/*]}}]\n", )],
        "http",
        [("MT0301", 0, None)],
    ),  # fmt: skip
    "an upstream the callee denies": (
        [STRICT, DB_FROM_BACKEND,
         _authz("backend-from-db", "spec:\n  selector: {matchLabels: {app: backend}}\n"
                "  rules: [{from: [{source: {principals: [example.org/ns/default/sa/db]}}]}]\n")],
        "http",
        [("MT0401", "mesh", WEB_TO_BACKEND_LINE)],
    ),  # fmt: skip
    "an upstream allowed for some paths only": (
        [_authz("backend-api", "spec:\n  selector: {matchLabels: {app: backend}}\n"
                "  rules: [{to: [{operation: {paths: [/api/*]}}]}]\n")],
        "http",
        [("MT0402", "mesh", WEB_TO_BACKEND_LINE)],
    ),  # fmt: skip
    "an upstream whose mTLS is DISABLE, in a STRICT mesh": (
        [STRICT, _peer("db-plain", "spec:\n  selector: {matchLabels: {app: db}}\n"
                       "  mtls: {mode: DISABLE}\n")],
        "http",
        [("MT0113", "mesh", BACKEND_TO_DB_LINE), ("MT0502", 1, None)],
    ),  # fmt: skip
    "a PERMISSIVE namespace in a STRICT mesh": (
        [STRICT, _peer("default-permissive", "spec: {mtls: {mode: PERMISSIVE}}\n")],
        "http",
        [("MT0501", 1, None)] * 3,  # one per service of the namespace
    ),
    "a PERMISSIVE port in a STRICT mesh": (
        [STRICT, _peer("db-port", "spec:\n  selector: {matchLabels: {app: db}}\n"
                       "  portLevelMtls: {'18082': {mode: PERMISSIVE}}\n")],
        "http",
        [("MT0501", 1, None)],
    ),  # fmt: skip
    "PERMISSIVE without a STRICT mesh is no finding": (
        [_peer("default-permissive", "spec: {mtls: {mode: PERMISSIVE}}\n")],
        "http",
        [],
    ),
    "an ALLOW policy shadowed by a DENY": (
        [BACKEND_FROM_WEB,
         _authz("backend-not-web", "spec:\n  selector: {matchLabels: {app: backend}}\n"
                "  action: DENY\n  rules: [{from: [{source: {namespaces: [default]}}]}]\n")],
        "http",
        [("MT0601", 0, None), ("MT0401", "mesh", WEB_TO_BACKEND_LINE)],
    ),  # fmt: skip
    "a DENY that covers only part of an ALLOW is no shadow": (
        [_authz("backend-all", "spec:\n  selector: {matchLabels: {app: backend}}\n  rules: [{}]\n"),
         _authz("backend-not-web", "spec:\n  selector: {matchLabels: {app: backend}}\n"
                "  action: DENY\n  rules: [{from: [{source: {principals: [" + WEB + "]}}]}]\n")],
        "http",
        [("MT0401", "mesh", WEB_TO_BACKEND_LINE)],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", CASES)
def test_each_finding_with_its_file_and_line(tmp_path: Path, case: str) -> None:
    documents, protocol, expected = CASES[case]
    files = write(tmp_path, documents, protocol)
    report = analyze_file(files.mesh)
    got = sorted((f.code, f.file, f.line) for f in report.findings)
    want = sorted(
        (
            code,
            files.mesh.resolve() if where == "mesh" else files.policies,
            line if where == "mesh" else files.starts[int(where)],
        )
        for code, where, line in expected
    )
    assert got == want, [str(f) for f in report.findings]
    # Errors first, then warnings, then infos; an error fails the analysis.
    ranks = [f.level.rank for f in report.findings]
    assert ranks == sorted(ranks, reverse=True)
    assert report.failed() == any(MESSAGES[c].level is Level.ERROR for c, _, _ in expected)


def test_a_finding_reads_like_istioctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write(tmp_path, [_authz("ghost", "spec:\n  selector: {matchLabels: {app: ghost}}\n")])
    monkeypatch.chdir(tmp_path)
    (finding,) = analyze_file(files.mesh).findings
    assert str(finding) == (
        "Warning [MT0127] (AuthorizationPolicy default/ghost policies.yaml:1) "
        "no service in namespace default matches the selector app=ghost"
    )
    assert finding.to_json() == {
        "code": "MT0127",
        "name": "NoMatchingWorkloadsFound",
        "level": "Warning",
        "resource": "AuthorizationPolicy default/ghost",
        "file": str(files.policies),
        "line": 1,
        "message": "no service in namespace default matches the selector app=ghost",
    }


def test_messages_name_the_deciding_policy(tmp_path: Path) -> None:
    files = write(tmp_path, [STRICT, DB_FROM_BACKEND, BACKEND_FROM_WEB.replace("web]", "db]")])
    (finding,) = analyze_file(files.mesh).findings
    assert finding.code == "MT0401"
    assert "deny spiffe://example.org/ns/default/sa/web" in finding.message
    assert f"default/backend-from-web ({files.policies}:{files.starts[2]})" in finding.message


def test_a_policy_file_that_does_not_load_is_one_finding(tmp_path: Path) -> None:
    files = write(tmp_path, [STRICT, "kind: AuthorizationPolicy\nmetadata: {name: x}\nspec:\n"
                             "  rulez: []\n"])  # fmt: skip
    (finding,) = analyze_file(files.mesh).findings
    assert (finding.code, finding.level) == ("MT0106", Level.ERROR)
    assert (finding.file, finding.line) == (files.policies, files.starts[1] + 4)
    assert finding.resource == "AuthorizationPolicy default/x"
    assert "spec.rulez: unknown field 'rulez'" in finding.message


def test_a_mesh_file_that_does_not_load_is_one_finding(tmp_path: Path) -> None:
    files = write(tmp_path, [])
    files.mesh.write_text(files.mesh.read_text().replace("port: 18082", "port: 99999"))
    (finding,) = analyze_file(files.mesh).findings
    assert (finding.code, finding.file, finding.line) == ("MT0106", files.mesh, 16)
    assert finding.message.startswith("services[2].port:")


def test_every_code_is_documented() -> None:
    table = (Path(__file__).parent.parent / "docs" / "analyze.md").read_text()
    for code, message in MESSAGES.items():
        assert f"| {code} | {message.name} | {message.level} |" in table
