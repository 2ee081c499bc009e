"""The sidecar's config file and the Envoy config made from it (pure: no Envoy runs here).

Every generated bootstrap and listener is parsed into Envoy's own v3 protobufs, so a
misspelt field or enum value fails here rather than in a running Envoy.
"""

from __future__ import annotations

import json
import os
import re
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from meshtrust.envoy import sidecar
from meshtrust.envoy.sidecar import (
    INBOUND_LISTENER,
    PeerDomains,
    SidecarConfig,
    Upstream,
    app_cluster_name,
    inbound_listeners,
    inbound_stat_prefix,
    lds_response,
    listener_problems,
    load_sidecar_config,
    outbound_cluster_name,
    sidecar_bootstrap,
    sidecar_envoy_args,
    sidecar_listeners,
    write_lds_file,
)
from meshtrust.errors import ConfigError
from meshtrust.policy import load_policy_files
from meshtrust.policy.model import InboundPolicy, MtlsMode, Protocol, WorkloadRef
from meshtrust.spiffe import SpiffeId, TrustDomain

API_ID = SpiffeId.parse("spiffe://example.org/ns/default/sa/api")
DB_ID = SpiffeId.parse("spiffe://example.org/ns/data/sa/db")
WEB_ID = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")

HTTP_RBAC = {
    "name": "envoy.filters.http.rbac",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "DENY", "policies": {}},
    },
}
NETWORK_RBAC = {
    "name": "envoy.filters.network.rbac",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        "stat_prefix": "inbound_15006",
        "rules": {"action": "DENY", "policies": {}},
    },
}


