"""``meshtrust ca rotation status`` and ``ca bundle add-root|remove-root`` on a ledger: the
bundle's versions, who is behind, and bad input refused plainly with nothing written."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from meshtrust.ca import SqlLedger, init_ca_dir
from meshtrust.ca.cadir import load_ca_dir
from meshtrust.ca.trust import ServedReport, TrustLedger, fingerprint
from meshtrust.cli import cli
from meshtrust.pki import KeyType, load_certs_pem
from meshtrust.spiffe import TrustDomain
from tests import badcerts

NOW = dt.datetime.now(dt.UTC)
TD = TrustDomain("example.org")
WEB, API = "spiffe://example.org/ns/shop/sa/web", "spiffe://example.org/ns/shop/sa/api"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "250"})


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    """A CA directory whose ledger holds bundle version 1 (as `ca serve` leaves it)."""
    directory = tmp_path / "ca"
    init_ca_dir(directory, TD, NOW, KeyType.EC_P256)
    sql = SqlLedger(f"sqlite:///{directory / 'ledger.db'}")
    try:
        trust = TrustLedger(sql.engine)
        trust.initialise(load_ca_dir(directory, NOW).roots, NOW)
        trust.record_served([ServedReport(WEB, 1, "01", NOW), ServedReport(API, 1, "02", NOW)])
    finally:
        sql.close()
    return directory


def _status(ca_dir: Path) -> dict[str, object]:
    result = invoke("ca", "rotation", "status", "--ca-dir", str(ca_dir), "-o", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert isinstance(doc, dict)
    return doc


def test_add_root_makes_a_version_everyone_is_behind_until_they_report(
    ca_dir: Path, tmp_path: Path
) -> None:
    root_a = load_certs_pem((ca_dir / "root-cert.pem").read_bytes())[0]
    root_b = badcerts.make_ca(TD).root
    (tmp_path / "b.pem").write_bytes(badcerts.cert_pem(root_b))
    done = invoke("ca", "bundle", "add-root", str(tmp_path / "b.pem"), "--ca-dir", str(ca_dir))
    assert done.exit_code == 0, done.output
    assert f"trust bundle version 2: added root {fingerprint(root_b)}" in done.output
    doc = _status(ca_dir)
    bundle = doc["bundle"]
    assert isinstance(bundle, dict) and bundle["version"] == 2
    assert [r["fingerprint"] for r in bundle["roots"]] == [fingerprint(root_a), fingerprint(root_b)]
    assert [w["spiffe_id"] for w in doc["behind"]] == [API, WEB]  # type: ignore[attr-defined]
    table = invoke("ca", "rotation", "status", "--ca-dir", str(ca_dir))
    assert "trust bundle version 2" in table.output and "0 of 2 workload(s)" in table.output
    assert WEB in table.output and fingerprint(root_b) in table.output

    # The active signing CA chains to A: A stays; B may go.
    kept = invoke("ca", "bundle", "remove-root", fingerprint(root_a)[:12], "--ca-dir", str(ca_dir))
    assert kept.exit_code == 2 and "active signing CA chains to it" in kept.output
    gone = invoke("ca", "bundle", "remove-root", fingerprint(root_b), "--ca-dir", str(ca_dir))
    assert gone.exit_code == 0, gone.output
    assert "trust bundle version 3: removed root" in gone.output and "(1 left)" in gone.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        (b"hello", "no PEM certificate found"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "malformed PEM"),
        ("two", "holds 2 certificates"),
        ("leaf", "is not a CA certificate"),
        ("same", "in the bundle already"),
    ],
)
def test_add_root_bad_input_is_a_clear_error_and_writes_nothing(
    ca_dir: Path, tmp_path: Path, content: bytes | str | None, message: str
) -> None:
    path = tmp_path / "root.pem"
    other = badcerts.make_ca(TD)
    if content == "two":
        path.write_bytes(badcerts.cert_pem(other.root, other.signer.cert))
    elif content == "leaf":
        path.write_bytes(badcerts.cert_pem(badcerts.svid_leaf(other.signer, WEB).chain[0]))
    elif content == "same":
        path.write_bytes((ca_dir / "root-cert.pem").read_bytes())
    elif isinstance(content, bytes):
        path.write_bytes(content)
    result = invoke("ca", "bundle", "add-root", str(path), "--ca-dir", str(ca_dir))
    assert result.exit_code == 2, result.output
    assert message in result.output and str(path) in result.output
    assert "Traceback" not in result.output
    assert _status(ca_dir)["bundle"]["version"] == 1  # type: ignore[index]


def test_status_of_a_ledger_without_a_bundle_says_what_makes_one(tmp_path: Path) -> None:
    SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}").close()
    result = invoke("ca", "rotation", "status", "--ledger", f"sqlite:///{tmp_path / 'ledger.db'}")
    assert result.exit_code == 2, result.output
    assert "no trust bundle yet" in result.output and "ca serve" in result.output
