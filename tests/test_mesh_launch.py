"""The launcher of `meshtrust up`: the free-port check, and failures while launching."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from meshtrust.errors import ConfigError
from meshtrust.mesh import MeshStartFailed, launch, load_mesh_config, plan_mesh
from meshtrust.mesh.launch import pick_free_port, port_free
from meshtrust.mesh.state import CaState, MeshState
from tests.mesh_helpers import meshtrust
from tests.processes import free_port

STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
)


def _time_wait(port: int = 0) -> tuple[socket.socket, int]:
    """A listener on ``port`` with one closed connection whose server side is TIME_WAIT."""
    listener = socket.create_server(("127.0.0.1", port))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    server_side, _ = listener.accept()
    server_side.close()  # the server closes first: its side of the connection is TIME_WAIT
    client.recv(1)
    client.close()
    return listener, port


def test_a_port_in_time_wait_is_free_and_a_listener_is_not() -> None:
    listener, port = _time_wait()
    assert not port_free(port)  # still listening
    listener.close()

    # The TIME_WAIT is real: a bind without SO_REUSEADDR (the old check) is refused ...
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    # ... and the check says free, as a server with SO_REUSEADDR could bind it now.
    assert port_free(port)
    server = socket.create_server(("127.0.0.1", port))  # sets SO_REUSEADDR
    server.close()


def test_a_fixed_port_in_use_refuses_the_mesh_before_anything_is_written(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    path = _mesh_file(tmp_path, "work", ca_port=port)
    try:
        with pytest.raises(ConfigError, match=rf"port {port} \(ca.listen\) is already in use"):
            launch(plan_mesh(load_mesh_config(path), pick_free_port), progress=lambda _: None)
    finally:
        listener.close()
    # Only the lock every `up` takes first (point 10 of issue 9), in a 0700 workDir.
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["up.lock"]


def _mesh_file(
    directory: Path, work_dir: str, ca_port: int | None = None, ca_dir: str | None = None
) -> Path:
    (directory / "p.yaml").write_text(STRICT)
    (directory / "app.py").write_text("import time\ntime.sleep(60)\n")
    mesh = {
        "certTTL": "1m",
        "workDir": work_dir,
        "ca": {
            "listen": f"127.0.0.1:{ca_port or free_port()}",
            **({"dir": ca_dir} if ca_dir else {}),
        },
        "services": [
            {
                "name": "a",
                "port": free_port(),
                "upstreams": [{"service": "b", "localPort": free_port()}],
            },
            {"name": "b", "port": free_port(), "command": ["python3", "app.py"]},
        ],
        "policies": ["p.yaml"],
    }
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    return path


def _up(path: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return meshtrust("up", "--detach", str(path), home=home)


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that mention ``text`` (our mesh's paths)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


def test_a_work_dir_below_a_regular_file_is_one_line_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory\n")
    out = _up(_mesh_file(tmp_path, "afile/work"), tmp_path / "home")
    # (1: found at launch; 2 if the mesh file's validation refuses it first.)
    assert out.returncode in (1, 2), out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(tmp_path / "afile") in line
    if out.returncode == 1:
        assert line.startswith("error: cannot create the directory ")
        assert str(tmp_path / "afile" / "work") in line and "Not a directory" in line
    assert _processes_mentioning(str(tmp_path)) == []


@pytest.mark.parametrize(
    ("ca_dir", "problem"), [("afile", "File exists"), ("afile/ca", "Not a directory")]
)
def test_a_ca_dir_that_cannot_be_made_is_one_line_naming_the_path(
    tmp_path: Path, ca_dir: str, problem: str
) -> None:
    (tmp_path / "afile").write_text("not a directory\n")
    out = _up(_mesh_file(tmp_path, "work", ca_dir=ca_dir), tmp_path / "home")
    # (1: found at launch; 2 if the mesh file's validation refuses it first.)
    assert out.returncode in (1, 2), out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(tmp_path / ca_dir) in line
    if out.returncode == 1:
        assert line == f"error: cannot set up the CA directory {tmp_path / ca_dir}: {problem}"
    assert _processes_mentioning(str(tmp_path)) == []


@pytest.mark.slow
def test_an_os_error_after_processes_started_stops_them_all(tmp_path: Path) -> None:
    # b's app log cannot be opened (a directory is in its place): that happens after the CA
    # and both agents (and their Envoys) were started.
    app_log = tmp_path / "work" / "logs" / "b-app.log"
    app_log.mkdir(parents=True)
    out = _up(_mesh_file(tmp_path, "work"), tmp_path / "home")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "starting the CA" in out.stdout and "starting a: agent + Envoy" in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot open the log of the app of b {app_log}: Is a directory"]
    assert _processes_mentioning(str(tmp_path)) == []
    assert not (tmp_path / "work" / "state.json").exists()


def test_up_refuses_a_socket_path_too_long_before_anything_starts(tmp_path: Path) -> None:
    work = tmp_path / ("w" * 90)
    out = _up(_mesh_file(tmp_path, str(work)), tmp_path / "home")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: service a: its socket path ")
    assert "more than the 107 a Unix socket path may have" in out.stderr
    assert not work.exists()


@pytest.mark.slow
def test_up_right_after_a_mesh_stopped_with_its_ports_in_time_wait(tmp_path: Path) -> None:
    # What a stopped mesh leaves behind for a minute: connections in TIME_WAIT on its fixed
    # ports (here ca.listen and a's inboundPort).
    ca_listener, ca_port = _time_wait()
    ca_listener.close()
    inbound_listener, inbound = _time_wait()
    inbound_listener.close()
    (tmp_path / "p.yaml").write_text(STRICT)
    mesh = {
        "workDir": "work",
        "ca": {"listen": f"127.0.0.1:{ca_port}"},
        "services": [{"name": "a", "port": free_port(), "inboundPort": inbound}],
        "policies": ["p.yaml"],
    }
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    home = tmp_path / "home"
    try:
        out = _up(path, home)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        meshtrust("down", str(path), home=home, timeout=60)
    assert _processes_mentioning(str(tmp_path)) == []


def _previous_state(work: Path, mesh: Path, ca_pid: int) -> None:
    """A state file in ``work`` as an earlier `up` of ``mesh`` left it, its CA ``ca_pid``."""
    state = MeshState(
        mesh_file=str(mesh),
        work_dir=str(work),
        trust_domain="cluster.local",
        cert_ttl_seconds=60,
        ca=CaState(ca_pid, "127.0.0.1:1", "127.0.0.1:2", str(work / "ca"), str(work / "ca.log")),
        services=[],
    )
    work.mkdir(parents=True)
    (work / "state.json").write_text(json.dumps(dataclasses.asdict(state)))


def _sleeper(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])


def test_up_refuses_to_start_over_a_mesh_of_its_work_dir_that_still_runs(tmp_path: Path) -> None:
    # The mesh file's ports were edited since: only the state file knows the old mesh runs.
    path = _mesh_file(tmp_path, "work")
    ca = _sleeper("-m", "meshtrust", "ca", "serve")  # looks like a CA to /proc
    try:
        _previous_state(tmp_path / "work", path, ca.pid)
        with pytest.raises(ConfigError) as exc:
            launch(plan_mesh(load_mesh_config(path), pick_free_port), progress=lambda _: None)
        assert str(exc.value) == (
            f"the mesh of {path.resolve()} in {(tmp_path / 'work').resolve()} is still running "
            f"(pids {ca.pid}); stop it first: `meshtrust down {path.resolve()}`"
        )
        assert ca.poll() is None  # left alone
        assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["state.json", "up.lock"]
    finally:
        ca.kill()
        ca.wait()


def test_a_state_file_whose_pids_are_not_meshtrust_does_not_block_up(tmp_path: Path) -> None:
    # A pid of the old mesh reused by another program: not the mesh; up goes on (and here
    # stops at the next check, a port in use).
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    path = _mesh_file(tmp_path, "work", ca_port=port)
    other = _sleeper()
    try:
        _previous_state(tmp_path / "work", path, other.pid)
        with pytest.raises(ConfigError, match=rf"port {port} \(ca.listen\) is already in use"):
            launch(plan_mesh(load_mesh_config(path), pick_free_port), progress=lambda _: None)
    finally:
        other.kill()
        other.wait()
        listener.close()


def _up_until(path: Path, home: Path, seen: str) -> subprocess.Popen[str]:
    """`meshtrust up` (not detached), read until it prints ``seen``."""
    up = subprocess.Popen(
        [sys.executable, "-m", "meshtrust", "up", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MESHTRUST_HOME": str(home), "PYTHONUNBUFFERED": "1"},
    )
    assert up.stdout is not None
    for line in up.stdout:
        if seen in line:
            return up
    up.kill()
    raise AssertionError(f"up exited before it printed {seen!r}: {up.communicate()[1]}")


def _signal_and_wait(up: subprocess.Popen[str], signals: tuple[signal.Signals, ...]) -> str:
    try:
        for sig in signals:
            up.send_signal(sig)
            time.sleep(0.2)  # the second one arrives while the first is stopping the mesh
        return up.communicate(timeout=60)[1]
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)], ids=["SIGTERM", "Ctrl-C twice"]
)
def test_up_interrupted_while_starting_stops_what_it_started(
    tmp_path: Path, signals: tuple[signal.Signals, ...]
) -> None:
    # The mesh's processes run in sessions of their own: killed by SIGTERM, `up` used to
    # leave the CA and the agents running, with no state file for `down` to find them by;
    # a second Ctrl-C cut the stopping short. The signal lands as the agents are spawned.
    up = _up_until(_mesh_file(tmp_path, "work"), tmp_path / "home", "starting a: agent + Envoy")
    err = _signal_and_wait(up, signals)
    assert up.returncode == 1 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: interrupted while the mesh was starting; everything started has been stopped"
    ]
    assert _processes_mentioning(str(tmp_path)) == []
    assert not (tmp_path / "work" / "state.json").exists()


@pytest.mark.slow
def test_up_stops_the_running_mesh_on_ctrl_c(tmp_path: Path) -> None:
    up = _up_until(_mesh_file(tmp_path, "work"), tmp_path / "home", "are ready")
    err = _signal_and_wait(up, (signal.SIGINT,))
    assert up.returncode == 0 and "Traceback" not in err, err
    assert _processes_mentioning(str(tmp_path)) == []


@pytest.mark.slow
def test_a_state_that_cannot_be_recorded_stops_the_mesh_and_leaves_no_state_file(
    tmp_path: Path,
) -> None:
    # Everything started and is ready; then ~/.meshtrust cannot be made (below a file).
    (tmp_path / "afile").write_text("not a directory\n")
    home = tmp_path / "afile" / "home"
    out = _up(_mesh_file(tmp_path, "work"), home)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "all sidecars have their certificates and are ready" in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write the mesh state {home}: Not a directory"]
    assert "Traceback" not in out.stderr
    assert _processes_mentioning(str(tmp_path)) == []
    # A state file would send `status` and `down` to processes that were stopped again.
    assert not (tmp_path / "work" / "state.json").exists()


@pytest.mark.parametrize("name", ["agent.yaml", "token"])
def test_a_file_that_cannot_be_written_is_named_and_nothing_starts(
    tmp_path: Path, name: str
) -> None:
    path = _mesh_file(tmp_path, "work")
    blocked = tmp_path / "work" / "a" / name
    blocked.mkdir(parents=True)  # a directory where the file goes
    started: list[str] = []
    with pytest.raises(MeshStartFailed) as exc:
        launch(plan_mesh(load_mesh_config(path), pick_free_port), progress=started.append)
    what = "write the token" if name == "token" else "write"
    assert str(exc.value) == f"cannot {what} {blocked.resolve()}: Is a directory"
    assert started == []
    # written whole or not at all: no temporary file left beside it
    assert sorted(p.name for p in blocked.parent.iterdir() if p.name.startswith(".")) == []


def test_the_mesh_lock_names_the_up_that_holds_it(tmp_path: Path) -> None:
    """Issue 9, point 10, without processes: another holder of ``up.lock`` (here another
    open file of this process, which flock treats the same) is named by its pid."""
    import fcntl

    from meshtrust.mesh.launch import UP_LOCK, mesh_lock

    work = tmp_path / "work"
    with mesh_lock(work):
        assert (work / UP_LOCK).read_text() == f"{os.getpid()}\n"
        assert oct(work.stat().st_mode & 0o777) == "0o700"
        with mesh_lock(work):  # re-entrant: `up` holds it, then `launch` takes it again
            pass
    with (work / UP_LOCK).open("r+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate()
        other.write("4242\n")
        other.flush()
        with pytest.raises(
            ConfigError, match=r"another `meshtrust up` of this mesh is starting \(pid 4242\)"
        ):
            with mesh_lock(work):
                pass
    with mesh_lock(work):  # let go of: free again
        pass