def config(protocol: Protocol = Protocol.HTTP) -> SidecarConfig:
    return SidecarConfig(
        name="web",
        namespace="shop",
        app_port=8080,
        inbound_port=15006,
        protocol=protocol,
        upstreams=(
            Upstream("api", 15101, "127.0.0.1:16006", API_ID),
            Upstream("db", 15102, "db.internal:5432", DB_ID, Protocol.TCP),
        ),
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def docstring_example() -> str:
    """The YAML example in the module docstring, which the README points at."""
    doc = sidecar.__doc__
    assert doc is not None
    start = doc.index("::\n\n") + 4
    end = doc.index("\n\n", start)
    return textwrap.dedent(doc[start:end])


def as_listener(listener: dict[str, Any]) -> Any:
    return json_format.ParseDict(listener, listener_pb2.Listener())


def unpack(any_message: Any, message: Any) -> Any:
    assert any_message.Unpack(message), f"not a {type(message).__name__}"
    return message


# --- loading the YAML -----------------------------------------------------------------------------


def test_documented_example_loads(tmp_path: Path) -> None:
    loaded = load_sidecar_config(write(tmp_path, docstring_example()))
    assert loaded == SidecarConfig(
        name="web",
        namespace="default",
        labels={"version": "v1", "app": "web"},
        app_port=8080,
        inbound_port=15006,
        protocol=Protocol.HTTP,
        upstreams=(
            Upstream(
                "api",
                15101,
                "10.0.0.7:15006",
                SpiffeId.parse("spiffe://example.org/ns/default/sa/api"),
                Protocol.HTTP,
            ),
        ),
    )


def test_defaults_and_either_key_spelling(tmp_path: Path) -> None:
    loaded = load_sidecar_config(
        write(
            tmp_path,
            """
            name: db
            app-port: 5432
            inbound_port: 15006
            protocol: tcp
            upstreams:
              - {name: cache, local-port: 15101, address: "[::1]:15007",
                 spiffe-id: "spiffe://example.org/ns/default/sa/cache"}
            """,
        )
    )
    assert (loaded.namespace, loaded.protocol) == ("default", Protocol.TCP)
    assert loaded.labels == {"app": "db"}
    (upstream,) = loaded.upstreams
    assert (upstream.host, upstream.port, upstream.protocol) == ("::1", 15007, Protocol.HTTP)


MINIMAL = "name: web\napp_port: 8080\ninbound_port: 15006\n"
UPSTREAM = "upstreams:\n  - name: api\n    local_port: 15101\n    address: 127.0.0.1:16006\n"
SPIFFE = "    spiffe_id: spiffe://example.org/ns/default/sa/api\n"


@pytest.mark.parametrize(
    ("text", "field", "line", "why"),
    [
        (MINIMAL + "app_prot: 1\n", "app_prot", 4, "unknown key"),
        ("app_port: 8080\ninbound_port: 15006\n", "", 1, "missing required key 'name'"),
        ("name: web\n", "", 1, "'app_port', 'inbound_port'"),
        (
            "name: web\napp_port: 0\ninbound_port: 15006\n",
            "app_port",
            2,
            "expected a port 1-65535, got 0",
        ),
        ("name: web\napp_port: 70000\ninbound_port: 1\n", "app_port", 2, "got 70000"),
        ("name: web\napp_port: '80'\ninbound_port: 1\n", "app_port", 2, "got '80'"),
        ("name: web\napp_port: true\ninbound_port: 1\n", "app_port", 2, "got a boolean"),
        (MINIMAL + "app-port: 8081\n", "app-port", 4, "given twice"),
        (MINIMAL + "protocol: grpc\n", "protocol", 4, "'grpc' is not a protocol (http, tcp)"),
        (MINIMAL.replace("web", "Web_1"), "name", 1, "is not a name"),
        (MINIMAL + "namespace: a.b\n", "namespace", 4, "is not a name"),
        (MINIMAL + "labels: {version: 1}\n", "labels.version", 4, "quote numbers"),
        (MINIMAL + "labels: [a]\n", "labels", 4, "expected a mapping"),
        (MINIMAL + "labels: {app: other}\n", "labels", 4, "app is 'other'"),
        # Removed: Envoy's admin API is a Unix socket now; the message says where.
        (MINIMAL + "admin_port: 0\n", "admin_port", 4, "is no longer a setting"),
        (MINIMAL + "admin-port: 15000\n", "admin-port", 4, "admin.sock in the workload's Envoy"),
        (MINIMAL.replace("15006", "8080"), "inbound_port", 3, "already used by app_port"),
        (MINIMAL + "upstreams: {a: 1}\n", "upstreams", 4, "expected a list"),
        (MINIMAL + "upstreams: [api]\n", "upstreams[0]", 4, "expected a mapping"),
        (MINIMAL + UPSTREAM, "upstreams[0]", 5, "missing required key 'spiffe_id'"),
        (MINIMAL + UPSTREAM + SPIFFE + "    port: 1\n", "upstreams[0].port", 9, "unknown key"),
        (
            MINIMAL + UPSTREAM.replace("127.0.0.1:16006", "db") + SPIFFE,
            "upstreams[0].address",
            7,
            "is not HOST:PORT",
        ),
        (
            MINIMAL + UPSTREAM.replace("127.0.0.1:16006", "'::1:80'") + SPIFFE,
            "upstreams[0].address",
            7,
            "is not HOST:PORT",
        ),
        (
            MINIMAL + UPSTREAM.replace("127.0.0.1:16006", "db:0") + SPIFFE,
            "upstreams[0].address",
            7,
            "is not HOST:PORT",
        ),
        (
            MINIMAL + UPSTREAM + SPIFFE.replace("spiffe://", "https://"),
            "upstreams[0].spiffe_id",
            8,
            "spiffe",
        ),
        (
            MINIMAL + UPSTREAM + SPIFFE + "    protocol: udp\n",
            "upstreams[0].protocol",
            9,
            "not a protocol",
        ),
        (
            MINIMAL + UPSTREAM.replace("15101", "8080") + SPIFFE,
            "upstreams[0].local_port",
            6,
            "already used by app_port",
        ),
        (
            MINIMAL
            + UPSTREAM
            + SPIFFE
            + UPSTREAM.replace("upstreams:\n", "").replace("15101", "15102")
            + SPIFFE,
            "upstreams[1].name",
            9,
            "'api' appears twice",
        ),
    ],
)
def test_bad_config_names_the_file_the_line_and_the_key(
    tmp_path: Path, text: str, field: str, line: int, why: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_sidecar_config(path)
    assert (error.value.file, error.value.line, error.value.field) == (path, line, field)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: " + (f"{field}: " if field else ""))
    assert why in message


@pytest.mark.parametrize(
    ("text", "why"),
    [("name: [unclosed\n", "not valid YAML at line"), ("- a\n", "expected a mapping")],
)
def test_unreadable_config_names_the_file(tmp_path: Path, text: str, why: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=why) as error:
        load_sidecar_config(path)
    assert str(path) in str(error.value)
    with pytest.raises(ConfigError, match="No such file"):
        load_sidecar_config(tmp_path / "missing.yaml")


def test_constructing_in_code_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="inbound_port"):
        SidecarConfig(name="web", app_port=8080, inbound_port=8080)
    with pytest.raises(ConfigError, match="local_port"):
        Upstream("api", 0, "127.0.0.1:1", API_ID)
    built = SidecarConfig(name="web", app_port=1, inbound_port=2, labels={"tier": "front"})
    assert built.labels == {"tier": "front", "app": "web"}


def test_workload_ref_for_policy_selection() -> None:
    ref = config().workload(WEB_ID)
    assert ref == WorkloadRef(
        name="web",
        namespace="shop",
        spiffe_id=WEB_ID,
        app_port=8080,
        protocol=Protocol.HTTP,
        labels={"app": "web"},
    )


# --- the bootstrap ----------------------------------------------------------------------------


def bootstrap(tmp: Path = Path("/run/web")) -> Any:
    made = sidecar_bootstrap(
        config(),
        sds_socket=tmp / "sds.sock",
        lds_path=tmp / "lds" / "listeners.json",
        node_id="sidecar~127.0.0.1~web.shop~local",
        admin_socket=tmp / "envoy" / "admin.sock",
    )
    return json_format.ParseDict(made, bootstrap_pb2.Bootstrap())


def test_bootstrap_is_a_valid_envoy_bootstrap() -> None:
    parsed = bootstrap()
    # Admin on a Unix socket only the agent's user can open, never on TCP.
    assert parsed.admin.address.pipe.path == "/run/web/envoy/admin.sock"
    assert parsed.admin.address.pipe.mode == 0o600
    assert not parsed.admin.address.HasField("socket_address")
    assert (parsed.node.id, parsed.node.cluster) == ("sidecar~127.0.0.1~web.shop~local", "web.shop")
    names = [c.name for c in parsed.static_resources.clusters]
    assert names == ["sds-grpc", "inbound|8080", "outbound|api", "outbound|db"]
    assert app_cluster_name(config()) == "inbound|8080"

    lds = parsed.dynamic_resources.lds_config
    assert lds.path_config_source.path == "/run/web/lds/listeners.json"
    assert lds.path_config_source.watched_directory.path == "/run/web/lds"
    assert lds.resource_api_version == 2  # V3


def test_bootstrap_clusters() -> None:
    clusters = {c.name: c for c in bootstrap().static_resources.clusters}
    sds = clusters["sds-grpc"]
    assert sds.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path == (
        "/run/web/sds.sock"
    )

    app = clusters["inbound|8080"]
    address = app.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 8080)
    assert not app.HasField("transport_socket")  # plain text to the app on loopback

    api = clusters["outbound|api"]
    assert api.type == api.STATIC
    address = api.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 16006)
    assert api.upstream_connection_options.tcp_keepalive.keepalive_time.value == 300
    options = unpack(
        api.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ],
        http_protocol_options_pb2.HttpProtocolOptions(),
    )
    assert options.HasField("use_downstream_protocol_config")
    assert options.common_http_protocol_options.idle_timeout.seconds == 300

    db = clusters["outbound|db"]
    assert db.type == db.STRICT_DNS  # a host name, not an IP
    assert not db.typed_extension_protocol_options  # tcp: no HTTP options


