"""The bundle document as real SPIFFE libraries read it: go-spiffe's ``spiffebundle.Parse``
(a Go program, tests/go/bundle) and py-spiffe's X.509 bundle parser."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain as PyTrustDomain
from spiffe import X509Bundle

from meshtrust.pki import KeyType, generate_key, make_root
from meshtrust.spiffe import TrustDomain
from meshtrust.spiffe.bundle import SpiffeBundle, bundle_document, parse_bundle_document
from tests.badcerts import NOW
from tests.gobuild import build_go_program

pytestmark = pytest.mark.slow
WEST = TrustDomain.parse("west.test")


@pytest.fixture(scope="module")
def go_bundle() -> Path:
    return build_go_program("bundle")


def _bundle() -> SpiffeBundle:
    roots = tuple(
        make_root(generate_key(kt), "west.test", NOW, dt.timedelta(days=30))
        for kt in (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048)
    )
    return SpiffeBundle(WEST, roots, sequence=42, refresh_hint=dt.timedelta(seconds=5))


def _go(binary: Path, path: Path, td: str = "west.test") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, td, path], capture_output=True, text=True, timeout=60, check=False
    )


def test_go_spiffe_reads_our_document(go_bundle: Path, tmp_path: Path) -> None:
    bundle = _bundle()
    path = tmp_path / "west.json"
    path.write_bytes(bundle_document(bundle))
    result = _go(go_bundle, path)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["trust_domain"] == "west.test"
    assert seen["sequence"] == 42
    assert seen["refresh_hint_seconds"] == 5
    ders = [c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities]
    assert seen["x509_authorities_sha256"] == [hashlib.sha256(d).hexdigest() for d in ders]


def test_go_spiffe_refuses_what_we_refuse(go_bundle: Path, tmp_path: Path) -> None:
    """Two certificates in x5c: both parsers refuse (ours says which key and why)."""
    doc = json.loads(bundle_document(_bundle()))
    doc["keys"][0]["x5c"].append(doc["keys"][1]["x5c"][0])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    result = _go(go_bundle, path)
    assert result.returncode == 1
    assert "single certificate" in result.stderr
    with pytest.raises(Exception, match=r"keys\[0\]: an x509-svid key carries exactly one"):
        parse_bundle_document(path.read_bytes(), WEST)


def test_py_spiffe_reads_the_authorities(tmp_path: Path) -> None:
    """py-spiffe 0.3 has no parser for the whole document (its JwtBundle.parse wants a kid
    on every key); its X509Bundle parser takes the x5c certificates as the Workload API
    sends them (DER, concatenated) and checks each."""
    bundle = _bundle()
    doc = json.loads(bundle_document(bundle))
    raw = b"".join(base64.b64decode(k["x5c"][0]) for k in doc["keys"])
    parsed = X509Bundle.parse_raw(PyTrustDomain("west.test"), raw)
    fingerprints = {c.public_bytes(serialization.Encoding.DER) for c in parsed.x509_authorities}
    ours = {c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities}
    assert fingerprints == ours
