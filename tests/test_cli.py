"""The command line as a newcomer meets it: help, clear errors, files and JSON."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshtrust.cli import cli
from tests.processes import CaProcess, run_cli

COMMANDS = [
    [],
    ["ca"],
    ["ca", "init"],
    ["ca", "root", "init"],
    ["ca", "serve"],
    ["ca", "certs"],
    ["ca", "certs", "list"],
    ["ca", "revoke"],
    ["ca", "unblock"],
    ["token"],
    ["token", "create"],
    ["cert"],
    ["cert", "request"],
    ["agent"],
    ["up"],
    ["status"],
    ["down"],
    ["dashboard"],
    ["proxy-config", "secret"],
    ["check"],
    ["certs", "monitor"],
    ["bundle", "show"],
    ["bundle", "list"],
    ["bundle", "set"],
    ["bundle", "delete"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "meshtrust" for c in COMMANDS])
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage: " in result.output
    # Each command explains itself in a sentence, not just lists options.
    description = result.output.split("\n\n")[1].strip()
    assert len(description) > 20


def test_init_writes_private_keys_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    ca = tmp_path / "ca"
    first = runner.invoke(cli, ["ca", "init", "--dir", str(ca), "--trust-domain", "example.org"])
    assert first.exit_code == 0, first.output
    for name in ("ca-key.pem", "root-key.pem", "token-key.pem"):
        assert stat.S_IMODE(os.stat(ca / name).st_mode) == 0o600
    before = (ca / "ca-key.pem").read_bytes()
    again = runner.invoke(cli, ["ca", "init", "--dir", str(ca), "--trust-domain", "example.org"])
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.output
    assert (ca / "ca-key.pem").read_bytes() == before
    forced = runner.invoke(
        cli, ["ca", "init", "--dir", str(ca), "--trust-domain", "example.org", "--force"]
    )
    assert forced.exit_code == 0
    assert (ca / "ca-key.pem").read_bytes() != before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ca", "init", "--dir", "x", "--trust-domain", "Example.org"], "upper-case"),
        (["ca", "init", "--dir", "x", "--trust-domain", "a", "--key-type", "dsa"], "dsa"),
        (["ca", "serve", "--ca-dir", "x", "--max-ttl", "90x"], "'90x' is not a duration"),
        (["ca", "serve", "--ca-dir", "x", "--default-ttl", "100d"], "above the maximum TTL"),
        (["ca", "serve", "--ca-dir", "x", "--listen", "nowhere"], "is not HOST:PORT"),
        (["ca", "serve", "--ca-dir", "x", "--jwt-issuer", "no-equals"], "ISSUER=JWKS_FILE"),
        (
            ["token", "create", "--ca-dir", "x", "--namespace", "a/b", "--service-account", "s"],
            "CA directory x does not exist",
        ),
    ],
)
def test_bad_arguments_get_a_clear_message(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args, catch_exceptions=False, env={"PWD": str(tmp_path)})
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_serve_config_file_errors_name_the_file_and_key(tmp_path: Path, ca_dir: Path) -> None:
    cfg = tmp_path / "ca.yaml"
    cfg.write_text(f"ca-dir: {ca_dir}\nlisten: 127.0.0.1:0\nmax_tll: 90d\n")
    out = run_cli("ca", "serve", "--config", str(cfg))
    assert out.returncode == 2
    assert f"error: {cfg}:3: max_tll: unknown key" in out.stderr
    cfg.write_text("listen: [unclosed\n")
    out = run_cli("ca", "serve", "--config", str(cfg))
    assert out.returncode == 2
    assert "is not valid YAML at line" in out.stderr
    assert "Traceback" not in out.stderr


def test_token_request_and_ledger_listing_end_to_end(ca_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "web.token"
    minted = run_cli(
        "token",
        "create",
        "--ca-dir",
        str(ca_dir),
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--ttl",
        "10m",
        "-o",
        str(token_file),
    )
    assert minted.returncode == 0, minted.stderr
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    token = token_file.read_text().strip()

    ca = CaProcess(ca_dir, "--max-ttl", "1h", "--default-ttl", "30m")
    try:
        ca.wait_ready()
        out_dir = tmp_path / "web"
        got = run_cli(
            "cert",
            "request",
            "--ca-address",
            ca.address,
            "--ca-root",
            str(ca_dir / "root-cert.pem"),
            "--token-file",
            str(token_file),
            "--spiffe-id",
            "spiffe://example.org/ns/shop/sa/web",
            "--ttl",
            "30m",
            "--out-dir",
            str(out_dir),
        )
        assert got.returncode == 0, got.stderr
        assert stat.S_IMODE(os.stat(out_dir / "key.pem").st_mode) == 0o600
        too_long = run_cli(
            "cert",
            "request",
            "--ca-address",
            ca.address,
            "--ca-root",
            str(ca_dir / "root-cert.pem"),
            "--token-file",
            str(token_file),
            "--spiffe-id",
            "spiffe://example.org/ns/shop/sa/web",
            "--ttl",
            "2h",
            "--out-dir",
            str(tmp_path / "x"),
        )
        assert too_long.returncode == 2
        assert "above the maximum" in too_long.stderr
        log = ca.log()
    finally:
        ca.stop()
    # Logs say who asked for what, and never carry the token.
    assert "issued serial=" in log and "spiffe://example.org/ns/shop/sa/web" in log
    assert "above the maximum" in log
    assert token not in log and token.split(".")[2] not in log

    listed = run_cli("ca", "certs", "list", "--ca-dir", str(ca_dir), "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["spiffe_id"] == "spiffe://example.org/ns/shop/sa/web"
    assert entry["authenticator"] == "jwt"
    assert entry["expired"] is False
    soon = run_cli(
        "ca", "certs", "list", "--ca-dir", str(ca_dir), "--json", "--expiring-within", "10m"
    )
    assert json.loads(soon.stdout) == []
    within = run_cli(
        "ca", "certs", "list", "--ca-dir", str(ca_dir), "--json", "--expiring-within", "1h"
    )
    assert [e["serial"] for e in json.loads(within.stdout)] == [entry["serial"]]
