"""A whole mesh on the article's own custom CA (issue 8, defect 16): the article's commands
as written, ``ca.dir`` pointed at what they made, ``meshtrust up --detach``, a real request
from one app through both sidecars, and the served certificates chaining to that CA."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from meshtrust.mesh import read_state
from meshtrust.mesh.probes import alive
from meshtrust.pki import format_serial
from tests.article_ca import make_article_ca
from tests.mesh_helpers import APP, http_get, meshtrust
from tests.processes import free_port

pytestmark = pytest.mark.slow

#: Not the root's O (``My-Organization`` is no trust domain: upper case), and not the
#: default either, so the test shows the mesh file's trustDomain is the one that is used.
TRUST_DOMAIN = "example.org"
WEB = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
BACKEND = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/backend"

STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
)


def two_services_on(directory: Path, ca_dir: Path) -> tuple[Path, int]:
    """web -> backend, both running the quickstart app, every port free, ``ca.dir`` the
    plugged-in CA. Returns the mesh file and web's app port."""
    (directory / "policies.yaml").write_text(STRICT)
    web_port = free_port()
    mesh = {
        "trustDomain": TRUST_DOMAIN,
        "certTTL": "10m",
        "workDir": str(directory / "work"),
        "ca": {"listen": f"127.0.0.1:{free_port()}", "dir": str(ca_dir)},
        "services": [
            {
                "name": "web",
                "port": web_port,
                "inboundPort": free_port(),
                "command": ["python3", str(APP)],
                "env": {"CALL_EVERY": "0"},
                "upstreams": [{"service": "backend", "localPort": free_port()}],
            },
            {
                "name": "backend",
                "port": free_port(),
                "inboundPort": free_port(),
                "command": ["python3", str(APP)],
                "env": {"CALL_EVERY": "0"},
            },
        ],
        "policies": ["policies.yaml"],
    }
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    return path, web_port


def served_certificate(port: int, client_certs: Path, root: Path) -> x509.Certificate:
    """The certificate a sidecar's inbound listener serves, verified by OpenSSL up to
    ``root`` (the handshake fails otherwise), presenting the workload in ``client_certs``."""
    context = ssl.create_default_context(cafile=str(root))
    context.check_hostname = False  # SPIFFE: the identity is the URI SAN, checked by callers
    context.load_cert_chain(client_certs / "cert-chain.pem", client_certs / "key.pem")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_mesh_runs_on_the_articles_ca(tmp_path: Path) -> None:
    cacerts = make_article_ca(tmp_path / "cacerts")
    root = x509.load_pem_x509_certificate((cacerts / "ca-cert.pem").read_bytes())
    home = tmp_path / "home"
    mesh_file, web_port = two_services_on(tmp_path, cacerts)

    up = meshtrust("up", "--detach", str(mesh_file), home=home)
    assert up.returncode == 0, up.stdout + up.stderr
    state = read_state(Path((home / "current").read_text().strip()))
    try:
        # web's app -> web's sidecar -> mTLS -> backend's sidecar -> backend's app, which
        # reads the caller from x-forwarded-client-cert.
        status, body = http_get(web_port, "/call/backend")
        assert status == 200, body
        assert f"backend saw {WEB}" in body

        # What backend's sidecar serves chains to the article's CA, as OpenSSL sees it.
        served = served_certificate(
            state.service("backend").inbound_port,
            Path(state.service("web").cert_dir),
            cacerts / "ca-cert.pem",
        )
        san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [BACKEND]
        assert served.issuer == root.subject

        # Envoy trusts peers against the article's root, and `check` walks the chain to it.
        secrets = _json(meshtrust("proxy-config", "secret", "web", "--json", home=home))
        assert [r["serial_number"] for r in secrets if r["resource_name"] == "ROOTCA"] == [
            format_serial(root.serial_number)
        ]
        check = meshtrust("check", "web", "--json", home=home)
        assert check.returncode == 0, check.stdout + check.stderr
        steps = {s["id"]: s for s in json.loads(check.stdout)["steps"]}
        # The chain is valid; the article's CA has no KeyUsage: a WARN with a hint, no FAIL.
        chain = steps["chain"]
        assert chain["verdict"] == "WARN", chain
        assert "to the root O=My-Organization,CN=My-Cluster-CA" in chain["detail"]
        assert "no KeyUsage extension in O=My-Organization,CN=My-Cluster-CA" in chain["detail"]
        assert "keyUsage=critical,keyCertSign,cRLSign" in chain["hint"]
        others = {k: s["verdict"] for k, s in steps.items() if k != "chain"}
        assert set(others.values()) == {"PASS"}, others
        assert steps["identity"]["verdict"] == "PASS" and WEB in steps["identity"]["detail"]
    finally:
        down = meshtrust("down", home=home)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(alive(pid) for pid in state.pids())

    # A plugged-in CA gets its token issuer on first use (defect 17), beside the CA key.
    assert oct((cacerts / "token-key.pem").stat().st_mode & 0o777) == "0o600"
    # CA start-up and each agent said it once.
    assert state.ca is not None
    assert "has no KeyUsage extension" in Path(state.ca.log).read_text()
    for svc in state.services:
        agent_log = Path(svc.agent_log).read_text()
        assert agent_log.count("has no KeyUsage extension") == 1, agent_log
        assert "trusted root" in agent_log and "O=My-Organization,CN=My-Cluster-CA" in agent_log


def _json(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)
