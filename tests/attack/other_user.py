"""A second, unprivileged local user, created by the tests, to try what any user on the host
could: connect to sockets, read files, send signals.

The user (``meshtrust-attacker``) is created once with ``useradd --system`` and left in
place (creating and deleting users per test would race with other test processes; the user
owns nothing and has no login shell). Commands run as it through ``setpriv`` with every
supplementary group cleared.

Creating a user needs root. CI runs as root; a run that is not root *fails* here with a hint,
because skipping these tests would hide the very cases they keep fixed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["OtherUser", "other_user", "world_traversable_dir"]

NAME = "meshtrust-attacker"


@dataclass(frozen=True)
class OtherUser:
    """The second local user: its ids, and a way to run a command as it."""

    name: str
    uid: int
    gid: int

    def run(
        self, argv: Sequence[str], *, timeout: float = 30.0, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` as this user (no supplementary groups, a clean environment)."""
        command = [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
            *argv,
        ]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
        return subprocess.run(
            command, capture_output=True, timeout=timeout, input=input, env=env, check=False
        )

    def python(self, code: str, *, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        """Run Python ``code`` as this user with the system's python3 (no venv: the user
        could not read root's anyway), e.g. to open a Unix socket or a file."""
        return self.run(["python3", "-I", "-c", code], timeout=timeout)


def _ensure_user() -> OtherUser:
    if os.geteuid() != 0:
        pytest.fail(
            "the attack tests that play a second local user need root (CI runs as root): "
            "run them as root, e.g. `sudo scripts/test tests/attack`",
            pytrace=False,
        )
    for tool in ("useradd", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (Debian: apt-get install passwd util-linux)")
    try:
        entry = pwd.getpwnam(NAME)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", NAME],
            check=False,  # a parallel creator may have won; getpwnam below decides
            capture_output=True,
        )
        entry = pwd.getpwnam(NAME)
    return OtherUser(name=NAME, uid=entry.pw_uid, gid=entry.pw_gid)


@pytest.fixture(scope="session")
def other_user() -> OtherUser:
    """The second local user (created on first use; needs root)."""
    return _ensure_user()


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """A fresh directory every user can traverse (0755, under /tmp), removed afterwards.

    pytest's own ``tmp_path`` lives under a 0700 directory, where no other user can reach
    anything at all; a test about a file's or socket's *own* mode needs the path up to it
    open, so that only the mode under test stands in the way.
    """
    path = Path(tempfile.mkdtemp(prefix="meshtrust-attack-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
