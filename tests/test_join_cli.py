"""``meshtrust join create`` and ``meshtrust join show``: a 0600 file that grants what was
asked, shown without its token; clear refusals for bad arguments."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshtrust.cli import cli
from meshtrust.joinfile import load_join_file

WEB = "spiffe://example.org/ns/default/sa/web"
API = "spiffe://example.org/ns/default/sa/api"


def create(ca_dir: Path, out: Path, *extra: str) -> tuple[int, str]:
    args = ["join", "create", "--ca-dir", str(ca_dir), "--host", "h2", "--identity", WEB]
    args += ["--identity", API, "--ca-address", "198.18.0.1:15012", "-o", str(out), *extra]
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_create_then_show(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "h2.join"
    code, output = create(ca_dir, out)
    assert code == 0, output
    assert "host h2 (2 identities, valid for 1h)" in output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    shown = CliRunner().invoke(cli, ["join", "show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "host:        h2" in shown.output
    assert WEB in shown.output and API in shown.output
    assert "198.18.0.1:15012" in shown.output
    assert "valid for" in shown.output
    assert load_join_file(out).token not in shown.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ttl", "25h"], "above the bound of 1d"),
        (["--identity", "spiffe://other.org/ns/a/sa/b"], "trust domain"),
        (["--identity", "not-an-id"], "--identity"),
        (["--ca-address", "nope"], "HOST:PORT"),
    ],
)
def test_create_refuses(ca_dir: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    out = tmp_path / "h2.join"
    code, output = create(ca_dir, out, *extra)
    assert code != 0
    assert message in output
    assert not out.exists()


def test_ttl_above_24h_needs_max_ttl(ca_dir: Path, tmp_path: Path) -> None:
    code, output = create(ca_dir, tmp_path / "h2.join", "--ttl", "48h", "--max-ttl", "48h")
    assert code == 0, output


def test_show_refuses_a_file_others_can_read(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "h2.join"
    assert create(ca_dir, out)[0] == 0
    out.chmod(0o644)
    shown = CliRunner().invoke(cli, ["join", "show", str(out)])
    assert shown.exit_code != 0
    assert "chmod 600" in shown.output


@pytest.mark.parametrize("command", [["join"], ["join", "create"], ["join", "show"]])
def test_join_commands_have_help(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert len(result.output.split("\n\n")[1].strip()) > 20


def test_agent_help_mentions_join() -> None:
    assert "--join" in CliRunner().invoke(cli, ["agent", "--help"]).output


def test_agent_join_refuses_a_second_ca_address(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "h2.join"
    assert create(ca_dir, out)[0] == 0
    args = ["agent", "--join", str(out), "--ca-address", "127.0.0.1:1", "--output-dir", "x"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert "drop --ca-address" in result.output
