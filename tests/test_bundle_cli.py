"""``meshtrust bundle show|list|set|delete`` (static federation), as spire-server's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain as PyTrustDomain
from spiffe import X509Bundle

from meshtrust.ca.cadir import init_ca_dir, load_ca_dir
from meshtrust.ca.federation import FederationStore
from meshtrust.ca.ledger import default_ledger_url
from meshtrust.cli import cli
from meshtrust.clock import SystemClock
from meshtrust.spiffe import TrustDomain
from meshtrust.spiffe.bundle import parse_bundle_document

NOW = SystemClock().now()
WEST = TrustDomain.parse("west.test")


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.fixture
def cas(tmp_path: Path) -> tuple[Path, Path]:
    east, west = tmp_path / "east", tmp_path / "west"
    init_ca_dir(east, TrustDomain.parse("east.test"), NOW)
    init_ca_dir(west, WEST, NOW)
    return east, west


def test_show_prints_the_cas_own_bundle_in_both_formats(cas: tuple[Path, Path]) -> None:
    _, west = cas
    code, pem = run("bundle", "show", "--ca-dir", str(west))
    assert code == 0
    # py-spiffe reads the PEM form as an X.509 bundle of west.test.
    parsed = X509Bundle.parse(PyTrustDomain("west.test"), pem.encode())
    roots = load_ca_dir(west, NOW).roots
    ders = {c.public_bytes(serialization.Encoding.DER) for c in roots}
    assert {c.public_bytes(serialization.Encoding.DER) for c in parsed.x509_authorities} == ders
    code, doc = run("bundle", "show", "--ca-dir", str(west), "--format", "spiffe")
    assert code == 0
    bundle = parse_bundle_document(doc.encode(), WEST)
    assert bundle.x509_authorities == roots and bundle.sequence is None  # no ledger yet


def test_set_list_delete_static_federation(cas: tuple[Path, Path], tmp_path: Path) -> None:
    east, west = cas
    doc = tmp_path / "west.json"
    doc.write_text(run("bundle", "show", "--ca-dir", str(west), "--format", "spiffe")[1])
    code, out = run("bundle", "set", "--ca-dir", str(east), "--trust-domain", "west.test", str(doc))
    assert code == 0, out
    assert (east / "ledger.db").stat().st_mode & 0o777 == 0o600
    store = FederationStore(default_ledger_url(east))
    try:
        stored = store.load(WEST)
    finally:
        store.close()
    assert stored is not None and stored.source == f"static: {doc.resolve()}"
    assert stored.bundle.x509_authorities == load_ca_dir(west, NOW).roots
    code, out = run("bundle", "list", "--ca-dir", str(east), "--format", "spiffe")
    assert code == 0 and out.startswith("# west.test: sequence -, from static: ")
    # PEM works too, and replaces the stored one.
    code, out = run(
        "bundle", "set", "--ca-dir", str(east), "--trust-domain", "west.test",
        str(west / "root-cert.pem"),
    )  # fmt: skip
    assert code == 0, out
    code, out = run("bundle", "delete", "--ca-dir", str(east), "--trust-domain", "west.test")
    assert code == 0 and "deleted" in out
    code, out = run("bundle", "delete", "--ca-dir", str(east), "--trust-domain", "west.test")
    assert code == 2 and "no bundle of west.test is stored" in out


def test_set_refuses_bad_bundles_and_keeps_the_stored_one(
    cas: tuple[Path, Path], tmp_path: Path
) -> None:
    east, west = cas
    good = tmp_path / "west.pem"
    good.write_bytes((west / "root-cert.pem").read_bytes())
    assert (
        run("bundle", "set", "--ca-dir", str(east), "--trust-domain", "west.test", str(good))[0]
        == 0
    )
    doc = json.loads(run("bundle", "show", "--ca-dir", str(west), "--format", "spiffe")[1])
    cases = {
        "kid": {**doc, "keys": [{**doc["keys"][0], "kid": "x"}]},
        "two": {**doc, "keys": [{**doc["keys"][0], "x5c": doc["keys"][0]["x5c"] * 2}]},
    }
    reasons = {"kid": "must not have a 'kid'", "two": "exactly one certificate in 'x5c', not 2"}
    for name, body in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(body))
        code, out = run(
            "bundle", "set", "--ca-dir", str(east), "--trust-domain", "west.test", str(path)
        )
        assert code == 2 and reasons[name] in out and str(path) in out
    huge = tmp_path / "huge.json"
    huge.write_bytes(b'{"keys": [], "x": "' + b"x" * (10 * 1024 * 1024) + b'"}')
    code, out = run(
        "bundle", "set", "--ca-dir", str(east), "--trust-domain", "west.test", str(huge)
    )
    assert code == 2 and "larger than 1024 KiB" in out
    # Someone else's roots as west's, and a bundle for east's own trust domain: refused.
    code, out = run(
        "bundle", "set", "--ca-dir", str(east), "--trust-domain", "west.test",
        str(east / "root-cert.pem"),
    )  # fmt: skip
    assert code == 2 and "belongs to trust domain 'east.test'" in out
    code, out = run(
        "bundle", "set", "--ca-dir", str(east), "--trust-domain", "east.test", str(good)
    )
    assert code == 2 and "own trust domain" in out
    store = FederationStore(default_ledger_url(east))
    try:
        stored = store.load(WEST)
    finally:
        store.close()
    assert stored is not None and stored.bundle.x509_authorities == load_ca_dir(west, NOW).roots


def test_help_is_readable() -> None:
    for command in ("show", "list", "set", "delete"):
        code, out = run("bundle", command, "--help")
        assert code == 0 and "Usage: " in out
    assert "bundle set --trust-domain east.test east.json" in run("bundle", "--help")[1]