@pytest.mark.parametrize(("name", "peer"), [("outbound|api", API_ID), ("outbound|db", DB_ID)])
def test_outbound_clusters_originate_mtls_and_check_the_peer_id(name: str, peer: SpiffeId) -> None:
    cluster = {c.name: c for c in bootstrap().static_resources.clusters}[name]
    assert cluster.transport_socket.name == "envoy.transport_sockets.tls"
    tls = unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext())
    common = tls.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == ["default"]
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == "ROOTCA"
    (san,) = combined.default_validation_context.match_typed_subject_alt_names
    assert san.san_type == san.URI
    assert san.matcher.exact == str(peer)
    params = common.tls_params
    assert (params.tls_minimum_protocol_version, params.tls_maximum_protocol_version) == (
        params.TLSv1_2,
        params.TLSv1_3,
    )
    assert not tls.sni


def test_outbound_listeners_are_plain_text_on_loopback() -> None:
    listeners = {item.name: item for item in bootstrap().static_resources.listeners}
    assert set(listeners) == {"outbound|api", "outbound|db"}
    for listener, port in ((listeners["outbound|api"], 15101), (listeners["outbound|db"], 15102)):
        address = listener.address.socket_address
        assert (address.address, address.port_value) == ("127.0.0.1", port)
        (chain,) = listener.filter_chains
        assert not chain.HasField("transport_socket")
        # No SO_REUSEPORT: a second Envoy on these ports fails to bind (issue #9).
        assert listener.HasField("enable_reuse_port")
        assert listener.enable_reuse_port.value is False

    (http_filter,) = listeners["outbound|api"].filter_chains[0].filters
    manager = unpack(http_filter.typed_config, hcm_pb2.HttpConnectionManager())
    (host,) = manager.route_config.virtual_hosts
    route = host.routes[0].route
    assert route.cluster == "outbound|api"
    assert route.timeout.ToSeconds() == 0  # no deadline on streams
    assert "reset-before-request" in route.retry_policy.retry_on
    assert manager.forward_client_cert_details == manager.SANITIZE

    (tcp_filter,) = listeners["outbound|db"].filter_chains[0].filters
    proxy = unpack(tcp_filter.typed_config, tcp_proxy_pb2.TcpProxy())
    assert (proxy.cluster, proxy.stat_prefix) == ("outbound|db", "outbound_db")
    assert outbound_cluster_name(config().upstreams[1]) == "outbound|db"


