"""A real, throwaway Kubernetes API server (kube-apiserver + etcd) for the Kubernetes tests.

No kubelet, scheduler or controller-manager: pods created through it stay Pending, which is
all the tests need. What kube-apiserver alone serves is what meshtrust uses: TokenRequest,
TokenReview, the OIDC discovery document and JWKS, admission webhooks, server-side dry-run.

:func:`kube_apiserver` starts etcd (Debian's ``etcd-server``) and kube-apiserver (built by
``scripts/kube-apiserver`` into ``~/.cache/meshtrust``) on free loopback ports in a fresh
directory, with everything generated at test time: a CA and serving certificate for the API
server, the service-account signing key, and a static admin bearer token (``system:masters``
via ``--token-auth-file``). It writes a kubeconfig for that admin, creates the ``default``
ServiceAccount by hand (no controller-manager does it), and removes it all afterwards, even
on failure. A missing binary *fails* the tests with the hint that fixes it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.processes import free_port

__all__ = [
    "KUBE_VERSION",
    "KubeApiServer",
    "KubeError",
    "kube_apiserver",
    "kube_apiserver_binary",
    "kubectl_binary",
    "make_tls_pair",
    "pem_bytes",
]

KUBE_VERSION = os.environ.get("KUBE_VERSION", "1.34.4")
REPO = Path(__file__).resolve().parent.parent


def _cache() -> Path:
    base = os.environ.get("MESHTRUST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "meshtrust"
    )
    return Path(base)


def kube_apiserver_binary() -> Path:
    """The cached kube-apiserver (``scripts/kube-apiserver`` builds it); fails with a hint."""
    path = _cache() / f"kube-apiserver-v{KUBE_VERSION}"
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"kube-apiserver v{KUBE_VERSION} is not built ({path} is missing): run "
            "scripts/kube-apiserver once (a Go build, 10-20 min on 2 cores; cached afterwards)",
            pytrace=False,
        )
    return path


def kubectl_binary() -> Path:
    """The cached kubectl (``scripts/kube-apiserver kubectl`` builds it); fails with a hint."""
    path = _cache() / f"kubectl-v{KUBE_VERSION}"
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"kubectl v{KUBE_VERSION} is not built ({path} is missing): run "
            "scripts/kube-apiserver kubectl once (a Go build; cached afterwards)",
            pytrace=False,
        )
    return path


def etcd_binary() -> Path:
    found = shutil.which("etcd")
    if found is None:
        pytest.fail(
            "etcd is not installed (needed for the Kubernetes tests): run "
            "scripts/system-packages (Debian: apt-get install etcd-server)",
            pytrace=False,
        )
    return Path(found)


def pem_bytes(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return bytes(
        obj.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_tls_pair(
    names: list[str], ips: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A throwaway CA and a serving certificate it signed: ``(ca, key, leaf)``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test kube CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(IPv4Address(ip)) for ip in ips]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ca, key, leaf


class KubeError(Exception):
    """An API call in a test failed: the status and Kubernetes' message."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:800]}")
        self.status = status


