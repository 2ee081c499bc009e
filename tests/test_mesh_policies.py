"""Istio policies enforced end to end: three workloads with agents and real Envoy sidecars,
real mTLS, policies applied and edited live (docs/design.md "Sidecar and policy")."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshtrust.cli import cli
from meshtrust.mesh.status import mesh_status
from tests.mesh_helpers import (
    APP,
    agent_status,
    assert_status_schema,
    envoy_serial,
    http_get,
    running_mesh,
    tcp_roundtrip,
    upstream_port,
    write_mesh,
)
from tests.waiting import until

pytestmark = pytest.mark.slow

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""

ALLOW_A = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-from-a, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/default/sa/a]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: t-from-a, namespace: default}
spec:
  selector: {matchLabels: {app: t}}
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/default/sa/a]}}]
"""

ALLOW_A_AND_C = ALLOW_A.replace(
    "principals: [cluster.local/ns/default/sa/a]}}]\n---",
    "principals: [cluster.local/ns/default/sa/a, cluster.local/ns/default/sa/c]}}]\n---",
    1,
)

DENY_C = """
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: never-c, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
    - from: [{source: {principals: ["*/sa/c"]}}]
"""


def services() -> list[dict[str, object]]:
    # a and c are played by the test itself (it talks to their sidecars' local ports);
    # b is the quickstart app (it reports who called); t is a TCP echo server.
    return [
        {"name": "a", "upstreams": [{"service": "b"}, {"service": "t"}]},
        {"name": "b", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
        {"name": "c", "upstreams": [{"service": "b"}, {"service": "t"}]},
        {"name": "t", "protocol": "tcp", "command": ["python3", "tcp_echo.py"]},
    ]


def caller_seen(body: str) -> str:
    return str(json.loads(body)["caller"])


def test_allowed_denied_and_deny_beats_allow(tmp_path: Path) -> None:
    path = write_mesh(tmp_path, services(), STRICT + ALLOW_A)
    with running_mesh(path) as mesh:
        a_to_b, c_to_b = upstream_port(mesh, "a", "b"), upstream_port(mesh, "c", "b")
        status, body = http_get(a_to_b)
        assert status == 200
        assert caller_seen(body) == "spiffe://cluster.local/ns/default/sa/a"
        c_calls = []

        def from_c() -> int:
            c_calls.append(http_get(c_to_b)[0])
            return c_calls[-1]

        status, body = http_get(c_to_b)
        assert (status, body) == (403, "RBAC: access denied")
        # TCP: allowed through, denied by closing the connection.
        assert tcp_roundtrip(upstream_port(mesh, "a", "t")) == b"echo:ping"
        assert tcp_roundtrip(upstream_port(mesh, "c", "t")) == b""

        # A DENY beats an ALLOW that also names c.
        (tmp_path / "policies.yaml").write_text(STRICT + ALLOW_A_AND_C + DENY_C)
        until(lambda: agent_status(mesh, "b")["envoy"]["policy_version"] >= 2)
        until(lambda: from_c() == 403)  # Envoy reloads within ms of the rename
        assert [from_c() for _ in range(5)] == [403] * 5
        assert http_get(a_to_b)[0] == 200

        # `status` counts each request once, though with a DENY and an ALLOW filter an
        # allowed request passes both; shown per service, as the callee's sidecar saw them.
        b, t = (mesh_status(mesh)["services"][i] for i in (1, 3))
        assert [s["name"] for s in (b, t)] == ["b", "t"]
        assert b["connections"]["allowed"] == 2  # a's two calls
        assert b["connections"]["denied"] == 1 + c_calls.count(403)
        assert (t["connections"]["allowed"], t["connections"]["denied"]) == (1, 1)


def test_rotation_under_load_and_live_policy_edit(tmp_path: Path) -> None:
    path = write_mesh(tmp_path, services(), STRICT + ALLOW_A, cert_ttl="10s")
    with running_mesh(path) as mesh:
        a_to_b, c_to_b = upstream_port(mesh, "a", "b"), upstream_port(mesh, "c", "b")
        loop = _Loop(a_to_b)
        loop.start()
        try:
            # Several rotations of both ends (10 s certificates renew every ~5 s) under load.
            seen: set[int] = set()
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline and len(seen) < 4:
                serial = envoy_serial(mesh, "b")
                if serial == int(agent_status(mesh, "b")["serial"], 16):
                    seen.add(serial)
                time.sleep(0.2)
            assert len(seen) >= 4, "Envoy /certs did not show each new serial"

            # The policy edit: allow c; it applies within seconds, a's loop never fails.
            assert http_get(c_to_b)[0] == 403
            (tmp_path / "policies.yaml").write_text(STRICT + ALLOW_A_AND_C)

            # New connections see the new policy at once; each connection c's sidecar pooled
            # before the change (one pool per Envoy worker thread) answers once more under the
            # old one, then closes (drain). So: many allowed calls in a row, each seen as c.
            def c_allowed() -> bool:
                status, body = http_get(c_to_b)
                return (
                    status == 200 and caller_seen(body) == "spiffe://cluster.local/ns/default/sa/c"
                )

            until(lambda: all(c_allowed() for _ in range(20)), timeout=10)
            time.sleep(1)
        finally:
            loop.stop()
        assert loop.ok > 100
        assert loop.failures == [], loop.failures[:5]


def test_a_bad_policy_edit_is_refused_and_the_old_one_stays(tmp_path: Path) -> None:
    path = write_mesh(tmp_path, services(), STRICT + ALLOW_A)
    with running_mesh(path) as mesh:
        (tmp_path / "policies.yaml").write_text(
            STRICT + ALLOW_A.replace("action: ALLOW", "action: MAYBE", 1)
        )
        until(lambda: agent_status(mesh, "b")["envoy"]["policy_error"] is not None)
        error = agent_status(mesh, "b")["envoy"]["policy_error"]
        assert "policies.yaml" in error and "AuthorizationPolicy default/b-from-a" in error
        assert "action" in error
        assert http_get(upstream_port(mesh, "a", "b"))[0] == 200
        assert http_get(upstream_port(mesh, "c", "b"))[0] == 403

        # `status` shows the refusal with its message, in the table and in --json.
        table = CliRunner().invoke(cli, ["status", str(path)], catch_exceptions=False)
        assert table.exit_code == 0, table.output
        words = " ".join(table.output.split())
        assert "STRICT (edit refused)" in words
        assert "b: policy edit refused (the sidecar keeps policy version 1, STRICT):" in words
        assert "AuthorizationPolicy default/b-from-a" in words
        out = CliRunner().invoke(cli, ["status", str(path), "--json"], catch_exceptions=False)
        assert out.exit_code == 0, out.output
        document = json.loads(out.stdout)
        assert_status_schema(document)
        b = next(s for s in document["services"] if s["name"] == "b")
        assert b["envoy"]["policy_error"] == error and b["envoy"]["policy_version"] == 1


class _Loop:
    """The app of a calling b as fast as it can, counting every failure."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = http_get(self.port)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"{status} {body[:80]}")
            time.sleep(0.01)