def test_bootstrap_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        sidecar_bootstrap(
            config(), sds_socket=tmp_path, lds_path=tmp_path, node_id="", admin_socket=tmp_path
        )
    with pytest.raises(ValueError, match="more than the 107"):
        sidecar_bootstrap(
            config(),
            sds_socket=tmp_path,
            lds_path=tmp_path,
            node_id="n",
            admin_socket=tmp_path / ("x" * 108),
        )


def test_listener_problems_name_every_configured_listener_that_is_not_active() -> None:
    cfg = config()
    assert sidecar_listeners(cfg) == {
        "inbound": "inbound listener 127.0.0.1:15006",
        "outbound|api": "outbound listener 127.0.0.1:15101 (to api)",
        "outbound|db": "outbound listener 127.0.0.1:15102 (to db)",
    }
    assert listener_problems(cfg, ["inbound", "outbound|api", "outbound|db", "other"]) == []
    assert listener_problems(cfg, ["outbound|api", "outbound|db"]) == [
        "inbound listener 127.0.0.1:15006 is not active: the port is taken? (see the Envoy log)"
    ]
    assert len(listener_problems(cfg, [])) == 3


def test_envoy_args() -> None:
    assert sidecar_envoy_args() == (
        "--drain-time-s",
        "5",
        "--drain-strategy",
        "immediate",
        "--concurrency",
        "2",
    )
    assert sidecar_envoy_args(drain_time_s=5, concurrency=1)[1::2] == ("5", "immediate", "1")
    with pytest.raises(ValueError):
        sidecar_envoy_args(drain_time_s=-1)
    with pytest.raises(ValueError):
        sidecar_envoy_args(concurrency=0)


# --- the inbound listener ---------------------------------------------------------------------


def inbound(protocol: Protocol, mode: MtlsMode, rbac: tuple[dict[str, Any], ...] = ()) -> Any:
    (listener,) = inbound_listeners(config(protocol), InboundPolicy(mode, rbac))
    return as_listener(listener)


def tls_of(chain: Any) -> Any:
    assert chain.transport_socket.name == "envoy.transport_sockets.tls"
    return unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext())


def manager_of(chain: Any) -> Any:
    (only,) = chain.filters
    assert only.name == "envoy.filters.network.http_connection_manager"
    return unpack(only.typed_config, hcm_pb2.HttpConnectionManager())


