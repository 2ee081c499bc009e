"""On one live mesh: what ``describe`` and ``analyze`` predict from the files is what the
real sidecars do, and ``check`` without a workload walks the CA and every workload."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from meshtrust.cli import cli
from meshtrust.mesh import MeshState
from meshtrust.mesh.probes import alive
from tests import mesh_helpers
from tests.mesh_helpers import APP, CHECK_WALK, http_get, upstream_port
from tests.waiting import until

pytestmark = pytest.mark.slow

# c may call b, a may not (an ALLOW policy on b naming c only).
B_FROM_C = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-from-c, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/c]}}]}]
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshState, Path]]:
    directory = tmp_path_factory.mktemp("analyze-live")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESHTRUST_HOME", str(directory / "home"))
        path = mesh_helpers.write_mesh(
            directory,
            [
                {"name": "a", "upstreams": [{"service": "b"}]},
                {"name": "b", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
                {"name": "c", "upstreams": [{"service": "b"}]},
            ],
            B_FROM_C,
            cert_ttl="1m",
        )
        with mesh_helpers.running_mesh(path) as state:
            yield state, path


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_describe_and_analyze_predict_what_the_sidecars_do(
    live: tuple[MeshState, Path],
) -> None:
    state, path = live
    doc = json.loads(run("describe", "b", "--mesh", path, "-o", "json").stdout)
    predicted = {c["caller"]: c["verdict"] for c in doc["callers"]}
    assert (predicted["a"], predicted["c"]) == ("deny", "allow")
    status_a, _ = http_get(upstream_port(state, "a", "b"))
    status_c, body = http_get(upstream_port(state, "c", "b"))
    assert (status_a, status_c) == (403, 200), body

    report = run("analyze", path, "-o", "json")
    assert report.exit_code == 0, report.output  # a warning, no error
    findings = json.loads(report.stdout)["findings"]
    assert [(f["code"], f["resource"]) for f in findings] == [("MT0401", "Service a")]


def test_check_without_a_workload_walks_the_whole_mesh(live: tuple[MeshState, Path]) -> None:
    state, path = live
    result = run("check", "--mesh", path, "-o", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [(s["id"], s["verdict"]) for s in report["ca"]["steps"]] == [
        ("ca", "PASS"),
        ("root", "PASS"),
        ("signing-chain", "PASS"),  # `ca init`'s CA rotates its intermediate itself
    ]
    assert [w["workload"] for w in report["workloads"]] == ["a", "b", "c"]
    for workload in report["workloads"]:
        assert [s["id"] for s in workload["steps"]] == CHECK_WALK
        assert workload["ok"] is True
        # The denied call above is an RBAC WARN on b, never a FAIL.
        assert {s["verdict"] for s in workload["steps"]} <= {"PASS", "SKIP", "WARN"}
    table = run("check", "--mesh", path)
    assert table.exit_code == 0
    assert "mesh: the CA and 3 workload(s) checked, nothing failed" in table.output

    # The CA goes away: the mesh check fails on the CA's step (last: it breaks the mesh).
    assert state.ca is not None
    os.kill(state.ca.pid, signal.SIGKILL)
    until(lambda: not alive(state.ca.pid if state.ca else None), what="the CA has exited")
    result = run("check", "--mesh", path, "-o", "yaml")
    assert result.exit_code == 1
    report = yaml.safe_load(result.stdout)
    assert report["ok"] is False and report["ca"]["ok"] is False
    ca_step = report["ca"]["steps"][0]
    assert ca_step["verdict"] == "FAIL" and "not running" in ca_step["detail"]


@pytest.mark.parametrize(
    "command",
    [["status"], ["check", "a"], ["proxy-config", "secret", "a"], ["certs", "monitor"]],
)
def test_every_format_of_the_live_tools(live: tuple[MeshState, Path], command: list[str]) -> None:
    _, path = live
    mesh = ["--mesh", str(path)] if command[0] != "status" else [str(path)]
    as_json = run(*command, *mesh, "-o", "json")
    as_yaml = run(*command, *mesh, "-o", "yaml")
    alias = run(*command, *mesh, "--json")
    table = run(*command, *mesh)
    # One document, two spellings; the exit status does not depend on the format.
    json_doc, yaml_doc = json.loads(as_json.stdout), yaml.safe_load(as_yaml.stdout)
    assert type(json_doc) is type(yaml_doc)
    if isinstance(json_doc, dict):
        assert list(json_doc) == list(yaml_doc)
    else:
        assert [r["resource_name"] for r in json_doc] == [r["resource_name"] for r in yaml_doc]
    assert list(json.loads(alias.stdout)) == list(json_doc)
    assert as_json.exit_code == as_yaml.exit_code == alias.exit_code == table.exit_code
    assert not table.stdout.lstrip().startswith(("{", "["))
