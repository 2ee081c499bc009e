"""Envoy pieces shared by the tests that run the real Envoy: a minimal mTLS sidecar
bootstrap fed by SDS, an HTTPS client that really verifies the chain, and a bounded poll."""

from __future__ import annotations

import http.client
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509

from meshtrust.envoy import admin, node, sds_cluster, sds_secret_config
from tests.badcerts import Leaf, cert_pem

WAIT = 15.0  # upper bound for anything Envoy should do "at once"
T = TypeVar("T")


def inbound_listener(port: int) -> dict[str, Any]:
    """127.0.0.1:``port``: mTLS with SDS ``default`` and ``ROOTCA``, answering 200 "hello"."""
    return {
        "name": "inbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": True,
                        "common_tls_context": {
                            "tls_certificate_sds_secret_configs": [sds_secret_config("default")],
                            "validation_context_sds_secret_config": sds_secret_config("ROOTCA"),
                        },
                    },
                },
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "inbound",
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/"
                                        "envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "direct_response": {
                                                    "status": 200,
                                                    "body": {"inline_string": "hello"},
                                                },
                                            }
                                        ],
                                    }
                                ]
                            },
                        },
                    }
                ],
            }
        ],
    }


def sidecar_bootstrap(
    socket_path: Path, listener_port: int, admin_socket: Path | None = None
) -> dict[str, Any]:
    """A bootstrap whose admin API is on ``admin_socket`` (default: ``admin.sock`` beside the
    SDS socket), the only place meshtrust ever puts it."""
    return {
        "node": node("sidecar~127.0.0.1~server.default~default.svc.cluster.local", "server"),
        "admin": admin(admin_socket or socket_path.parent / "admin.sock"),
        "static_resources": {
            "clusters": [sds_cluster(socket_path)],
            "listeners": [inbound_listener(listener_port)],
        },
    }


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    peer: x509.Certificate


def https_get(
    port: int, trusted_root: x509.Certificate, client: Leaf | None, workdir: Path
) -> Response:
    """GET / verifying the server's chain up to ``trusted_root``.

    The hostname is not checked: an SVID names a SPIFFE ID in a URI SAN, not a host; the
    callers check the peer's URI SAN themselves. Chain verification stays on.
    """
    context = ssl.create_default_context(cadata=cert_pem(trusted_root).decode())
    context.check_hostname = False
    assert context.verify_mode == ssl.CERT_REQUIRED
    if client is not None:
        directory = Path(tempfile.mkdtemp(dir=workdir))
        (directory / "chain.pem").write_bytes(client.chain_pem)
        (directory / "key.pem").write_bytes(client.key_pem)
        context.load_cert_chain(directory / "chain.pem", directory / "key.pem")
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=WAIT)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        assert isinstance(conn.sock, ssl.SSLSocket)
        der = conn.sock.getpeercert(binary_form=True)
        assert der is not None
        return Response(response.status, body, x509.load_der_x509_certificate(der))
    finally:
        conn.close()


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))