@pytest.mark.parametrize("protocol", list(Protocol))
@pytest.mark.parametrize("mode", list(MtlsMode))
def test_inbound_listener_basics(protocol: Protocol, mode: MtlsMode) -> None:
    listener = inbound(protocol, mode)
    assert listener.name == INBOUND_LISTENER
    address = listener.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 15006)  # loopback only
    # No SO_REUSEPORT (Envoy's Linux default): an orphan Envoy cannot share the port.
    assert listener.HasField("enable_reuse_port")
    assert listener.enable_reuse_port.value is False
    assert listener.stat_prefix == inbound_stat_prefix(config()) == "inbound_15006"
    inspectors = [f.name for f in listener.listener_filters]
    if mode is MtlsMode.DISABLE:
        assert inspectors == []
    else:
        assert inspectors == ["envoy.filters.listener.tls_inspector"]


def test_strict_is_one_tls_chain_requiring_a_client_certificate() -> None:
    listener = inbound(Protocol.HTTP, MtlsMode.STRICT)
    (chain,) = listener.filter_chains
    assert chain.filter_chain_match.transport_protocol == "tls"
    tls = tls_of(chain)
    assert tls.require_client_certificate.value is True
    common = tls.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == ["default"]
    assert common.validation_context_sds_secret_config.name == "ROOTCA"
    sds = common.validation_context_sds_secret_config.sds_config
    assert sds.initial_fetch_timeout.ToSeconds() == 0  # wait for the secret, never go without
    assert common.tls_params.tls_minimum_protocol_version == common.tls_params.TLSv1_2
    assert common.tls_params.tls_maximum_protocol_version == common.tls_params.TLSv1_3

    manager = manager_of(chain)
    assert manager.forward_client_cert_details == manager.SANITIZE_SET
    assert manager.set_current_client_cert_details.uri is True
    assert manager.stat_prefix == "inbound_15006"
    route = manager.route_config.virtual_hosts[0].routes[0].route
    assert route.cluster == "inbound|8080"


def test_permissive_adds_a_plain_text_chain_and_keeps_the_tls_one_identical() -> None:
    strict = inbound_listeners(config(), InboundPolicy(MtlsMode.STRICT))[0]
    permissive = inbound_listeners(config(), InboundPolicy(MtlsMode.PERMISSIVE))[0]
    # Only the filter chains differ, and the TLS chain not at all: Envoy updates the
    # listener in place and keeps the mTLS connections.
    assert {k: v for k, v in strict.items() if k != "filter_chains"} == {
        k: v for k, v in permissive.items() if k != "filter_chains"
    }
    assert permissive["filter_chains"][0] == strict["filter_chains"][0]

    tls_chain, plain_chain = as_listener(permissive).filter_chains
    assert tls_chain.filter_chain_match.transport_protocol == "tls"
    assert plain_chain.filter_chain_match.transport_protocol == "raw_buffer"
    assert not plain_chain.HasField("transport_socket")
    manager = manager_of(plain_chain)
    assert manager.forward_client_cert_details == manager.SANITIZE
    assert not manager.HasField("set_current_client_cert_details")


def test_disable_is_plain_text_only() -> None:
    (chain,) = inbound(Protocol.HTTP, MtlsMode.DISABLE).filter_chains
    assert not chain.HasField("filter_chain_match")
    assert not chain.HasField("transport_socket")
    assert manager_of(chain).forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE


@pytest.mark.parametrize("mode", list(MtlsMode))
def test_http_rbac_filters_run_before_the_router(mode: MtlsMode) -> None:
    second = {**HTTP_RBAC, "name": "second"}
    listener = inbound(Protocol.HTTP, mode, (HTTP_RBAC, second))
    for chain in listener.filter_chains:
        names = [f.name for f in manager_of(chain).http_filters]
        assert names == ["envoy.filters.http.rbac", "second", "envoy.filters.http.router"]


