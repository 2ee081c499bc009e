"""Errors at the command line's boundary: one line naming the path, never a traceback."""

from __future__ import annotations

import errno
from pathlib import Path

from meshtrust.cli.main import describe_os_error
from tests.processes import run_cli


def test_ca_init_below_a_regular_file_is_one_line_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file\n")
    result = run_cli("ca", "init", "--dir", str(blocker / "ca"), "--trust-domain", "example.org")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(blocker) in lines[0]
    assert blocker.read_text() == "a regular file\n"  # nothing written over it


def test_os_errors_name_what_failed_and_where() -> None:
    assert (
        describe_os_error(NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/f/ca"))
        == "Not a directory: /a/f/ca"
    )
    renamed = OSError(errno.EXDEV, "Invalid cross-device link", "/a/x", None, "/b/x")
    assert describe_os_error(renamed) == "Invalid cross-device link: /a/x -> /b/x"
    assert describe_os_error(OSError("socket closed")) == "socket closed"
