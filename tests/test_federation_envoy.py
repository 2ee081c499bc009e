"""Per-trust-domain trust in the real Envoy (``envoy.tls.cert_validator.spiffe``, built by
:mod:`meshtrust.envoy.trust_domains`): a peer of trust domain B is accepted only through
B's bundle, so a certificate for ``west.test/...`` signed by east's root is refused though
east's root is trusted (for east.test)."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshtrust.clock import SystemClock
from meshtrust.envoy import EnvoyProcess, admin, node
from meshtrust.envoy.trust_domains import spiffe_validation_context
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.badcerts import Leaf, cert_pem, make_ca, svid_leaf
from tests.envoy_helpers import https_get
from tests.processes import free_port

pytestmark = pytest.mark.slow

NOW = SystemClock().now()
EAST, WEST = TrustDomain.parse("east.test"), TrustDomain.parse("west.test")
EAST_WEB = SpiffeId.parse("spiffe://east.test/ns/default/sa/web")
WEST_API = SpiffeId.parse("spiffe://west.test/ns/default/sa/api")
OTHER = SpiffeId.parse("spiffe://other.test/ns/default/sa/x")
EAST_CA = make_ca("east.test", now=NOW)
WEST_CA = make_ca("west.test", now=NOW)


def test_the_context_has_one_entry_per_trust_domain() -> None:
    context = spiffe_validation_context(
        {WEST: [WEST_CA.root], EAST: [EAST_CA.root]}, accept=[EAST_WEB]
    )
    config = context["custom_validator_config"]
    assert config["name"] == "envoy.tls.cert_validator.spiffe"
    entries = config["typed_config"]["trust_domains"]
    assert [e["name"] for e in entries] == ["east.test", "west.test"]
    assert entries[0]["trust_bundle"]["inline_string"] == cert_pem(EAST_CA.root).decode()
    assert context["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": str(EAST_WEB)}}
    ]
    with pytest.raises(ValueError, match="at least one"):
        spiffe_validation_context({})
    with pytest.raises(ValueError, match="west.test has no roots"):
        spiffe_validation_context({WEST: []})


def _listener(name: str, port: int, server: Leaf, validation: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
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
                            "tls_certificates": [
                                {
                                    "certificate_chain": {
                                        "inline_string": server.chain_pem.decode()
                                    },
                                    "private_key": {"inline_string": server.key_pem.decode()},
                                }
                            ],
                            "validation_context": validation,
                        },
                    },
                },
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
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


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="fedenvoy-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def envoy(workdir: Path) -> Iterator[tuple[int, int]]:
    """West's sidecar-like Envoy: ``any`` trusts east.test and west.test, each by its own
    root; ``only_web`` also accepts only east's web (an upstream's identity check)."""
    server = svid_leaf(WEST_CA.signer, WEST_API, now=NOW)
    bundles = {EAST: [EAST_CA.root], WEST: [WEST_CA.root]}
    any_port, web_port = free_port(), free_port()
    config = {
        "node": node("sidecar~127.0.0.1~api.default~local", "api"),
        "admin": admin(workdir / "admin.sock"),
        "static_resources": {
            "listeners": [
                _listener("any", any_port, server, spiffe_validation_context(bundles)),
                _listener(
                    "only_web",
                    web_port,
                    server,
                    spiffe_validation_context(bundles, accept=[EAST_WEB]),
                ),
            ]
        },
    }
    process = EnvoyProcess(config, workdir, name="fed")
    process.start()
    try:
        process.wait_ready(60)
        yield any_port, web_port
    finally:
        process.stop()


def _call(port: int, client: Leaf, workdir: Path) -> int | None:
    """The status of GET / presenting ``client``; None when Envoy refuses the handshake."""
    try:
        return https_get(port, WEST_CA.root, client, workdir).status
    except (ssl.SSLError, ConnectionError, OSError):
        return None


def test_each_trust_domain_is_vouched_for_by_its_own_root_only(
    envoy: tuple[int, int], workdir: Path
) -> None:
    any_port, _ = envoy
    assert _call(any_port, svid_leaf(EAST_CA.signer, EAST_WEB, now=NOW), workdir) == 200
    assert _call(any_port, svid_leaf(WEST_CA.signer, WEST_API, now=NOW), workdir) == 200
    # East's root is trusted, but not for west.test: a west identity it signed is refused.
    forged = svid_leaf(
        EAST_CA.signer, SpiffeId.parse("spiffe://west.test/ns/default/sa/admin"), now=NOW
    )
    assert _call(any_port, forged, workdir) is None
    # A trust domain with no entry at all, even signed by a trusted root.
    assert _call(any_port, svid_leaf(EAST_CA.signer, OTHER, now=NOW), workdir) is None
    # An unrelated root claiming east.test.
    stranger = make_ca("east.test", now=NOW)
    assert _call(any_port, svid_leaf(stranger.signer, EAST_WEB, now=NOW), workdir) is None


def test_the_identity_check_applies_with_the_spiffe_validator(
    envoy: tuple[int, int], workdir: Path
) -> None:
    _, web_port = envoy
    assert _call(web_port, svid_leaf(EAST_CA.signer, EAST_WEB, now=NOW), workdir) == 200
    other_east = SpiffeId.parse("spiffe://east.test/ns/default/sa/other")
    assert _call(web_port, svid_leaf(EAST_CA.signer, other_east, now=NOW), workdir) is None
    assert _call(web_port, svid_leaf(WEST_CA.signer, WEST_API, now=NOW), workdir) is None
