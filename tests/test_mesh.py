"""`meshtrust up` as a newcomer runs it: the quickstart, bad mesh files, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtrust.mesh import read_state
from meshtrust.mesh.probes import alive
from tests.mesh_helpers import (
    ROOT,
    agent_status,
    assert_status_schema,
    http_get,
    meshtrust,
    running_mesh,
    write_mesh,
)
from tests.processes import free_port

pytestmark = pytest.mark.slow

QUICKSTART = ROOT / "examples" / "quickstart" / "mesh.yaml"


def status_json(home: Path) -> dict[str, Any]:
    """`status --json`, checked against docs/status-json.md; exit 0 only when all runs."""
    out = meshtrust("status", "--json", home=home)
    data = json.loads(out.stdout)
    assert isinstance(data, dict)
    assert_status_schema(data)
    assert out.returncode == (0 if data["state"] == "running" else 1), out.stderr
    return data


def quickstart_on_free_ports(directory: Path) -> tuple[Path, int]:
    """examples/quickstart as written, but on free ports and with its workDir in
    ``directory``: the test may run beside other meshes on this machine. Returns the mesh
    file and web's app port."""
    for name in ("app.py", "policies.yaml"):
        shutil.copy(QUICKSTART.parent / name, directory / name)
    mesh = yaml.safe_load(QUICKSTART.read_text())
    mesh["workDir"] = str(directory / "work")
    mesh["ca"]["listen"] = f"127.0.0.1:{free_port()}"
    for svc in mesh["services"]:
        svc["port"], svc["inboundPort"] = free_port(), free_port()
        for up in svc.get("upstreams", []):
            up["localPort"] = free_port()
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    return path, mesh["services"][0]["port"]


def test_quickstart_up_detach_status_rotation_down(tmp_path: Path) -> None:
    home = tmp_path / "home"
    mesh_file, web = quickstart_on_free_ports(tmp_path)
    up = meshtrust("up", "--detach", str(mesh_file), home=home)
    assert up.returncode == 0, up.stdout + up.stderr
    state = read_state(Path((home / "current").read_text().strip()))
    try:
        first = status_json(home)
        services = {s["name"]: s for s in first["services"]}
        assert set(services) == {"web", "backend", "db"}
        for name, svc in services.items():
            assert svc["spiffe_id"] == f"spiffe://cluster.local/ns/default/sa/{name}"
            assert svc["ready"] is True and svc["envoy"]["state"] == "live"
            assert svc["envoy"]["mtls_mode"] == "STRICT" and svc["app"] == "running"
            assert len(svc["serial"]) >= 16
        assert first["ca"]["state"] == "running" and first["ca"]["issued"] >= 3
        assert first["state"] == "running"

        # The allowed call goes through the upstream port; the denied one is denied.
        status, body = http_get(web, "/call/backend")
        assert status == 200 and "backend saw spiffe://cluster.local/ns/default/sa/web" in body
        status, body = http_get(web, "/call/db")
        assert status == 403 and "RBAC: access denied" in body

        # After a rotation period (1 m certificates renew at ~30 s) every serial changed.
        later = _wait_status(
            home,
            lambda d: all(s["serial"] != services[s["name"]]["serial"] for s in d["services"]),
            timeout=60,
        )
        assert all(s["rotations"] >= 1 for s in later["services"])
    finally:
        down = meshtrust("down", home=home)
    assert down.returncode == 0, down.stderr
    assert "stopped the CA" in down.stdout
    assert not any(alive(pid) for pid in state.pids())
    for svc in state.services:
        assert not Path(svc.sds_socket).exists() and not Path(svc.workload_socket).exists()
    again = meshtrust("down", home=home)
    assert again.returncode == 0 and "nothing was running" in again.stdout

    # A mesh that is down: `status` says so and fails.
    stopped = meshtrust("status", home=home)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "is not running" in stopped.stderr and "meshtrust up" in stopped.stderr
    assert status_json(home)["state"] == "down"


def _mesh(tmp_path: Path, **change: Any) -> Path:
    mesh: dict[str, Any] = {
        "workDir": "work",
        "ca": {"listen": "127.0.0.1:25999"},
        "services": [
            {"name": "a", "port": 25001, "upstreams": [{"service": "b", "localPort": 25101}]},
            {"name": "b", "port": 25002},
        ],
        "policies": ["p.yaml"],
    }
    mesh.update(change)
    (tmp_path / "p.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
    )
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    return path


BAD = [
    ("broken-yaml", "is not valid YAML at line"),
    ("unknown-key", "services[1].prot: unknown key"),
    ("duplicate", "services[1].name: duplicate service 'a'"),
    ("missing-upstream", "services[0].upstreams[0].service: no service 'nope'"),
    ("port-clash", "services[1].port: port 25001 is already used by services[0].port"),
    ("bad-policy", "AuthorizationPolicy default/x"),
]


