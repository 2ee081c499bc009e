"""The Kubernetes client: config from a kubeconfig or the pod, and requests against an
in-process HTTPS server on loopback (the real API server is in tests/test_kube.py)."""

from __future__ import annotations

import base64
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshtrust.errors import ConfigError
from meshtrust.kube import (
    KubeApiError,
    KubeClient,
    KubeConfig,
    KubeUnavailable,
    in_cluster_config,
    load_kubeconfig,
)
from tests.kube import make_tls_pair, pem_bytes
from tests.processes import free_port

SECRET = "s3cr3t-token-value"


def _kubeconfig(tmp_path: Path, user: str, cluster_extra: str = "", ca: str = "") -> Path:
    ca = ca or base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "contexts:\n- name: c\n  context: {cluster: k, user: u}\n"
        "clusters:\n- name: k\n  cluster:\n    server: https://10.0.0.1:6443\n"
        f"    certificate-authority-data: {ca}\n{cluster_extra}"
        f"users:\n- name: u\n  user:\n{user}"
    )
    return path


def test_kubeconfig_with_a_token_file(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text(SECRET + "\n")
    cfg = load_kubeconfig(_kubeconfig(tmp_path, "    tokenFile: tok\n"))
    assert (cfg.host, cfg.port, cfg.server) == ("10.0.0.1", 6443, "https://10.0.0.1:6443")
    assert cfg.read_token() == SECRET
    (tmp_path / "tok").write_text("rotated")  # re-read per request: the kubelet rotates it
    assert cfg.read_token() == "rotated"
    assert SECRET not in repr(cfg)


@pytest.mark.parametrize(
    ("user", "extra", "message"),
    [
        ("    username: a\n", "", r"kubeconfig:14: users\[0\].user: only bearer-token users"),
        ("    token: x\n", "    insecure-skip-tls-verify: true\n", "TLS is always verified"),
        ("    token: x\n", "    server: http://x\n", "duplicate key .server."),
    ],
)
def test_kubeconfig_mistakes_name_file_line_and_field(
    tmp_path: Path, user: str, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_kubeconfig(_kubeconfig(tmp_path, user, extra))


def test_kubeconfig_server_must_be_https(tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path, "    token: x\n")
    path.write_text(path.read_text().replace("https://10.0.0.1:6443", "http://10.0.0.1"))
    with pytest.raises(ConfigError, match=r"kubeconfig:10: clusters\[0\].cluster.server: .*https"):
        load_kubeconfig(path)


def test_in_cluster_config(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("PEM")
    (tmp_path / "token").write_text(SECRET)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    cfg = in_cluster_config(env, tmp_path)
    assert (cfg.server, cfg.read_token(), cfg.source) == ("https://10.96.0.1:443", SECRET,
                                                          "in-cluster")  # fmt: skip
    with pytest.raises(ConfigError, match="not running in a Kubernetes pod"):
        in_cluster_config({}, tmp_path)
    (tmp_path / "token").unlink()
    with pytest.raises(ConfigError, match="no service-account token"):
        in_cluster_config(env, tmp_path)


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, bytes]] = {}
    seen: list[tuple[str, str, str, Any]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append((self.command, self.path, self.headers["Authorization"], body))
        status, data = self.answers.get(self.path, (404, b'{"message": "not here"}'))
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[KubeConfig, type[_Handler]]]:
    ca, key, leaf = make_tls_pair(["localhost"], ["127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(pem_bytes(leaf))
    (tmp_path / "k.pem").write_bytes(pem_bytes(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    _Handler.answers, _Handler.seen = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    (tmp_path / "token").write_text(SECRET)
    cfg = KubeConfig("127.0.0.1", server.server_address[1], pem_bytes(ca).decode(),
                     token_file=tmp_path / "token")  # fmt: skip
    try:
        yield cfg, _Handler
    finally:
        server.shutdown()
        server.server_close()


def test_requests_carry_the_token_and_decode_json(
    https_server: tuple[KubeConfig, type[_Handler]],
) -> None:
    cfg, handler = https_server
    handler.answers["/x"] = (201, b'{"ok": true}')
    assert KubeClient(cfg).request("POST", "/x", {"a": 1}) == {"ok": True}
    assert handler.seen == [("POST", "/x", f"Bearer {SECRET}", {"a": 1})]


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (403, b'{"message": "forbidden: no RBAC", "reason": "Forbidden"}', KubeApiError,
         "HTTP 403: forbidden: no RBAC"),
        (404, b"not json", KubeApiError, "HTTP 404$"),
        (503, b'{"message": "etcd down"}', KubeUnavailable, "HTTP 503: etcd down"),
        (429, b"{}", KubeUnavailable, "HTTP 429"),
        (200, b"[1]", KubeUnavailable, "not a JSON object"),
    ],
)  # fmt: skip
def test_error_answers_become_our_errors(
    https_server: tuple[KubeConfig, type[_Handler]],
    status: int,
    body: bytes,
    error: type[Exception],
    message: str,
) -> None:
    cfg, handler = https_server
    handler.answers["/x"] = (status, body)
    with pytest.raises(error, match=message) as info:
        KubeClient(cfg).request("GET", "/x")
    assert SECRET not in str(info.value)


def test_unreachable_and_untrusted_servers_are_unavailable(
    https_server: tuple[KubeConfig, type[_Handler]],
) -> None:
    cfg, _ = https_server
    closed = KubeConfig("127.0.0.1", free_port(), cfg.ca_pem, token="t")
    with pytest.raises(KubeUnavailable, match="cannot reach the API server"):
        KubeClient(closed).request("GET", "/x")
    other_ca, _, _ = make_tls_pair(["localhost"], ["127.0.0.1"])
    wrong = KubeConfig("127.0.0.1", cfg.port, pem_bytes(other_ca).decode(), token="t")
    with pytest.raises(KubeUnavailable, match="does not verify against the cluster CA"):
        KubeClient(wrong).request("GET", "/x")
    with pytest.raises(ConfigError, match="not a usable PEM"):
        KubeClient(KubeConfig("127.0.0.1", 1, "garbage", token="t"))