@pytest.mark.parametrize("mode", list(MtlsMode))
def test_tcp_chains_run_network_rbac_then_tcp_proxy(mode: MtlsMode) -> None:
    listener = inbound(Protocol.TCP, mode, (NETWORK_RBAC,))
    assert len(listener.filter_chains) == (2 if mode is MtlsMode.PERMISSIVE else 1)
    tls_chains = sum(chain.HasField("transport_socket") for chain in listener.filter_chains)
    assert tls_chains == (0 if mode is MtlsMode.DISABLE else 1)
    for chain in listener.filter_chains:
        names = [f.name for f in chain.filters]
        assert names == ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"]
        proxy = unpack(chain.filters[1].typed_config, tcp_proxy_pb2.TcpProxy())
        assert (proxy.cluster, proxy.stat_prefix) == ("inbound|8080", "inbound_15006")
        if chain.HasField("transport_socket"):
            assert tls_of(chain).require_client_certificate.value is True


@pytest.mark.parametrize(
    ("protocol", "rbac"), [(Protocol.HTTP, NETWORK_RBAC), (Protocol.TCP, HTTP_RBAC)]
)
def test_rbac_filter_of_the_wrong_kind_is_refused(protocol: Protocol, rbac: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="is not an"):
        inbound_listeners(config(protocol), InboundPolicy(MtlsMode.STRICT, (rbac,)))


def test_policy_filters_are_not_mutated() -> None:
    before = json.dumps(HTTP_RBAC, sort_keys=True)
    inbound_listeners(config(), InboundPolicy(MtlsMode.PERMISSIVE, (HTTP_RBAC,)))
    assert json.dumps(HTTP_RBAC, sort_keys=True) == before


# --- the LDS file -----------------------------------------------------------------------------


def test_lds_file_is_a_discovery_response_of_listeners(tmp_path: Path) -> None:
    path = tmp_path / "listeners.json"
    listeners = inbound_listeners(config(), InboundPolicy(MtlsMode.PERMISSIVE, (HTTP_RBAC,)))
    write_lds_file(path, listeners, "7")
    response = json_format.ParseDict(
        json.loads(path.read_text()), discovery_pb2.DiscoveryResponse()
    )
    assert response.version_info == "7"
    (resource,) = response.resources
    listener = unpack(resource, listener_pb2.Listener())
    assert listener.name == INBOUND_LISTENER
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # RBAC principals: the agent's user only
    assert lds_response(listeners, "7") == json.loads(path.read_text())


def test_lds_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "listeners.json"
    write_lds_file(path, inbound_listeners(config(), InboundPolicy(MtlsMode.STRICT)), "1")
    inode = path.stat().st_ino
    write_lds_file(path, inbound_listeners(config(), InboundPolicy(MtlsMode.DISABLE)), "2")
    # A new file was renamed over the old one (what Envoy's directory watch sees), and no
    # temporary file is left behind.
    assert path.stat().st_ino != inode
    assert json.loads(path.read_text())["version_info"] == "2"
    assert os.listdir(tmp_path) == ["listeners.json"]


def test_lds_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "listeners.json"
    write_lds_file(path, [], "1")
    with pytest.raises(TypeError):
        write_lds_file(path, [{"name": "inbound", "bad": object()}], "2")
    assert json.loads(path.read_text())["version_info"] == "1"
    assert os.listdir(tmp_path) == ["listeners.json"]
    # The rename fails (a directory is in the way): the temporary file is removed.
    (tmp_path / "blocked.json").mkdir()
    with pytest.raises(OSError):
        write_lds_file(tmp_path / "blocked.json", [], "1")
    assert sorted(os.listdir(tmp_path)) == ["blocked.json", "listeners.json"]
    with pytest.raises(OSError):
        write_lds_file(tmp_path / "missing" / "listeners.json", [], "1")
    with pytest.raises(ValueError):
        lds_response([], "")


