"""The operator's tools against a live mesh: ``proxy-config secret``, ``check`` and
``certs monitor`` (docs/design.md "Operator's tools"), including a certificate that expired
because the CA went away."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from meshtrust.cli import cli
from meshtrust.mesh import MeshState
from tests import mesh_helpers
from tests.mesh_helpers import APP, CHECK_WALK, agent_status
from tests.waiting import until

pytestmark = pytest.mark.slow


# a's calls to b are refused by b's sidecar: RBAC denials to find with `check b`.
DENY_A_TO_B = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-not-from-a, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/default/sa/a]}}]
"""


def two_services(directory: Path, cert_ttl: str, policies: str = "") -> Path:
    """Two services: a (no app) calls b (the quickstart app)."""
    return mesh_helpers.write_mesh(
        directory,
        [
            {"name": "a", "upstreams": [{"service": "b"}]},
            {"name": "b", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
        ],
        policies or "# no policies\n",
        cert_ttl=cert_ttl,
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshState, Path]]:
    directory = tmp_path_factory.mktemp("tools")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESHTRUST_HOME", str(directory / "home"))
        path = two_services(directory, "12s", DENY_A_TO_B)
        with mesh_helpers.running_mesh(path) as state:
            yield state, path


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_json(*args: str | Path, code: int = 0) -> Any:
    result = run(*args, "--json")
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def root_serial(state: MeshState) -> int:
    root = x509.load_pem_x509_certificate(Path(state.root_cert).read_bytes())
    return root.serial_number


def by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["id"]: step for step in report["steps"]}


def test_proxy_config_secret_shows_what_envoy_serves(live: tuple[MeshState, Path]) -> None:
    state, path = live
    for name in ("a", "b"):
        # The agent rotates every ~6 s: Envoy's serial is the agent's before or after the call.
        before = int(agent_status(state, name)["serial"], 16)
        rows = run_json("proxy-config", "secret", name, "--mesh", path)
        after = int(agent_status(state, name)["serial"], 16)
        # ROOTCA~shared-root: the validation context of the chain for other trust domains under
        # the mesh's roots (envoy/trust_domains.py), the same roots without the CRLs.
        assert [r["resource_name"] for r in rows] == ["default", "ROOTCA", "ROOTCA~shared-root"]
        leaf, root, peer = rows
        assert peer["serial_number"] == root["serial_number"]
        assert leaf["type"] == "Cert Chain" and root["type"] == "CA"
        assert leaf["status"] == root["status"] == "ACTIVE"
        assert leaf["valid_cert"] is True and root["valid_cert"] is True
        assert int(leaf["serial_number"], 16) in {before, after}
        # Envoy's format: lower-case hex in whole bytes.
        assert leaf["serial_number"] == leaf["serial_number"].lower()
        assert len(leaf["serial_number"]) % 2 == 0
        assert leaf["subject_alt_names"] == [state.service(name).spiffe_id]
        assert int(root["serial_number"], 16) == root_serial(state)
        assert leaf["not_before"] < leaf["not_after"]
        assert leaf["not_after"].endswith("Z") and leaf["version_info"]

    # The table, for the mesh started last (no --mesh).
    result = run("proxy-config", "secret", "a")
    assert result.exit_code == 0, result.output
    for word in ("RESOURCE NAME", "VALID CERT", "SERIAL NUMBER", "Cert Chain", "ROOTCA", "true"):
        assert word in result.output