@dataclass
class KubeApiServer:
    """A running API server: where it is, its CA, the admin token and kubeconfig."""

    port: int
    root: Path
    ca_pem: str
    admin_token: str = field(repr=False)
    kubeconfig: Path
    sa_issuer: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def request(
        self, method: str, path: str, body: object = None, token: str | None = None
    ) -> dict[str, Any]:
        """One JSON call as the admin (or as ``token``); raises :class:`KubeError`."""
        ctx = ssl.create_default_context(cadata=self.ca_pem)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                result: dict[str, Any] = json.loads(resp.read() or b"{}")
                return result
        except urllib.error.HTTPError as exc:
            raise KubeError(exc.code, exc.read().decode(errors="replace")) from None

    def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, obj)

    def ensure_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """The namespace (with ``labels``) and its ``default`` ServiceAccount."""
        meta: dict[str, Any] = {"name": name, "labels": labels or {}}
        with contextlib.suppress(KubeError):
            self.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                               "metadata": meta})  # fmt: skip
        self.ensure_service_account(name, "default")

    def ensure_service_account(self, namespace: str, name: str) -> None:
        try:
            self.create(
                f"/api/v1/namespaces/{namespace}/serviceaccounts",
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
            )
        except KubeError as exc:
            if exc.status != 409:  # already there
                raise

    def token_for(
        self,
        namespace: str,
        service_account: str,
        audiences: list[str],
        *,
        seconds: int = 3600,
        pod: dict[str, Any] | None = None,
    ) -> str:
        """A token from the TokenRequest API (bound to ``pod`` when given)."""
        spec: dict[str, Any] = {"audiences": audiences, "expirationSeconds": seconds}
        if pod is not None:
            spec["boundObjectRef"] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            }
        answer = self.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        token: str = answer["status"]["token"]
        return token

    def review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """The ``status`` of a TokenReview of ``token``, asked as the admin."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": audiences}}  # fmt: skip
        status: dict[str, Any] = self.create("/apis/authentication.k8s.io/v1/tokenreviews", body)[
            "status"
        ]
        return status


def _wait_http(
    url: str,
    ctx: ssl.SSLContext | None,
    token: str | None,
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s ({last}):\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def kube_apiserver() -> Iterator[KubeApiServer]:
    """etcd + kube-apiserver, ready, with the ``default`` namespace's ServiceAccount made."""
    apiserver_bin, etcd_bin = kube_apiserver_binary(), etcd_binary()
    root = Path(tempfile.mkdtemp(prefix="mtkube-"))
    etcd: subprocess.Popen[bytes] | None = None
    api: subprocess.Popen[bytes] | None = None
    logs: list[Any] = []
    try:
        client_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_log = (root / "etcd.log").open("wb")
        logs.append(etcd_log)
        etcd = subprocess.Popen(
            [str(etcd_bin), "--name", "test", "--data-dir", str(root / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{client_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
             "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}"],
            stdout=etcd_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        _wait_http(f"http://127.0.0.1:{client_port}/health", None, None, etcd,
                   root / "etcd.log", 30)  # fmt: skip

        ca, key, leaf = make_tls_pair(["localhost", "kubernetes.default.svc"], ["127.0.0.1"])
        (root / "ca.crt").write_bytes(pem_bytes(ca))
        (root / "apiserver.crt").write_bytes(pem_bytes(leaf))
        (root / "apiserver.key").write_bytes(pem_bytes(key))
        (root / "apiserver.key").chmod(0o600)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (root / "sa.key").write_bytes(pem_bytes(sa_key))
        (root / "sa.key").chmod(0o600)
        (root / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        admin_token = secrets.token_urlsafe(32)
        (root / "tokens.csv").write_text(f'{admin_token},admin,admin-uid,"system:masters"\n')
        (root / "tokens.csv").chmod(0o600)
        issuer = f"https://127.0.0.1:{api_port}"
        api_log = (root / "apiserver.log").open("wb")
        logs.append(api_log)
        api = subprocess.Popen(
            [str(apiserver_bin),
             f"--etcd-servers=http://127.0.0.1:{client_port}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             f"--secure-port={api_port}",
             f"--cert-dir={root / 'certs'}",
             f"--tls-cert-file={root / 'apiserver.crt'}",
             f"--tls-private-key-file={root / 'apiserver.key'}",
             f"--token-auth-file={root / 'tokens.csv'}",
             "--authorization-mode=RBAC",
             f"--service-account-issuer={issuer}",
             f"--service-account-key-file={root / 'sa.pub'}",
             f"--service-account-signing-key-file={root / 'sa.key'}",
             f"--api-audiences={issuer}",
             "--service-cluster-ip-range=10.96.0.0/16",
             "--enable-priority-and-fairness=false",
             "--anonymous-auth=true",
             "--profiling=false",
             "--v=1"],
            stdout=api_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        ctx = ssl.create_default_context(cadata=pem_bytes(ca).decode())
        _wait_http(f"{issuer}/readyz", ctx, admin_token, api, root / "apiserver.log", 120)
        kubeconfig = root / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "test",
                    "clusters": [{"name": "test", "cluster": {
                        "server": issuer,
                        "certificate-authority-data": base64.b64encode(pem_bytes(ca)).decode(),
                    }}],
                    "users": [{"name": "admin", "user": {"token": admin_token}}],
                    "contexts": [{"name": "test",
                                  "context": {"cluster": "test", "user": "admin"}}],
                },
                indent=1,
            )
        )  # fmt: skip
        kubeconfig.chmod(0o600)
        server = KubeApiServer(
            port=api_port, root=root, ca_pem=pem_bytes(ca).decode(), admin_token=admin_token,
            kubeconfig=kubeconfig, sa_issuer=issuer,
        )  # fmt: skip
        server.ensure_namespace("default")
        yield server
    finally:
        _stop(api)
        _stop(etcd)
        for f in logs:
            f.close()
        shutil.rmtree(root, ignore_errors=True)
