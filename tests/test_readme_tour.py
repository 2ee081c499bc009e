"""The README's "pieces one by one" tour, run exactly as written (ports swapped for free ones).

It must work in a fresh temporary directory with explicit ports: nothing written into the
repository, no clash with a mesh on the default ports 15012/15014/15021.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.processes import free_port

REPO = Path(__file__).resolve().parent.parent
TOUR_PORTS = ("25012", "25014", "25021")

pytestmark = pytest.mark.slow


def tour_script() -> str:
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- tour:begin -->", 1)[1].split("<!-- tour:end -->", 1)[0]
    script = block.split("```sh\n", 1)[1].rsplit("```", 1)[0]
    for port in TOUR_PORTS:
        assert f"127.0.0.1:{port}" in script, f"the tour no longer names port {port}"
    return script


def repo_files() -> set[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Caches that any Python run may touch are not the tour's doing.
    return {line for line in out.splitlines() if "__pycache__" not in line and ".cache" not in line}


def test_the_readme_tour_runs_in_a_temp_dir_with_explicit_ports(tmp_path: Path) -> None:
    script = tour_script()
    for port in TOUR_PORTS:
        script = script.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    before = repo_files()
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a failed step cannot leave the CA or agent behind
    )
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            leftover = True
        except ProcessLookupError:
            leftover = False
    assert proc.returncode == 0, output
    assert not leftover, "the tour left a process running"  # it stops its own servers
    assert "Traceback" not in output
    lines = output.splitlines()
    assert "spiffe://example.org/ns/default/sa/web" in lines  # py-spiffe's answer
    assert any(line.startswith("istio_agent_cert_expiry_seconds{") for line in lines)
    # Everything the tour wrote is below its one temporary directory.
    (made,) = tmp.iterdir()
    assert {p.name for p in made.iterdir()} >= {"ca", "web.token", "web", "certs"}
    assert repo_files() == before