def test_check_passes_then_reports_tls_errors_and_denials(live: tuple[MeshState, Path]) -> None:
    state, path = live
    for name in ("a", "b"):
        report = run_json("check", name, "--mesh", path)
        assert report["ok"] is True
        steps = by_id(report)
        assert list(steps) == CHECK_WALK
        for step in report["steps"]:
            no_app = name == "a"
            expected = "SKIP" if step["id"] == "app" and no_app else "PASS"
            assert step["verdict"] == expected, step
        assert state.service(name).spiffe_id in steps["identity"]["detail"]
        assert "PERMISSIVE" in steps["policy"]["detail"]

    # A caller without a client certificate, and a call the policy denies.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", state.service("b").inbound_port), 5) as sock:
        try:
            with ctx.wrap_socket(sock) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
                tls.recv(100)  # TLS 1.3: the refusal arrives after the handshake
        except OSError:  # ssl.SSLError: certificate required
            pass
    conn = http.client.HTTPConnection("127.0.0.1", state.service("a").upstreams["b"], timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 403
    conn.close()

    report = run_json("check", "b", "--mesh", path)
    assert report["ok"] is True  # warnings, no failure: exit status 0
    steps = by_id(report)
    assert steps["tls-errors"]["verdict"] == "WARN"
    assert "fail_verify_no_cert=1" in steps["tls-errors"]["detail"]
    assert "client certificate" in steps["tls-errors"]["hint"]
    assert steps["rbac"]["verdict"] == "WARN"
    assert "1 denied" in steps["rbac"]["detail"]
    assert "AuthorizationPolicy" in steps["rbac"]["hint"]

    result = run("check", "b", "--mesh", path)
    assert result.exit_code == 0
    assert "WARN" in result.output and "RBAC denials" in result.output


def test_certs_monitor_warns_within_the_window(live: tuple[MeshState, Path]) -> None:
    _, path = live
    report = run_json("certs", "monitor", "--mesh", path, "--warn-within", "1s")
    assert report["ok"] is True
    assert [c["service"] for c in report["certificates"]] == ["a", "b"]
    for cert in report["certificates"]:
        assert cert["status"] == "OK" and cert["source"] == "agent"
        assert 0 < cert["expires_in_seconds"] <= 12
        assert cert["serial"] and cert["not_after"].endswith("Z")

    report = run_json("certs", "monitor", "--mesh", path, "--warn-within", "1h", code=1)
    assert report["ok"] is False
    assert {c["status"] for c in report["certificates"]} == {"WARN"}

    result = run("certs", "monitor", "--warn-within", "1h")
    assert result.exit_code == 1
    assert "WARN" in result.output and "expiring within 1h" in result.output


@pytest.mark.parametrize(
    "command",
    [["proxy-config"], ["proxy-config", "secret"], ["check"], ["certs"], ["certs", "monitor"]],
)
def test_every_tool_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert len(result.output.split("\n\n")[1].strip()) > 20  # a sentence, not just options


def test_clear_errors(
    live: tuple[MeshState, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = live
    for args in (["proxy-config", "secret", "nope"], ["check", "nope"]):
        result = run(*args, "--mesh", path)
        assert result.exit_code == 2
        assert "no service 'nope'" in result.output and "services: a, b" in result.output

    monkeypatch.setenv("MESHTRUST_HOME", str(tmp_path))  # no mesh started from here
    for args in (["proxy-config", "secret", "a"], ["check", "a"], ["certs", "monitor"]):
        result = run(*args)
        assert result.exit_code == 2
        assert "no mesh has been started" in result.output


def test_an_expired_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTRUST_HOME", str(tmp_path / "home"))
    path = two_services(tmp_path, "10s")
    with mesh_helpers.running_mesh(path) as state:
        assert state.ca is not None
        os.kill(state.ca.pid, signal.SIGKILL)
        until(
            lambda: all(agent_status(state, s)["expires_in_seconds"] < 0 for s in ("a", "b")),
            timeout=30,
            what="the certificates expired",
        )

        rows = run_json("proxy-config", "secret", "a", "--mesh", path)
        leaf, root, _ = rows
        assert leaf["resource_name"] == "default" and leaf["valid_cert"] is False
        assert int(leaf["serial_number"], 16) == int(agent_status(state, "a")["serial"], 16)
        assert root["resource_name"] == "ROOTCA" and root["valid_cert"] is True
        result = run("proxy-config", "secret", "a", "--mesh", path)
        assert "false" in result.output

        report = run_json("check", "a", "--mesh", path, code=1)
        steps = by_id(report)
        assert report["ok"] is False
        assert steps["time-left"]["verdict"] == "FAIL"
        assert "EXPIRED" in steps["time-left"]["detail"]
        assert "CA" in steps["time-left"]["hint"] and "not running" in steps["time-left"]["hint"]
        assert steps["chain"]["verdict"] == "PASS"  # still signed by the mesh root
        result = run("check", "a", "--mesh", path)
        assert result.exit_code == 1
        assert "FAIL time left" in result.output

        report = run_json("certs", "monitor", "--mesh", path, "--warn-within", "1s", code=1)
        assert {c["status"] for c in report["certificates"]} == {"EXPIRED"}
        assert all("expired" in c["message"] for c in report["certificates"])
        result = run("certs", "monitor", "--mesh", path)
        assert result.exit_code == 1 and "EXPIRED" in result.output

        # A refused policy edit is a FAIL of the policy step, with the error.
        (tmp_path / "policies.yaml").write_text(DENY_A_TO_B.replace("DENY", "MAYBE", 1))
        until(
            lambda: agent_status(state, "b")["envoy"]["policy_error"] is not None,
            what="the bad policy was noticed",
        )
        steps = by_id(run_json("check", "b", "--mesh", path, code=1))
        assert steps["policy"]["verdict"] == "FAIL"
        assert "MAYBE" in steps["policy"]["detail"] and "action" in steps["policy"]["detail"]
        assert "policies.yaml" in steps["policy"]["hint"]

        # An agent that died: said plainly; monitor falls back to the certificate files.
        os.kill(state.service("b").agent_pid, signal.SIGKILL)
        until(lambda: run("proxy-config", "secret", "b", "--mesh", path).exit_code != 0, timeout=10)
        result = run("proxy-config", "secret", "b", "--mesh", path)
        assert result.exit_code == 1
        assert "the agent of b" in result.output and "not running" in result.output
        steps = by_id(run_json("check", "b", "--mesh", path, code=1))
        assert steps["agent"]["verdict"] == "FAIL"
        assert steps["envoy"]["verdict"] == "SKIP"
        report = run_json("certs", "monitor", "--mesh", path, code=1)
        b = report["certificates"][1]
        assert (b["service"], b["source"], b["status"]) == ("b", "files", "EXPIRED")