@pytest.mark.parametrize(("case", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_mesh_files_are_refused_before_anything_starts(
    tmp_path: Path, case: str, message: str
) -> None:
    path = _mesh(tmp_path)
    svcs = yaml.safe_load(path.read_text())["services"]
    if case == "broken-yaml":
        path.write_text("services:\n  - name: a\n   port: 1\n")
    elif case == "unknown-key":
        svcs[1]["prot"] = 1
        path = _mesh(tmp_path, services=svcs)
    elif case == "duplicate":
        svcs[1]["name"] = "a"
        path = _mesh(tmp_path, services=svcs)
    elif case == "missing-upstream":
        svcs[0]["upstreams"][0]["service"] = "nope"
        path = _mesh(tmp_path, services=svcs)
    elif case == "port-clash":
        svcs[1]["port"] = 25001
        path = _mesh(tmp_path, services=svcs)
    elif case == "bad-policy":
        (tmp_path / "p.yaml").write_text(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: x, namespace: default}\nspec: {action: ALLOW, rules: [{from: "
            "[{source: {principals: ['a*b']}}]}]}\n"
        )
    out = meshtrust("up", "--detach", str(path), home=tmp_path / "home")
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "work").exists()  # nothing started, nothing written


def test_a_crashed_app_is_reported_and_a_killed_envoy_is_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.mesh_helpers import APP

    path = write_mesh(
        tmp_path,
        [
            {"name": "a", "upstreams": [{"service": "b"}]},
            {"name": "b", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
        ],
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n",
    )
    home = tmp_path / "home"
    monkeypatch.setenv("MESHTRUST_HOME", str(home))
    with running_mesh(path) as mesh:
        b = mesh.service("b")
        assert b.app_pid is not None
        os.kill(b.app_pid, signal.SIGKILL)
        data = _wait_status(home, lambda d: d["services"][1]["app"] == "down")
        assert data["services"][0]["app"] is None  # a has no app; only b's is reported dead
        check = meshtrust("check", "b", "--json", home=home)
        assert check.returncode == 1
        steps = {s["id"]: s for s in json.loads(check.stdout)["steps"]}
        assert steps["app"]["verdict"] == "FAIL" and steps["app"]["hint"]

        envoy_pid = agent_status(mesh, "a")["envoy"]["pid"]
        os.kill(envoy_pid, signal.SIGKILL)
        _wait_status(
            home,
            lambda d: (
                (d["services"][0]["envoy"]["restarts"] or 0) >= 1
                and d["services"][0]["envoy"]["state"] == "live"
            ),
        )
        after = agent_status(mesh, "a")["envoy"]
        assert after["pid"] != envoy_pid and after["live"] is True
        # The restarted Envoy serves again: a -> b reaches b's sidecar (b's app is dead,
        # so its sidecar answers 503 — but a's side works).
        assert http_get(mesh.service("a").upstreams["b"])[0] == 503


def _wait_status(home: Path, check: Any, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = status_json(home)
        if check(data):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"status never satisfied the check: {data}")
        time.sleep(0.3)


STRICT_ONLY = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
)


def _up_process(mesh_file: Path, home: Path, *args: str) -> subprocess.Popen[str]:
    """``meshtrust up ARGS MESH_FILE``, its output in files beside the mesh file (the live
    view of a foreground `up` must not fill a pipe nobody reads)."""
    out = (mesh_file.parent / f"up-{time.monotonic_ns()}.out").open("w")
    with out:
        return subprocess.Popen(
            [sys.executable, "-m", "meshtrust", "up", *args, str(mesh_file)],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MESHTRUST_HOME": str(home)},
        )


def test_two_ups_of_one_fresh_mesh_at_once_the_second_says_who_is_starting(
    tmp_path: Path,
) -> None:
    """Issue 9, point 10: the loser used to fail with "database is locked" (both made the
    same CA directory and ledger); it is told which `up` is starting the mesh instead, and
    once that one runs the mesh, what `up` says of a running mesh."""
    path = write_mesh(tmp_path, [{"name": "a"}], STRICT_ONLY)
    home = tmp_path / "home"
    first, second = _up_process(path, home, "--detach"), _up_process(path, home, "--detach")
    errors = {p.pid: p.communicate(timeout=120)[1] for p in (first, second)}
    codes = {p.pid: p.returncode for p in (first, second)}
    try:
        ok = [pid for pid, rc in codes.items() if rc == 0]
        assert len(ok) == 1, (codes, errors)
        (winner,) = ok
        (loser,) = set(codes) - {winner}
        rc, err = codes[loser], errors[loser]
        assert rc == 2, err
        assert f"another `meshtrust up` of this mesh is starting (pid {winner})" in err
        assert "Traceback" not in err and "database is locked" not in err
        assert status_json(home)["state"] == "running"  # the winner's mesh is whole

        # A third `up` while it runs: what `up` says of a running mesh.
        third = meshtrust("up", "--detach", str(path), home=home)
        assert third.returncode == 2 and "is still running" in third.stderr, third.stderr
    finally:
        meshtrust("down", str(path), home=home)


def test_an_up_in_the_foreground_holds_the_mesh_against_a_second_one(tmp_path: Path) -> None:
    path = write_mesh(tmp_path, [{"name": "a"}], STRICT_ONLY)
    home = tmp_path / "home"
    first = _up_process(path, home)
    try:
        deadline = time.monotonic() + 60
        while not (home / "current").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr
            time.sleep(0.2)
        _wait_status(home, lambda d: d["state"] == "running", timeout=60)
        second = meshtrust("up", "--detach", str(path), home=home)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "is still running" in second.stderr and "meshtrust down" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert status_json(home)["state"] == "down"  # it stopped its mesh, and let go
