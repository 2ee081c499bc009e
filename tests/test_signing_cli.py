"""`meshtrust ca slots` and `ca init --intermediate-ttl`: what an operator sees of the
signing slots, and the chain gauges the CA's /metrics serves from them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from click.testing import CliRunner

from meshtrust.ca import SqlLedger, load_ca_dir
from meshtrust.ca.assembly import chain_status_reader
from meshtrust.ca.metrics import CaMetrics
from meshtrust.ca.signing import SigningWatch, SlotLedger
from meshtrust.cli import cli
from meshtrust.clock import FakeClock, SystemClock
from meshtrust.metrics_text import TextRegistry


def _init(tmp_path: Path, ttl: str) -> Path:
    ca = tmp_path / "ca"
    done = CliRunner().invoke(
        cli,
        [
            "ca",
            "init",
            "--dir",
            str(ca),
            "--trust-domain",
            "example.org",
            "--intermediate-ttl",
            ttl,
        ],
    )
    assert done.exit_code == 0, done.output
    return ca


def _record_slots(ca: Path, clock: FakeClock | SystemClock, root: bool = True) -> None:
    """What `ca serve` does at start: record generation 1 (and whatever is due)."""
    from meshtrust.ca.cadir import load_root_signer

    material = load_ca_dir(ca, clock.now(), signer_may_expire=True)
    sql = SqlLedger(f"sqlite:///{ca / 'ledger.db'}")
    try:
        SigningWatch(
            SlotLedger(sql.engine),
            ca,
            clock,
            trust_domain="example.org",
            root=load_root_signer(ca, material.roots) if root else None,
        ).load(material)
    finally:
        sql.close()


def test_help_explains_the_slots() -> None:
    result = CliRunner().invoke(cli, ["ca", "slots", "--help"])
    assert result.exit_code == 0
    assert "PREPARED, ACTIVE and OLD" in result.output and "--check" in result.output
    init_help = CliRunner().invoke(cli, ["ca", "init", "--help"]).output
    assert "--intermediate-ttl" in init_help


def test_slots_json_after_a_rotation(tmp_path: Path) -> None:
    ca = _init(tmp_path, "30d")
    cert = load_ca_dir(ca, SystemClock().now()).signer.cert
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30, minutes=2)
    _record_slots(ca, FakeClock(SystemClock().now() + dt.timedelta(days=26)))
    result = CliRunner().invoke(cli, ["ca", "slots", "--ca-dir", str(ca), "--json", "--check"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["rotation"] == "automatic" and doc["warning"] is None
    assert [(s["generation"], s["slot"]) for s in doc["slots"]] == [(1, "old"), (2, "active")]
    assert doc["slots"][1]["key_file"].startswith("signing-key-2-")
    table = CliRunner().invoke(cli, ["ca", "slots", "--ca-dir", str(ca)])
    assert table.exit_code == 0 and "ACTIVE" in table.output and "next: prepare" in table.output


def test_a_plugged_in_ca_near_expiry_fails_the_check(tmp_path: Path) -> None:
    ca = _init(tmp_path, "30d")
    (ca / "root-key.pem").unlink()  # moved offline: the CA cannot rotate any more
    _record_slots(ca, SystemClock(), root=False)
    fine = CliRunner().invoke(cli, ["ca", "slots", "--ca-dir", str(ca), "--check"])
    assert fine.exit_code == 0, fine.output
    assert "plugged-in CA" in fine.output

    late = FakeClock(SystemClock().now() + dt.timedelta(days=26))
    registry = TextRegistry()
    metrics = CaMetrics(registry)
    sql = SqlLedger(f"sqlite:///{ca / 'ledger.db'}")
    try:
        metrics.follow_signing_chain(chain_status_reader(SlotLedger(sql.engine), True, late))
        text = registry.exposition().decode()
    finally:
        sql.close()
    assert "meshtrust_ca_chain_expiry_warning 2" in text
