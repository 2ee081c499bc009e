"""Modes whatever the umask (issue #9, point 6): `ca init`, `up` and the agents it starts run
under ``umask 000``; then the tree they made is walked, and a second local user tries to
read what is private and to swap what is trusted.

What is expected of every entry (docs/mesh.md, "Files and modes"): directories 0700,
sockets 0600, public certificates and JWKS 0644, every other file 0600 — keys, tokens,
the ledger and its ``-wal``/``-shm``, logs, ``state.json``, generated configs.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrust.mesh import read_state
from tests.attack.other_user import OtherUser
from tests.mesh_helpers import APP, meshtrust, write_mesh

pytestmark = pytest.mark.slow

PUBLIC = {
    "root-cert.pem",
    "bundle.pem",  # the mesh's roots, like root-cert.pem
    "ca-cert.pem",
    "cert-chain.pem",
    "token-jwks.json",
    "crl.pem",
    "EXPIRED",
}
STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
)


def meshtrust_umask(
    *args: str, home: Path, umask: str = "000", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m meshtrust ARGS`` started under ``umask`` (its children inherit it)."""
    command = shlex.join([sys.executable, "-m", "meshtrust", *args])
    return subprocess.run(
        ["sh", "-c", f"umask {umask}; exec {command}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MESHTRUST_HOME": str(home)},
    )


def mode_problems(root: Path, *, exempt: tuple[str, ...] = ()) -> list[str]:
    """Every entry under ``root`` (and ``root`` itself) whose mode is not what it must be.
    ``exempt``: names of directories whose contents another part of meshtrust writes (the
    directory itself is still checked)."""
    problems: list[str] = []
    for entry in [root, *sorted(root.rglob("*"))]:
        st = entry.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            continue  # a link's own mode means nothing; its target is walked
        if any(part in exempt for part in entry.relative_to(root).parts[:-1]):
            continue
        if stat.S_ISDIR(st.st_mode):
            want = {0o700}
        elif stat.S_ISSOCK(st.st_mode):
            want = {0o600}
        elif entry.name in PUBLIC:
            want = {0o644, 0o600}
        else:
            want = {0o600}
        if mode not in want:
            problems.append(f"{entry.relative_to(root.parent)}: {mode:04o}")
    return problems


def test_ca_init_under_umask_000_makes_a_private_directory(tmp_path: Path) -> None:
    ca = tmp_path / "made" / "by" / "init"
    out = meshtrust_umask(
        "ca", "init", "--dir", str(ca), "--trust-domain", "example.org", home=tmp_path / "h"
    )
    assert out.returncode == 0, out.stderr
    assert mode_problems(tmp_path / "made") == []
    assert stat.S_IMODE((ca / "ca-key.pem").stat().st_mode) == 0o600


def test_ca_init_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    ca = tmp_path / "shared"
    ca.mkdir()
    ca.chmod(0o775)
    out = meshtrust("ca", "init", "--dir", str(ca), "--trust-domain", "example.org", home=tmp_path)
    assert out.returncode != 0
    assert f"{ca} is writable by group members (mode 0775)" in out.stderr
    assert "chmod go-w" in out.stderr and "Traceback" not in out.stderr
    assert list(ca.iterdir()) == []  # nothing written into it


def _mesh(directory: Path) -> Path:
    return write_mesh(
        directory,
        [
            {"name": "a", "upstreams": [{"service": "b"}]},
            {"name": "b", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
        ],
        STRICT,
    )


@pytest.mark.parametrize("umask", ["000", "022"])
def test_up_under_any_umask_against_another_user(
    world_traversable_dir: Path, other_user: OtherUser, umask: str
) -> None:
    """The whole mesh (CA, agents, apps) in a directory every user can traverse: only the
    modes meshtrust chose stand between the other user and the files. With the usual
    umask 022 the ledger, logs and state.json used to be 0644; with 000 everything 0777."""
    home = world_traversable_dir / "home"
    mesh_file = _mesh(world_traversable_dir)
    up = meshtrust_umask("up", "--detach", str(mesh_file), home=home, umask=umask)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = read_state(Path((home / "current").read_text().strip()))
        work = Path(state.work_dir)
        assert state.ca is not None  # one host: the CA is this mesh's
        ca_dir = Path(state.ca.ca_dir)
        ledger = ca_dir / "ledger.db"
        a = state.service("a")
        certs = Path(a.cert_dir)
        secrets = [
            ledger,
            Path(f"{ledger}-wal"),
            ca_dir / "ca-key.pem",
            ca_dir / "root-key.pem",
            Path(state.ca.log),
            Path(a.agent_log),
            Path(state.service("b").app_log or ""),
            work / "state.json",
            work / "a" / "token",
            work / "a" / "agent.yaml",
            certs / "key.pem",
            home / "current",
        ]
        for path in secrets:
            assert path.exists(), path
            read = other_user.run(["cat", str(path)])
            assert read.returncode != 0 and b"Permission denied" in read.stderr, path

        # Swapping what the mesh trusts: the CA's root, the agent's `..data` link.
        fake = world_traversable_dir / "fake.pem"
        fake.write_text("not a root")
        fake.chmod(0o644)
        root_cert = ca_dir / "root-cert.pem"
        before = root_cert.read_bytes()
        link = certs / "..data"
        target = os.readlink(link)
        for argv in (
            ["cp", str(fake), str(root_cert)],
            ["ln", "-sfn", str(fake), str(root_cert)],
            ["ln", "-sfn", str(world_traversable_dir), str(link)],
            ["mv", str(link), str(world_traversable_dir / "stolen")],
        ):
            assert other_user.run(argv).returncode != 0, argv
        assert root_cert.read_bytes() == before and os.readlink(link) == target

        for side in ("", "-wal", "-shm"):
            assert Path(f"{ledger}{side}").exists(), side
        # Each Envoy's directory (config, log, pidfile, LDS file, admin socket) included.
        assert mode_problems(work) == []
        assert mode_problems(home) == []
    finally:
        meshtrust("down", str(mesh_file), home=home)
