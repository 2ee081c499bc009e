"""The article's own custom CA ("best practice 1"): an openssl root without KeyUsage plugged
in directly as the signing CA, with a token issuer made on first use."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from meshtrust.agent.issuance import verify_issued
from meshtrust.ca import init_ca_dir, load_ca_dir
from meshtrust.ca.cadir import ensure_token_signing_key, load_token_signing_key
from meshtrust.clock import SystemClock
from meshtrust.errors import CADirectoryError
from meshtrust.pki import (
    KeyType,
    TrustBundle,
    generate_key,
    issue_leaf,
    load_certs_pem,
    load_private_key_pem,
    verify_svid,
)
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.article_ca import make_article_ca
from tests.processes import CaProcess, run_cli

TD = TrustDomain("cluster.local")
WEB = SpiffeId.for_workload(TD, "default", "web")


@pytest.fixture(scope="module")
def article_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The article's CA directory, made once (a 4096-bit RSA key takes a moment)."""
    return make_article_ca(tmp_path_factory.mktemp("article") / "cacerts")


@pytest.fixture
def plugged_in(article_ca: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "cacerts"
    shutil.copytree(article_ca, directory)
    return directory


def test_the_articles_ca_loads_with_a_warning_about_key_usage(plugged_in: Path) -> None:
    material = load_ca_dir(plugged_in, SystemClock().now())
    assert material.intermediates == ()  # the signing CA is the root itself
    (warning,) = material.warnings
    assert "CN=My-Cluster-CA" in warning and "no KeyUsage" in warning


def test_leaves_of_a_ca_without_key_usage_verify(plugged_in: Path) -> None:
    """verify_svid (agent, `check`, the CA's client-certificate authenticator) accepts them."""
    material = load_ca_dir(plugged_in, SystemClock().now())
    now = SystemClock().now()
    import datetime as dt

    leaf = issue_leaf(material.signer, generate_key().public_key(), WEB, now, dt.timedelta(hours=1))
    verified = verify_svid([leaf], TrustBundle(TD, material.roots), now)
    assert verified.spiffe_id == WEB


def test_a_ca_whose_key_usage_forbids_signing_is_still_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()
    subprocess.run(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem "
        '-days 30 -out ca-cert.pem -subj "/O=cluster.local" '
        '-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,digitalSignature"',
        shell=True,
        cwd=directory,
        check=True,
        capture_output=True,
    )
    shutil.copy(directory / "ca-cert.pem", directory / "cert-chain.pem")
    shutil.copy(directory / "ca-cert.pem", directory / "root-cert.pem")
    with pytest.raises(CADirectoryError, match="keyCertSign"):
        load_ca_dir(directory, SystemClock().now())


def test_a_plugged_in_ca_gets_a_token_issuer_on_first_use(plugged_in: Path) -> None:
    assert load_token_signing_key(plugged_in) is None
    first = ensure_token_signing_key(plugged_in)
    assert stat.S_IMODE(os.stat(plugged_in / "token-key.pem").st_mode) == 0o600
    assert (plugged_in / "token-jwks.json").exists()
    again = ensure_token_signing_key(plugged_in)
    assert again.kid == first.kid  # made once, then reused
    assert not [p for p in plugged_in.iterdir() if p.name.startswith(".")]


def test_two_first_uses_at_once_agree_on_one_key(plugged_in: Path) -> None:
    kids: list[str] = []
    threads = [
        threading.Thread(target=lambda: kids.append(ensure_token_signing_key(plugged_in).kid))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(kids)) == 1
    assert load_token_signing_key(plugged_in).kid == kids[0]  # type: ignore[union-attr]


def test_token_issuer_in_a_read_only_ca_dir_is_a_clear_error(
    tmp_path: Path, plugged_in: Path
) -> None:
    if os.geteuid() == 0:  # root writes anyway: make the "directory" a file's child instead
        target = tmp_path / "file"
        target.write_text("")
        directory = target / "ca"
    else:
        plugged_in.chmod(0o500)
        directory = plugged_in
    with pytest.raises(CADirectoryError, match="cannot create the CA's token issuer key"):
        ensure_token_signing_key(directory)


@pytest.mark.slow
def test_the_articles_ca_serves_a_workload_end_to_end(plugged_in: Path, tmp_path: Path) -> None:
    """The article's commands as written, then: `token create`, `ca serve`, `cert request`,
    the agent's verification of the response, and an mTLS handshake with the result."""
    token_file = tmp_path / "web.token"
    minted = run_cli(
        "token",
        "create",
        "--ca-dir",
        str(plugged_in),
        "--trust-domain",
        str(TD),
        "--namespace",
        "default",
        "--service-account",
        "web",
        "-o",
        str(token_file),
    )
    assert minted.returncode == 0, minted.stderr
    assert stat.S_IMODE(os.stat(plugged_in / "token-key.pem").st_mode) == 0o600

    ca = CaProcess(plugged_in, "--trust-domain", str(TD), "--workers", "1")
    try:
        ca.wait_ready()
        out = tmp_path / "web"
        got = run_cli(
            "cert",
            "request",
            "--ca-address",
            ca.address,
            "--ca-root",
            str(plugged_in / "root-cert.pem"),
            "--token-file",
            str(token_file),
            "--spiffe-id",
            str(WEB),
            "--out-dir",
            str(out),
        )
        assert got.returncode == 0, got.stderr
    finally:
        ca.stop()
    assert "has no KeyUsage extension" in ca.log()

    roots = load_certs_pem((plugged_in / "root-cert.pem").read_bytes())
    key = load_private_key_pem((out / "key.pem").read_bytes())
    response = [(out / "cert-chain.pem").read_text(), (out / "root-cert.pem").read_text()]
    issued = verify_issued(response, key, WEB, TrustBundle(TD, tuple(roots)), SystemClock().now())
    assert issued.roots == tuple(roots)
    _mtls_handshake(out, plugged_in / "root-cert.pem")


def _mtls_handshake(out: Path, root: Path) -> None:
    """Server and client both present the issued certificate and trust the article's root."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(out / "cert-chain.pem", out / "key.pem")
    server_ctx.load_verify_locations(root)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False  # SPIFFE: the identity is the URI SAN, checked below
    client_ctx.load_cert_chain(out / "cert-chain.pem", out / "key.pem")
    client_ctx.load_verify_locations(root)
    a, b = socket.socketpair()
    peer: list[bytes | None] = []

    def serve() -> None:
        with server_ctx.wrap_socket(a, server_side=True) as tls:
            peer.append(tls.getpeercert(binary_form=True))

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(b) as tls:
        server_der = tls.getpeercert(binary_form=True)
    thread.join(10)
    assert server_der is not None and peer and peer[0] is not None
    from cryptography import x509

    san = x509.load_der_x509_certificate(server_der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]


def test_init_dirs_still_refuse_a_leaf_where_a_ca_belongs(tmp_path: Path) -> None:
    """Relaxing KeyUsage did not relax the rest: a leaf as CA is still refused."""
    directory = tmp_path / "ca"
    init_ca_dir(directory, TD, SystemClock().now(), KeyType.EC_P256)
    leaf = issue_leaf(
        load_ca_dir(directory, SystemClock().now()).signer,
        generate_key().public_key(),
        WEB,
        SystemClock().now(),
        __import__("datetime").timedelta(hours=1),
    )
    from cryptography.hazmat.primitives import serialization

    (directory / "ca-cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CADirectoryError):
        load_ca_dir(directory, SystemClock().now())
