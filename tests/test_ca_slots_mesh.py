"""Signing-CA rotation on a live mesh (`meshtrust up`: the CA with its workers, agents, real
Envoy sidecars, STRICT mTLS) with short lifetimes: an intermediate of 90 s (prepared at 45 s,
active at 75 s) and workload certificates of 20 s. ``a`` calls ``b`` (HTTP) and ``t`` (TCP:
a new mTLS handshake per call) in a loop throughout: no call fails across the activation,
and every sidecar ends up serving a chain through the new intermediate. The successor has a
fresh key (the default): the CA publishes one CRL per live slot, the prepared one's before
its activation, and every sidecar holds both CRLs (Envoy finds a leaf's CRL by its issuer's
name and key; with only the old CRL it would refuse every new leaf)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from meshtrust.ca import SqlLedger, init_ca_dir
from meshtrust.ca.signing import SlotLedger
from meshtrust.clock import SystemClock
from meshtrust.envoy import EnvoyAdmin
from meshtrust.spiffe import TrustDomain
from tests.mesh_helpers import (
    APP,
    agent_status,
    http_get,
    running_mesh,
    tcp_roundtrip,
    upstream_port,
    write_mesh,
)
from tests.waiting import until

pytestmark = pytest.mark.slow

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""
INTERMEDIATE_TTL = dt.timedelta(seconds=90)


def _served_chain(mesh: object, service: str) -> list[x509.Certificate]:
    """The certificate chain ``service``'s Envoy holds for resource ``default`` (what it
    presents in handshakes), from its admin API's config dump (keys are redacted there)."""
    admin = agent_status(mesh, service)["envoy"]["admin"]  # type: ignore[arg-type]
    status, body = EnvoyAdmin.at(admin).get(
        "/config_dump?resource=dynamic_active_secrets", timeout=5
    )
    assert status == 200, body
    for secret in json.loads(body)["configs"]:
        if secret.get("name") != "default":
            continue
        chain = secret["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"]
        return x509.load_pem_x509_certificates(base64.b64decode(chain))
    return []


def _ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def _crl_issuer_keys(mesh: object, service: str) -> set[bytes]:
    """The key identifiers of the issuers of the CRLs ``service``'s Envoy holds in its
    ``ROOTCA`` validation context (one PEM, several CRLs)."""
    admin = agent_status(mesh, service)["envoy"]["admin"]  # type: ignore[arg-type]
    status, body = EnvoyAdmin.at(admin).get(
        "/config_dump?resource=dynamic_active_secrets", timeout=5
    )
    assert status == 200, body
    out: set[bytes] = set()
    for secret in json.loads(body)["configs"]:
        context = secret.get("secret", {}).get("validation_context")
        if not context or "crl" not in context:
            continue
        pem = base64.b64decode(context["crl"]["inline_bytes"])
        for block in pem.split(b"-----END X509 CRL-----")[:-1]:
            crl = x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n")
            aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
            if aki.key_identifier is not None:
                out.add(aki.key_identifier)
    return out


class Caller(threading.Thread):
    """Calls a -> b (HTTP) and a -> t (TCP) every 50 ms; counts what failed, and why."""

    def __init__(self, http_port: int, tcp_port: int) -> None:
        super().__init__(daemon=True)
        self.http_port, self.tcp_port = http_port, tcp_port
        self.calls = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.calls += 1
            at = f"{SystemClock().now():%H:%M:%S.%f}"
            try:
                status, _ = http_get(self.http_port, timeout=5)
                if status != 200:
                    self.failures.append(f"{at} a->b HTTP {status}")
                if tcp_roundtrip(self.tcp_port, b"ping", timeout=5) != b"echo:ping":
                    self.failures.append(f"{at} a->t connection closed")
            except OSError as exc:
                self.failures.append(f"{at} {exc.__class__.__name__}: {exc}")


def test_intermediate_rotation_under_load_fails_no_call(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    init_ca_dir(
        ca_dir,
        TrustDomain.parse("cluster.local"),
        SystemClock().now(),
        intermediate_lifetime=INTERMEDIATE_TTL,
    )
    path = write_mesh(
        tmp_path,
        [
            {"name": "a", "upstreams": [{"service": "b"}, {"service": "t"}]},
            {"name": "b", "command": ["python3", str(APP)], "env": {"CALL_EVERY": "0"}},
            {"name": "t", "protocol": "tcp", "command": ["python3", "tcp_echo.py"]},
        ],
        STRICT,
        cert_ttl="20s",
    )
    mesh_doc = yaml.safe_load(path.read_text())
    mesh_doc["ca"]["dir"] = str(ca_dir)
    path.write_text(yaml.safe_dump(mesh_doc, sort_keys=False))
    sql = SqlLedger(f"sqlite:///{ca_dir / 'ledger.db'}")
    with running_mesh(path) as mesh:
        a_to_b, a_to_t = upstream_port(mesh, "a", "b"), upstream_port(mesh, "a", "t")
        until(lambda: http_get(a_to_b)[0] == 200, timeout=60, what="a calls b")
        until(lambda: tcp_roundtrip(a_to_t) == b"echo:ping", timeout=30, what="a calls t")
        slots = SlotLedger(sql.engine)
        first = slots.slots().active
        assert first is not None and first.generation == 1
        caller = Caller(a_to_b, a_to_t)
        caller.start()
        try:
            until(
                lambda: (act := slots.slots().active) is not None and act.generation >= 2,
                timeout=INTERMEDIATE_TTL.total_seconds() + 30,
                what="the CA activated generation 2",
            )
            new = slots.slots().active
            assert new is not None
            assert new.cert.public_key() != first.cert.public_key()  # a fresh key
            for service in ("a", "b", "t"):
                until(
                    lambda s=service: _crl_issuer_keys(mesh, s)  # type: ignore[misc]
                    >= {_ski(first.cert), _ski(new.cert)},
                    timeout=30,
                    what=f"{service}'s Envoy holds the CRLs of both intermediates",
                )
            # Every sidecar moves to the new chain at its next renewal (20 s certificates).
            for service in ("a", "b", "t"):
                assert caller.failures == [], caller.failures[:10]
                until(
                    lambda s=service: new.cert in _served_chain(mesh, s),  # type: ignore[misc]
                    timeout=45,
                    what=f"{service}'s Envoy serves a chain through generation 2 "
                    f"(failures so far: {caller.failures[:3]})",
                )
            # And past the old intermediate's expiry, calls still succeed.
            until(
                lambda: SystemClock().now() > first.not_after + dt.timedelta(seconds=2),
                timeout=INTERMEDIATE_TTL.total_seconds(),
                what="the old intermediate expired",
            )
            calls_before = caller.calls
            until(lambda: caller.calls > calls_before + 20, timeout=30, what="more calls")
        finally:
            caller.stop.set()
            caller.join(timeout=15)
            sql.close()
        assert caller.calls > 100
        assert caller.failures == [], caller.failures[:10]
