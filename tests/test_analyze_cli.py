"""``meshtrust analyze`` on the command line: exit statuses (istioctl's) and every -o format."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from meshtrust.cli import cli
from meshtrust.cli.analyze import EXIT_FOUND_ISSUES

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart" / "mesh.yaml"

MESH = """\
workDir: ./work
services:
  - {name: a, port: 18080, upstreams: [{service: b, localPort: 19001}]}
  - {name: b, port: 18081}
policies: [policies.yaml]
"""
# An error (MT0301) and a warning (MT0127).
ERROR_AND_WARNING = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-typo, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/a, other.td/ns/x/sa/y]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ghost, namespace: default}
spec:
  selector: {matchLabels: {app: ghost}}
  rules: [{}]
"""


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def mesh(directory: Path, policies: str) -> Path:
    (directory / "policies.yaml").write_text(policies)
    (directory / "mesh.yaml").write_text(MESH)
    return directory / "mesh.yaml"


def test_warnings_alone_exit_zero() -> None:
    result = run("analyze", QUICKSTART)
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert line.startswith("Warning [MT0401] (Service web ") and "mesh.yaml:24)" in line
    # istioctl's --failure-threshold: warnings can be made to fail.
    result = run("analyze", QUICKSTART, "--failure-threshold", "warning")
    assert result.exit_code == EXIT_FOUND_ISSUES == 79


def test_errors_exit_79_with_each_finding_on_a_line(tmp_path: Path) -> None:
    result = run("analyze", mesh(tmp_path, ERROR_AND_WARNING))
    assert result.exit_code == EXIT_FOUND_ISSUES
    lines = result.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "Error [MT0301]",
        "Warning [MT0127]",
    ]
    assert "policies.yaml:1)" in lines[0] and "policies.yaml:8)" in lines[1]


def test_a_clean_mesh_says_so(tmp_path: Path) -> None:
    result = run("analyze", mesh(tmp_path, "# nothing\n"))
    assert result.exit_code == 0
    assert result.stdout.startswith("No validation issues found when analyzing ")


def test_a_broken_file_is_a_finding_not_a_traceback(tmp_path: Path) -> None:
    path = mesh(tmp_path, "kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\n"
                          "metadata: {name: x}\nspec: {action: MAYBE}\n")  # fmt: skip
    result = run("analyze", path)
    assert result.exit_code == EXIT_FOUND_ISSUES
    assert result.stdout.startswith("Error [MT0106] (AuthorizationPolicy default/x ")
    assert "policies.yaml:4) spec.action: unknown action 'MAYBE'" in result.stdout
    assert "Traceback" not in result.output


def test_the_compilers_warning_is_a_finding_and_the_logger_is_left_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tcp = MESH.replace("{name: b, port: 18081}", "{name: b, port: 18081, protocol: tcp}")
    path = mesh(tmp_path, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                          "metadata: {name: b-get}\nspec:\n  selector: {matchLabels: {app: b}}\n"
                          "  rules: [{to: [{operation: {methods: [GET]}}]}]\n")  # fmt: skip
    path.write_text(tcp)
    logger = logging.getLogger("meshtrust.policy.compile")
    before = logger.level
    with caplog.at_level(logging.WARNING):
        result = run("analyze", path)
    assert "[MT0204]" in result.stdout and "[MT0202]" in result.stdout
    assert "HTTP-only fields" not in caplog.text  # said once, by the finding
    assert logger.level == before


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run("analyze", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_machine_formats(tmp_path: Path, fmt: str) -> None:
    path = mesh(tmp_path, ERROR_AND_WARNING)
    result = run("analyze", path, "-o", fmt)
    assert result.exit_code == EXIT_FOUND_ISSUES
    doc = json.loads(result.stdout) if fmt == "json" else yaml.safe_load(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["mesh_file"] == str(path.resolve())
    assert (doc["errors"], doc["warnings"], doc["infos"]) == (1, 1, 0)
    assert [(f["code"], f["level"], f["line"]) for f in doc["findings"]] == [
        ("MT0301", "Error", 1),
        ("MT0127", "Warning", 8),
    ]
    first = doc["findings"][0]
    assert set(first) == {"code", "name", "level", "resource", "file", "line", "message"}
    assert first["file"] == str(tmp_path / "policies.yaml")
    assert first["resource"] == "AuthorizationPolicy default/b-typo"


def test_table_and_json_alias(tmp_path: Path) -> None:
    path = mesh(tmp_path, ERROR_AND_WARNING)
    table = run("analyze", path, "-o", "table")
    assert table.exit_code == EXIT_FOUND_ISSUES
    for text in ("LEVEL", "CODE", "MT0301", "MT0127", "1 error(s), 1 warning(s), 0 info(s)"):
        assert text in table.output
    alias = run("analyze", path, "--json")
    assert json.loads(alias.stdout) == json.loads(run("analyze", path, "-o", "json").stdout)
    clash = run("analyze", path, "--json", "-o", "yaml")
    assert clash.exit_code == 2 and "--json and -o yaml" in clash.output


def test_without_a_file_it_analyzes_the_mesh_started_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHTRUST_HOME", str(tmp_path / "home"))
    result = run("analyze")
    assert result.exit_code == 2 and "no mesh has been started" in result.output
    # What `up` leaves behind: a state file, and the pointer to it.
    from meshtrust.mesh.state import current_pointer

    path = mesh(tmp_path, ERROR_AND_WARNING)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"mesh_file": str(path), "work_dir": str(tmp_path),
                                 "trust_domain": "cluster.local", "cert_ttl_seconds": 60,
                                 "ca": None, "services": []}))  # fmt: skip
    pointer = current_pointer()
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(str(state))
    result = run("analyze", "-o", "json")
    assert result.exit_code == EXIT_FOUND_ISSUES
    assert json.loads(result.stdout)["mesh_file"] == str(path)


def test_help_reads_for_a_newcomer() -> None:
    for command in (["analyze"], ["describe"], ["check"]):
        result = run(*command, "--help")
        assert result.exit_code == 0
        assert len(result.output.split("\n\n")[1].strip()) > 20
        assert "-o, --output [" in result.output and "--json" in result.output
    assert "MT0601" in run("analyze", "--help").output
    assert os.path.basename("docs/output.md") in run("status", "--help").output