ISTIO_POLICIES = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["example.org/ns/shop/sa/ops"]}}]
    to: [{operation: {paths: ["/admin*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-only, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["shop"]}}]
"""


@pytest.mark.parametrize("protocol", list(Protocol))
def test_policies_compiled_by_the_policy_package_fit_the_listener(
    tmp_path: Path, protocol: Protocol
) -> None:
    """Istio YAML -> meshtrust.policy -> inbound listener -> Envoy's own protobufs."""
    (tmp_path / "policies.yaml").write_text(ISTIO_POLICIES)
    policy_set = load_policy_files([tmp_path / "policies.yaml"])
    web = config(protocol)
    policy = policy_set.inbound_for(web.workload(WEB_ID), trust_domain="example.org")
    assert policy.mode is MtlsMode.PERMISSIVE
    assert len(policy.rbac_filters) == 2  # DENY, then ALLOW
    (listener,) = inbound_listeners(web, policy)
    parsed = as_listener(listener)
    assert len(parsed.filter_chains) == 2
    for chain in parsed.filter_chains:
        if protocol is Protocol.HTTP:
            names = [f.name for f in manager_of(chain).http_filters]
            assert names == ["envoy.filters.http.rbac"] * 2 + ["envoy.filters.http.router"]
        else:
            names = [f.name for f in chain.filters]
            assert names == ["envoy.filters.network.rbac"] * 2 + ["envoy.filters.network.tcp_proxy"]


# --- peers of other trust domains: one chain each, chosen by SNI (envoy/trust_domains.py) ----

OWN = TrustDomain.parse("example.org")
WEST = TrustDomain.parse("west.test")
EAST = TrustDomain.parse("east.test")
OLD = TrustDomain.parse("old.example")


def _denied_prefixes(chain: dict[str, Any]) -> list[str]:
    first = chain["filters"][0]
    if first["name"] != "envoy.filters.network.rbac":
        return []
    rules = first["typed_config"]["rules"]
    assert rules["action"] == "DENY"
    return [
        p["authenticated"]["principal_name"]["prefix"]
        for p in rules["policies"]["foreign-trust-domain"]["principals"]
    ]


def _san_matcher(chain: dict[str, Any]) -> dict[str, Any] | None:
    common = chain["transport_socket"]["typed_config"]["common_tls_context"]
    if "combined_validation_context" not in common:
        return None
    (only,) = common["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"
    ]
    assert only["san_type"] == "URI"
    return dict(only["matcher"])


def _regex_takes(matcher: dict[str, Any] | None, uri: str) -> bool:
    assert matcher is not None
    return re.fullmatch(matcher["safe_regex"]["regex"], uri) is not None


@pytest.mark.parametrize("protocol", list(Protocol))
def test_the_inbound_listener_has_a_chain_per_kind_of_peer(protocol: Protocol) -> None:
    peers = PeerDomains(OWN, aliases=(OLD,), federated=(WEST, OLD, OWN, EAST))
    assert peers.federated == (EAST, WEST)  # the mesh's own and its aliases never are
    (listener,) = inbound_listeners(
        config(protocol), InboundPolicy(MtlsMode.PERMISSIVE), peers=peers, revocation_epoch=2
    )
    as_listener(listener)  # Envoy's own schema takes it
    chains = {c["name"]: c for c in listener["filter_chains"]}
    assert list(chains) == [
        "tls", "tls-td-east.test", "tls-td-west.test", "tls-shared-root", "plaintext",
    ]  # fmt: skip
    sds = {
        name: c["transport_socket"]["typed_config"]["common_tls_context"][
            "combined_validation_context"
        ]["validation_context_sds_secret_config"]["name"]
        for name, c in chains.items()
        if "transport_socket" in c
    }
    assert sds == {
        "tls": "ROOTCA",
        "tls-td-east.test": "ROOTCA:east.test",
        "tls-td-west.test": "ROOTCA:west.test",
        "tls-shared-root": "ROOTCA~shared-root",
    }
    # The mesh's chain: any SNI but the peer ones; refuses federated callers at the
    # handshake (SAN matcher) and, for a certificate with several SANs, by RBAC.
    assert chains["tls"]["filter_chain_match"] == {"transport_protocol": "tls"}
    mesh = _san_matcher(chains["tls"])
    assert _regex_takes(mesh, "spiffe://example.org/ns/a/sa/b")
    assert _regex_takes(mesh, "spiffe://west.test.evil/ns/a/sa/b")
    assert not _regex_takes(mesh, "spiffe://west.test/ns/a/sa/b")
    assert not _regex_takes(mesh, "spiffe://east.test/ns/a/sa/b")
    assert _denied_prefixes(chains["tls"]) == ["spiffe://east.test/", "spiffe://west.test/"]
    # West's callers: west's roots, a west.test URI SAN, and no SAN of anyone else.
    west = chains["tls-td-west.test"]
    assert west["filter_chain_match"]["server_names"] == ["west.test.peer.meshtrust"]
    assert _san_matcher(west) == {"prefix": "spiffe://west.test/"}
    assert sorted(_denied_prefixes(west)) == [
        "spiffe://east.test/",
        "spiffe://example.org/",
        "spiffe://old.example/",
    ]
    # Other trust domains under the mesh's roots: never the mesh's own, an alias or a
    # federated one, at the handshake and by RBAC.
    shared = chains["tls-shared-root"]
    assert shared["filter_chain_match"]["server_names"] == ["*.peer.meshtrust"]
    for uri, taken in (
        ("spiffe://other.test/ns/a/sa/b", True),
        ("spiffe://example.org/ns/a/sa/b", False),
        ("spiffe://old.example/ns/a/sa/b", False),
        ("spiffe://west.test/ns/a/sa/b", False),
    ):
        assert _regex_takes(_san_matcher(shared), uri) is taken, uri
    assert sorted(_denied_prefixes(shared)) == [
        "spiffe://east.test/",
        "spiffe://example.org/",
        "spiffe://old.example/",
        "spiffe://west.test/",
    ]
    # A revocation drains every TLS chain.
    for name in sds:
        assert chains[name]["metadata"]["filter_metadata"]["meshtrust"]["revocation_epoch"] == 2


def test_without_federated_bundles_the_mesh_chain_takes_every_trust_domain() -> None:
    (listener,) = inbound_listeners(
        config(), InboundPolicy(MtlsMode.STRICT), peers=PeerDomains(OWN)
    )
    chains = {c["name"]: c for c in listener["filter_chains"]}
    assert list(chains) == ["tls", "tls-shared-root"]
    assert _denied_prefixes(chains["tls"]) == [] and _san_matcher(chains["tls"]) is None


def test_a_federated_trust_domain_named_peer_gets_its_own_context() -> None:
    peer = TrustDomain.parse("peer")
    (listener,) = inbound_listeners(
        config(), InboundPolicy(MtlsMode.STRICT), peers=PeerDomains(OWN, federated=(peer,))
    )
    names = [c["name"] for c in listener["filter_chains"]]
    assert len(set(names)) == len(names) == 3


def test_an_upstream_of_another_trust_domain_is_called_with_the_peer_sni() -> None:
    west_api = SpiffeId.parse("spiffe://west.test/ns/default/sa/api")
    alias_api = SpiffeId.parse("spiffe://old.example/ns/default/sa/api")
    cfg = SidecarConfig(
        name="web",
        app_port=8080,
        inbound_port=15006,
        upstreams=(
            Upstream("api", 15101, "127.0.0.1:16006", API_ID),
            Upstream("west", 15102, "198.18.0.2:15006", west_api),
            Upstream("old", 15103, "127.0.0.1:16007", alias_api),
        ),
    )
    made = sidecar_bootstrap(
        cfg,
        sds_socket=Path("/run/sds.sock"),
        lds_path=Path("/run/lds/listeners.json"),
        node_id="sidecar~127.0.0.1~web.default~default.svc",
        admin_socket=Path("/run/admin.sock"),
        peers=PeerDomains(OWN, aliases=(OLD,)),
    )
    json_format.ParseDict(made, bootstrap_pb2.Bootstrap())
    tls = {
        c["name"]: c["transport_socket"]["typed_config"]
        for c in made["static_resources"]["clusters"]
        if "transport_socket" in c
    }
    roots = {
        name: t["common_tls_context"]["combined_validation_context"][
            "validation_context_sds_secret_config"
        ]["name"]
        for name, t in tls.items()
    }
    assert roots == {
        "outbound|api": "ROOTCA",
        "outbound|west": "ROOTCA:west.test",
        "outbound|old": "ROOTCA",  # an alias is the mesh's own
    }
    assert tls["outbound|west"]["sni"] == "example.org.peer.meshtrust"
    assert "sni" not in tls["outbound|api"] and "sni" not in tls["outbound|old"]
