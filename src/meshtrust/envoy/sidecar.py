"""The Envoy sidecar of one workload: its YAML config, its bootstrap, its inbound listener.

Sidecar config file
-------------------
One YAML file per workload (keys may be written ``app_port`` or ``app-port``)::

    name: web                 # required; the workload (and its `app` label): [a-z0-9-], <= 63
    namespace: default        # optional, default "default"
    labels:                   # optional; `app: <name>` is always added (a different `app`
      version: v1             #   value is an error); what AuthorizationPolicy selectors match
    app_port: 8080            # required; the app listens on 127.0.0.1:<app_port> in plain text
    inbound_port: 15006       # required; the sidecar's mTLS port, what peers connect to
    protocol: http            # optional, http (default) or tcp: what the app speaks
    inbound_address: 127.0.0.1   # optional (default 127.0.0.1); the host's address across hosts
    min_tls_version: TLSV1_2  # optional, TLSV1_2 (default) or TLSV1_3: both directions
    upstreams:                # optional; services this app calls
      - name: api             #   required; [a-z0-9-], unique
        local_port: 15101     #   required; the app connects to 127.0.0.1:<local_port>
        address: 10.0.0.7:15006   # required; HOST:PORT of the peer sidecar's inbound port
        spiffe_id: spiffe://example.org/ns/default/sa/api  # required; who the peer must be
        protocol: http        #   optional, http (default) or tcp: what the app speaks to it
        # extra_addresses: [10.0.0.8:15006]   optional; more endpoints of the same peer
                              #   (a ServiceEntry's other endpoints): Envoy balances new
                              #   connections over address and these, each must be spiffe_id;
                              #   all IPs or all DNS names (as address is), none given twice

All ports are 1-65535 and the ports this host listens on (app, inbound, every upstream's
local port) are all different. There is no admin port: Envoy's admin API is a Unix socket
in the workload's Envoy directory that only the agent's user can open
(:mod:`meshtrust.envoy.admin`); an ``admin_port`` key is refused with a message saying so.
Duplicate or unknown keys and bad values are :class:`~meshtrust.errors.ConfigError`\\ s
naming the file, the line and the key; names, ports, addresses and labels are checked by
:mod:`meshtrust.config`'s validators, the same ones mesh.yaml goes through.

What Envoy is told
------------------
:func:`sidecar_bootstrap` makes the static part, which never changes while the sidecar runs:

* cluster ``sds-grpc`` (the agent's SDS socket), cluster ``inbound|<app_port>`` (the app on
  127.0.0.1), and per upstream a cluster ``outbound|<name>`` that originates mTLS with the
  workload's SDS ``default`` certificate and accepts the peer only when its chain verifies
  against SDS ``ROOTCA`` *and* its URI SAN is exactly the upstream's ``spiffe_id``;
* per upstream a listener on 127.0.0.1:<local_port>: for ``http`` an HTTP connection manager
  (so Envoy keeps a pool of mTLS connections to the peer and an app that opens a connection
  per request does not pay a handshake per request; failures reach the app as HTTP 503),
  for ``tcp`` a tcp_proxy (one mTLS connection per app connection);
* ``dynamic_resources.lds_config``: the inbound listener is read from a file that Envoy
  watches (:func:`write_lds_file` replaces it atomically; Envoy reloads on the rename).

:func:`inbound_listeners` makes the policy-dependent part, the inbound listener on
<inbound_address>:<inbound_port> (127.0.0.1 on one host; the host's address when the mesh
spans hosts — the app, Envoy's admin socket and the outbound listeners stay local):

* STRICT: tls_inspector + one TLS chain (``transport_protocol: tls``) requiring a client
  certificate that chains to ROOTCA. Plain text matches no chain and is closed.
* PERMISSIVE: tls_inspector + the same TLS chain + a plain-text chain (``raw_buffer``).
  A TLS client without a certificate is refused: Istio's PERMISSIVE is "mTLS or plain
  text", and TLS without a client certificate is neither.
* DISABLE: one plain-text chain, no tls_inspector (server-first protocols would otherwise
  wait for the inspector's timeout).

STRICT and PERMISSIVE share every listener-level field, so switching between them (the usual
migration path) is an in-place filter-chain update: Envoy keeps the TLS chain, and the
connections on it, untouched when only the plain-text chain comes or goes. Any change to a
chain (a new RBAC rule, say) drains that chain's connections: see :func:`sidecar_envoy_args`.

Each chain runs ``policy.rbac_filters`` first, then the HTTP connection manager (``http``:
the RBAC filters are HTTP filters before the router) or tcp_proxy (``tcp``: network filters).
On TLS chains the app receives the caller's identity in ``x-forwarded-client-cert``
(``By=<own id>;Hash=...;URI=spiffe://<caller>``); whatever the caller itself sent in that
header is dropped (``SANITIZE_SET``; ``SANITIZE`` on plain text).

HTTP versions: the sidecars pass on the version the caller spoke (Envoy's
``use_downstream_protocol_config``): HTTP/1.1 stays HTTP/1.1 to the app, HTTP/2 (gRPC, h2c
with prior knowledge) stays HTTP/2. The inbound TLS chain offers no ALPN, so a TLS client
that would take ``h2`` if offered (curl) speaks HTTP/1.1 and an HTTP/1.1-only app is safe.

Stats an operator looks at (with ``P`` = :func:`inbound_stat_prefix`, e.g. ``inbound_15006``):
``listener.P.ssl.*`` (TLS errors: ``fail_verify_no_cert``, ``fail_verify_error``,
``connection_error``), ``listener.P.no_filter_chain_match`` (plain text refused by STRICT),
``http.P.rbac.denied`` (HTTP RBAC; ``http.P.rbac.<rules_stat_prefix>.denied`` when the
filter sets one, e.g. ``http.inbound_15006.rbac.deny_.denied``), ``<stat_prefix>.rbac.denied``
(network RBAC, e.g. ``inbound_rbac_deny.rbac.denied``; Envoy adds the dots); outbound:
``cluster.outbound|<name>.ssl.fail_verify_san`` (the peer is not who it should be),
``cluster.outbound|<name>.upstream_cx_connect_fail``; LDS:
``listener_manager.lds.version_text`` (the version Envoy runs) and
``listener_manager.lds.update_rejected`` (a file Envoy refused; it keeps the previous one).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtrust.config import (
    check_dns_label,
    check_host_port,
    check_labels,
    check_port,
    check_spiffe_id,
    line_for,
    load_yaml_mapping,
    parse_host_port,
)
from meshtrust.envoy.bootstrap import admin, node, sds_cluster, sds_secret_config
from meshtrust.envoy.trust_domains import (
    PEER_ROOT_SECRET,
    PEER_SNI_SUFFIX,
    ROOT_SECRET,
    PeerDomains,
    deny_trust_domains_filter,
    not_trust_domains_regex,
    peer_root_secret,
    peer_sni,
)
from meshtrust.errors import ConfigError
from meshtrust.fileio import Fsync, write_file_atomic
from meshtrust.policy.model import InboundPolicy, MtlsMode, Protocol, WorkloadRef
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_DRAIN_TIME_S",
    "INBOUND_LISTENER",
    "LISTENER_TYPE_URL",
    "PeerDomains",
    "SidecarConfig",
    "Upstream",
    "app_cluster_name",
    "inbound_listeners",
    "inbound_stat_prefix",
    "lds_response",
    "listener_problems",
    "load_sidecar_config",
    "outbound_cluster_name",
    "sidecar_bootstrap",
    "sidecar_envoy_args",
    "sidecar_listeners",
    "write_lds_file",
]

#: The inbound listener's name; it never changes, so every LDS rewrite is an update of the
#: same listener (never a remove + add, which would close the port for a moment).
INBOUND_LISTENER = "inbound"
LISTENER_TYPE_URL = "type.googleapis.com/envoy.config.listener.v3.Listener"

#: How long connections on a replaced filter chain may finish their work before Envoy
#: closes them. Short, because a revocation drains the mTLS chain (:func:`inbound_listeners`)
#: and a revoked caller's idle pooled connection lives until then; busy HTTP connections are
#: drained gracefully long before (Istio's drainDuration is 45 s). See
#: :func:`sidecar_envoy_args`.
DEFAULT_DRAIN_TIME_S = 5
#: Envoy worker threads per sidecar (Istio's default for sidecars).
DEFAULT_CONCURRENCY = 2

_TYPE = "type.googleapis.com/"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_DOWNSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_ROUTER = "envoy.extensions.filters.http.router.v3.Router"
_TLS_INSPECTOR = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

#: ``min_tls_version`` values (Istio's meshMTLS.minProtocolVersion) -> Envoy's names.
TLS_VERSIONS = {"TLSV1_2": "TLSv1_2", "TLSV1_3": "TLSv1_3"}

# Both ends are Envoy: TLS 1.2 is the floor (1.0/1.1 are deprecated, RFC 8996), 1.3 preferred;
# on 1.2 only forward-secret AEAD suites (the 1.3 suites are not configurable in BoringSSL).
_TLS_PARAMS: dict[str, Any] = {
    "tls_minimum_protocol_version": "TLSv1_2",
    "tls_maximum_protocol_version": "TLSv1_3",
    "cipher_suites": [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ],
}

# Envoy's default circuit breakers (1024 connections/requests per cluster) turn a burst into
# 503s with "overflow"; a sidecar should not be the bottleneck of its own app (Istio lifts
# them the same way).
_NO_CIRCUIT_BREAKING = {
    "thresholds": [
        {
            "max_connections": 4294967295,
            "max_pending_requests": 4294967295,
            "max_requests": 4294967295,
            "max_retries": 4294967295,
        }
    ]
}

# Retries that can never run a request twice: the request had not reached the peer.
_SAFE_RETRIES = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
}


# --- the config file ------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """A service the app calls through its sidecar.

    The app connects in plain text to 127.0.0.1:``local_port``; Envoy opens mTLS to
    ``address`` (``HOST:PORT``, the peer sidecar's inbound port) and accepts the peer only if
    its URI SAN is ``spiffe_id``. ``extra_addresses`` are further endpoints of the same peer
    (a ServiceEntry's other endpoints): Envoy balances new connections over all of them, and
    every one must present ``spiffe_id``. They are of the same kind as ``address`` (all IP
    addresses, or all DNS names: the cluster is STATIC or STRICT_DNS as a whole) and no
    endpoint is listed twice. Raises :class:`ConfigError` on a bad field.
    """

    name: str
    local_port: int
    address: str
    spiffe_id: SpiffeId
    protocol: Protocol = Protocol.HTTP
    extra_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_dns_label(self.name, "name")
        check_port(self.local_port, "local_port")
        _split_address(self.address, "address")
        if not isinstance(self.spiffe_id, SpiffeId):
            raise ConfigError(f"expected a SpiffeId, not {self.spiffe_id!r}", field="spiffe_id")
        object.__setattr__(self, "protocol", _check_protocol(self.protocol, "protocol"))
        object.__setattr__(self, "extra_addresses", _check_extra_addresses(self))

    @property
    def host(self) -> str:
        """The peer's host name or IP address (IPv6 without brackets)."""
        return _split_address(self.address, "address")[0]

    @property
    def port(self) -> int:
        return _split_address(self.address, "address")[1]

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Every endpoint Envoy dials, ``(host, port)``: ``address`` first, then the extra
        ones in their order."""
        return ((self.host, self.port),) + tuple(
            _split_address(a, f"extra_addresses[{i}]") for i, a in enumerate(self.extra_addresses)
        )


def _check_extra_addresses(upstream: Upstream) -> tuple[str, ...]:
    """``upstream.extra_addresses`` as a tuple of valid ``HOST:PORT``\\ s, or ConfigError."""
    value: object = upstream.extra_addresses
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError("expected a list of HOST:PORT", field="extra_addresses")
    seen = {_split_address(upstream.address, "address"): "address"}
    kind = _is_ip(upstream.host)
    for i, address in enumerate(value):
        key = f"extra_addresses[{i}]"
        if not isinstance(address, str):
            raise ConfigError(f"expected HOST:PORT, got {address!r}", field=key)
        endpoint = _split_address(address, key)
        if endpoint in seen:
            raise ConfigError(f"{address} is already given as {seen[endpoint]}", field=key)
        seen[endpoint] = key
        if _is_ip(endpoint[0]) != kind:
            ip, name = "an IP address", "a DNS name"
            this, first = (name, ip) if kind else (ip, name)
            raise ConfigError(
                f"{address} is {this} and address ({upstream.address}) {first}: the "
                "endpoints of one upstream are all IP addresses or all DNS names",
                field=key,
            )
    return tuple(value)


@dataclass(frozen=True)
class SidecarConfig:
    """One workload's sidecar: see the module docstring for the fields' meaning.

    ``labels`` always contains ``app: <name>``. Raises :class:`ConfigError` on a bad field or
    when two listening ports coincide.
    """

    name: str
    app_port: int
    inbound_port: int
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    protocol: Protocol = Protocol.HTTP
    upstreams: tuple[Upstream, ...] = ()
    inbound_address: str = "127.0.0.1"
    min_tls_version: str = "TLSV1_2"

    def __post_init__(self) -> None:
        check_dns_label(self.name, "name")
        check_dns_label(self.namespace, "namespace")
        _check_inbound_address(self.inbound_address, "inbound_address")
        _check_tls_version(self.min_tls_version, "min_tls_version")
        check_port(self.app_port, "app_port")
        check_port(self.inbound_port, "inbound_port")
        object.__setattr__(self, "protocol", _check_protocol(self.protocol, "protocol"))
        object.__setattr__(self, "upstreams", tuple(self.upstreams))
        labels = check_labels(self.labels, "labels")
        if labels.setdefault("app", self.name) != self.name:
            raise ConfigError(
                f"app is {labels['app']!r} but the workload is {self.name!r} "
                "(the app label is always the workload's name)",
                field="labels",
            )
        object.__setattr__(self, "labels", labels)

        ports: dict[int, str] = {}
        listening = [
            ("app_port", self.app_port),
            ("inbound_port", self.inbound_port),
        ] + [(f"upstreams[{i}].local_port", u.local_port) for i, u in enumerate(self.upstreams)]
        for key, port in listening:
            if port in ports:
                raise ConfigError(f"port {port} is already used by {ports[port]}", field=key)
            ports[port] = key
        names: set[str] = set()
        for i, upstream in enumerate(self.upstreams):
            if upstream.name in names:
                raise ConfigError(f"{upstream.name!r} appears twice", field=f"upstreams[{i}].name")
            names.add(upstream.name)

    def workload(self, spiffe_id: SpiffeId) -> WorkloadRef:
        """What policy selection needs to know about this workload, once its identity is known
        (the identity comes from the agent, not from this file)."""
        return WorkloadRef(
            name=self.name,
            namespace=self.namespace,
            spiffe_id=spiffe_id,
            app_port=self.app_port,
            protocol=self.protocol,
            labels=dict(self.labels),
        )


def load_sidecar_config(path: Path) -> SidecarConfig:
    """Read a sidecar config file (format in the module docstring).

    Raises :class:`ConfigError` naming the file, the line and the key for unreadable files,
    invalid YAML, duplicate, unknown or missing keys and bad values.
    """
    path = Path(path)
    raw = load_yaml_mapping(path)
    try:
        fields = _read_fields(raw, _TOP_KEYS, required=("name", "app_port", "inbound_port"))
        return SidecarConfig(**fields)
    except ConfigError as exc:
        raise exc.located(path, line_for(raw, exc.field)) from None


# Field converters: (raw YAML value, key path for messages) -> value, or ConfigError; the
# checks are the config layer's, shared with mesh.yaml and the agent's settings.
_Field = Callable[[object, str], Any]


def _as_port(value: object, key: str) -> int:
    return check_port(value, key)


def _admin_port_removed(value: object, key: str) -> int:
    raise ConfigError(
        "is no longer a setting: Envoy's admin API is not on TCP any more (every local user "
        "could reach it there) but on the Unix socket admin.sock in the workload's Envoy "
        "directory, which only the agent's user can open; remove this line (`meshtrust "
        "status` shows the socket under envoy.admin)",
        field=key,
    )


def _as_address(value: object, key: str) -> str:
    return check_host_port(value, key, zero=False)


def _as_addresses(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError("expected a list of HOST:PORT", field=key)
    return tuple(_as_address(item, f"{key}[{i}]") for i, item in enumerate(value))


def _as_upstreams(value: object, key: str) -> tuple[Upstream, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("expected a list of upstreams", field=key)
    out = []
    for i, item in enumerate(value):
        item_key = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError("expected a mapping (name, local_port, ...)", field=item_key)
        fields = _read_fields(
            item,
            _UPSTREAM_KEYS,
            required=("name", "local_port", "address", "spiffe_id"),
            parent=item_key,
        )
        try:
            out.append(Upstream(**fields))
        except ConfigError as exc:  # Upstream names its own fields; place them in the list
            raise ConfigError(exc.problem, field=f"{item_key}.{exc.field}") from None
    return tuple(out)


def _read_fields(
    raw: Mapping[object, object],
    keys: Mapping[str, _Field],
    *,
    required: Sequence[str],
    parent: str = "",
) -> dict[str, Any]:
    """Convert ``raw``'s values with ``keys`` (``a-b`` and ``a_b`` are the same key).

    Keys in messages are paths from the top: ``upstreams[0].local_port``.
    """
    out: dict[str, Any] = {}
    given_as: dict[str, object] = {}
    for key, value in raw.items():
        norm = str(key).replace("-", "_")
        path = f"{parent}.{key}" if parent else str(key)
        if norm in _REMOVED_KEYS and norm not in keys:
            _REMOVED_KEYS[norm](value, path)
        if norm not in keys:
            raise ConfigError(f"unknown key (known keys: {', '.join(keys)})", field=path)
        if norm in given_as:
            raise ConfigError(f"given twice (as {given_as[norm]!r} and {key!r})", field=path)
        given_as[norm] = key
        out[norm] = keys[norm](value, path)
    missing = ", ".join(repr(k) for k in required if k not in out)
    if missing:
        problem = f"missing required key{'s' if ',' in missing else ''} {missing}"
        raise ConfigError(problem, field=parent)
    return out


def _check_protocol(value: object, key: str) -> Protocol:
    for protocol in Protocol:
        if value == protocol.value:
            return protocol
    allowed = ", ".join(p.value for p in Protocol)
    raise ConfigError(f"{value!r} is not a protocol ({allowed})", field=key)


def _check_inbound_address(value: object, key: str) -> str:
    """An IP address to bind (a name would need resolving before Envoy binds it)."""
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ConfigError(f"expected an IP address, got {value!r}", field=key) from None


def _check_tls_version(value: object, key: str) -> str:
    if value not in TLS_VERSIONS:
        raise ConfigError(f"expected {' or '.join(TLS_VERSIONS)}, got {value!r}", field=key)
    return str(value)


def tls_params(config: SidecarConfig) -> dict[str, Any]:
    """Envoy's ``tls_params`` for this sidecar's TLS, inbound and outbound alike."""
    return {
        **_TLS_PARAMS,
        "tls_minimum_protocol_version": TLS_VERSIONS[config.min_tls_version],
    }


def _split_address(text: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port), by the config layer's one parser."""
    return parse_host_port(text, what=key, zero=False)


_UPSTREAM_KEYS: dict[str, _Field] = {
    "name": check_dns_label,
    "local_port": _as_port,
    "address": _as_address,
    "spiffe_id": check_spiffe_id,
    "protocol": _check_protocol,
    "extra_addresses": _as_addresses,
}

_TOP_KEYS: dict[str, _Field] = {
    "name": check_dns_label,
    "namespace": check_dns_label,
    "labels": check_labels,
    "app_port": _as_port,
    "inbound_port": _as_port,
    "protocol": _check_protocol,
    "upstreams": _as_upstreams,
    "inbound_address": _check_inbound_address,
    "min_tls_version": _check_tls_version,
}

#: Keys that were settings once: each is refused by its converter with what replaced it.
_REMOVED_KEYS: dict[str, _Field] = {"admin_port": _admin_port_removed}


# --- names an operator (and the tests) look for ---------------------------------------------


def app_cluster_name(config: SidecarConfig) -> str:
    """The cluster of the local app (Istio's ``inbound|<port>`` style)."""
    return f"inbound|{config.app_port}"


def outbound_cluster_name(upstream: Upstream) -> str:
    """The cluster that reaches ``upstream`` over mTLS; its stats are under
    ``cluster.<this name>.``."""
    return f"outbound|{upstream.name}"


def inbound_stat_prefix(config: SidecarConfig) -> str:
    """The stat prefix of the inbound listener and its HTTP connection manager / tcp_proxy."""
    return f"inbound_{config.inbound_port}"


def _outbound_stat_prefix(upstream: Upstream) -> str:
    return f"outbound_{upstream.name}"


def sidecar_listeners(config: SidecarConfig) -> dict[str, str]:
    """Every listener the sidecar configures, by Envoy name, with what a person calls it
    (``inbound listener 127.0.0.1:15006``). The sidecar is ready only when Envoy reports all
    of them active."""
    out = {INBOUND_LISTENER: f"inbound listener {config.inbound_address}:{config.inbound_port}"}
    for upstream in config.upstreams:
        out[outbound_cluster_name(upstream)] = (
            f"outbound listener 127.0.0.1:{upstream.local_port} (to {upstream.name})"
        )
    return out


def listener_problems(config: SidecarConfig, active: Iterable[str]) -> list[str]:
    """What keeps the sidecar from serving, judged from the names of the listeners Envoy
    reports active (admin ``/listeners``): one line per configured listener that is not.
    Envoy leaves a listener out when it cannot bind its port (another process has it) --
    it then says "cannot bind" in its log and still reports LIVE. Pure."""
    up = set(active)
    return [
        f"{what} is not active: the port is taken? (see the Envoy log)"
        for name, what in sidecar_listeners(config).items()
        if name not in up
    ]


# --- the bootstrap --------------------------------------------------------------------------


#: Envoy's limit on a regex's RE2 program size (its default is 100): room for the
#: trust-domain matchers of a few hundred federated trust domains.
RE2_MAX_PROGRAM_SIZE = 100_000


def sidecar_bootstrap(
    config: SidecarConfig,
    *,
    sds_socket: Path,
    lds_path: Path,
    node_id: str,
    admin_socket: Path,
    peers: PeerDomains | None = None,
) -> dict[str, Any]:
    """The Envoy v3 bootstrap of ``config``'s sidecar (see the module docstring).

    ``peers`` names the workload's own trust domain (and its aliases): an upstream of
    another trust domain is then called with the peer SNI and validated with that trust
    domain's SDS context (:mod:`meshtrust.envoy.trust_domains`). Without it every upstream
    is validated with ``ROOTCA``.

    ``lds_path`` is the file :func:`write_lds_file` maintains; it must exist before Envoy
    starts, and Envoy reloads it whenever a file is renamed into its directory -- give it a
    directory of its own. The admin API is on the Unix socket ``admin_socket``, mode 0600
    (:func:`~meshtrust.envoy.bootstrap.admin`). Raises :class:`ValueError` for an admin
    socket path that is relative or too long, or an empty node id.
    """
    lds = Path(os.path.abspath(lds_path))
    clusters = [sds_cluster(sds_socket), _app_cluster(config)]
    clusters += [_outbound_cluster(u, tls_params(config), peers) for u in config.upstreams]
    return {
        "node": node(node_id, f"{config.name}.{config.namespace}"),
        "admin": admin(Path(os.path.abspath(admin_socket))),
        # The URI SAN matchers of the inbound chains spell out "none of these trust
        # domains" as an RE2 regex (envoy/trust_domains.py), whose program outgrows Envoy's
        # default limit of 100 with the first federated trust domain.
        "layered_runtime": {
            "layers": [
                {
                    "name": "meshtrust",
                    "static_layer": {
                        "re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE,
                        "re2.max_program_size.warn_level": RE2_MAX_PROGRAM_SIZE,
                    },
                }
            ]
        },
        "static_resources": {
            "clusters": clusters,
            "listeners": [_outbound_listener(u) for u in config.upstreams],
        },
        "dynamic_resources": {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": os.fspath(lds),
                    # Watch the directory for renames into it: write_lds_file's os.replace
                    # is a move, and only moves are atomic.
                    "watched_directory": {"path": os.fspath(lds.parent)},
                },
            }
        },
    }


def sidecar_envoy_args(
    *, drain_time_s: int = DEFAULT_DRAIN_TIME_S, concurrency: int = DEFAULT_CONCURRENCY
) -> tuple[str, ...]:
    """Envoy command-line options for a sidecar (``EnvoyProcess(extra_args=...)``).

    A policy change applies to new connections at once. A connection accepted before it
    keeps the filter chain (and so the RBAC verdicts) it was accepted with, while Envoy
    drains it: ``--drain-strategy immediate`` (Istio's choice) makes that quick and
    graceful for HTTP -- the next response on an HTTP/1.1 connection carries
    ``connection: close``, an HTTP/2 connection gets a GOAWAY with it -- so the client
    re-connects and is judged by the new policy, without a request failing. Connections
    still open after ``drain_time_s`` (raw TCP, idle HTTP) are closed then. Only the
    chains that changed are drained; changes that touch listener-level fields (to or from
    DISABLE) replace the whole listener and drain all of its connections.

    ``concurrency`` is the number of worker threads (Envoy's default is one per CPU, too
    many for a host running a sidecar per service; Istio's sidecars use 2). Each worker
    has its own upstream connection pools.
    """
    if drain_time_s < 0:
        raise ValueError(f"drain time must be >= 0 seconds, got {drain_time_s}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return (
        "--drain-time-s",
        str(drain_time_s),
        "--drain-strategy",
        "immediate",
        "--concurrency",
        str(concurrency),
    )


def _app_cluster(config: SidecarConfig) -> dict[str, Any]:
    name = app_cluster_name(config)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        # The app is on this host: a refused connection comes back at once.
        "connect_timeout": "1s",
        "circuit_breakers": _NO_CIRCUIT_BREAKING,
        "load_assignment": _endpoints(name, "127.0.0.1", config.app_port),
    }
    if config.protocol is Protocol.HTTP:
        # HTTP/1.1 to the app for HTTP/1.1 callers, h2c for HTTP/2 callers (gRPC).
        cluster["typed_extension_protocol_options"] = _http_options(idle_timeout=None)
    return cluster


def _outbound_cluster(
    upstream: Upstream, params: Mapping[str, Any], peers: PeerDomains | None
) -> dict[str, Any]:
    name = outbound_cluster_name(upstream)
    is_ip = _is_ip(upstream.host)
    upstream_td = upstream.spiffe_id.trust_domain
    foreign = peers is not None and not peers.is_own(upstream_td)
    roots = peer_root_secret(upstream_td) if foreign else ROOT_SECRET
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": "5s",
        "circuit_breakers": _NO_CIRCUIT_BREAKING,
        "load_assignment": _endpoints(name, upstream.host, upstream.port, upstream.endpoints[1:]),
        # Finds a dead peer host under an idle pooled connection in a few minutes, and keeps
        # NAT/conntrack state alive between sidecars on different hosts.
        "upstream_connection_options": {
            "tcp_keepalive": {
                "keepalive_time": 300,
                "keepalive_interval": 30,
                "keepalive_probes": 3,
            }
        },
        "transport_socket": {
            "name": _TLS_SOCKET,
            "typed_config": {
                "@type": _TYPE + _UPSTREAM_TLS,
                "common_tls_context": {
                    "tls_params": dict(params),
                    "tls_certificate_sds_secret_configs": [sds_secret_config("default")],
                    "combined_validation_context": {
                        # The peer must chain to ROOTCA (from SDS) *and* be this identity.
                        "default_validation_context": {
                            "match_typed_subject_alt_names": [
                                {
                                    "san_type": "URI",
                                    "matcher": {"exact": str(upstream.spiffe_id)},
                                }
                            ]
                        },
                        "validation_context_sds_secret_config": sds_secret_config(roots),
                    },
                },
            },
        },
    }
    if foreign:
        assert peers is not None
        # Tells the peer's inbound listener which trust domain this caller is of, so it
        # validates it by that trust domain's roots and CRLs (envoy/trust_domains.py).
        cluster["transport_socket"]["typed_config"]["sni"] = peer_sni(peers.own)
    if not is_ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if upstream.protocol is Protocol.HTTP:
        # Pooled upstream connections are closed when idle for 5 minutes: well before the
        # peer's HCM idle timeout (1 h), so the peer never closes a connection we are
        # about to reuse.
        cluster["typed_extension_protocol_options"] = _http_options(idle_timeout="300s")
    return cluster


def _http_options(*, idle_timeout: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "@type": _TYPE + _HTTP_OPTIONS,
        "use_downstream_protocol_config": {
            "http_protocol_options": {},
            "http2_protocol_options": {},
        },
    }
    if idle_timeout is not None:
        options["common_http_protocol_options"] = {"idle_timeout": idle_timeout}
    return {_HTTP_OPTIONS: options}


def _endpoints(
    cluster: str, host: str, port: int, more: Sequence[tuple[str, int]] = ()
) -> dict[str, Any]:
    """A load assignment of one locality: ``host:port``, then ``more`` ((host, port)s)."""
    endpoints = ((host, port), *more)
    return {
        "cluster_name": cluster,
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": host, "port_value": port}}
                        }
                    }
                    for host, port in endpoints
                ]
            }
        ],
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _outbound_listener(upstream: Upstream) -> dict[str, Any]:
    prefix = _outbound_stat_prefix(upstream)
    cluster = outbound_cluster_name(upstream)
    if upstream.protocol is Protocol.HTTP:
        # The app's own x-forwarded-client-cert is dropped here already; the peer's inbound
        # drops it again (it cannot trust its callers to have done so).
        terminal = _hcm(prefix, cluster, filters=(), xfcc="SANITIZE")
    else:
        terminal = _tcp_proxy(prefix, cluster)
    return {
        "name": cluster,
        "address": _loopback(upstream.local_port),
        "enable_reuse_port": False,  # a second Envoy on these ports fails to bind
        "stat_prefix": prefix,
        "filter_chains": [{"filters": [terminal]}],
    }


def _loopback(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


# --- the inbound listener (policy-dependent) ------------------------------------------------


def inbound_listeners(
    config: SidecarConfig,
    policy: InboundPolicy,
    *,
    revocation_epoch: int = 0,
    peers: PeerDomains | None = None,
) -> list[dict[str, Any]]:
    """The listeners to serve over LDS for ``policy``: the inbound listener on
    127.0.0.1:<inbound_port> (see the module docstring for each mode's filter chains).

    With ``peers``, the TLS chain is one chain per kind of peer, chosen by the SNI the
    caller sends (:mod:`meshtrust.envoy.trust_domains`): the mesh's own (no peer SNI), each
    federated trust domain's, and other trust domains under the mesh's roots. A change of
    ``peers.federated`` adds or removes a chain and changes what the others refuse, so
    Envoy drains their connections (the callers reconnect).

    ``revocation_epoch`` (counted by the agent, one per CRL that revoked something new) is
    written into the mTLS chain's metadata: a new epoch is a new chain to Envoy, so it
    drains the connections accepted on the old one and their callers reconnect, to be
    checked against the CRL Envoy holds by then (see :func:`sidecar_envoy_args`). Nothing
    else changes; plain-text chains and the listener itself are untouched.

    Raises :class:`ValueError` if an RBAC filter of ``policy`` is not of the workload's kind
    (network filters for ``tcp``, HTTP filters for ``http``): Envoy would refuse the
    listener, so it is a bug in whoever compiled the policy.
    """
    rbac = tuple(policy.rbac_filters)
    _check_filters(config.protocol, rbac)
    prefix = inbound_stat_prefix(config)
    mode = MtlsMode(policy.mode)
    chains: list[dict[str, Any]] = []
    if mode in (MtlsMode.STRICT, MtlsMode.PERMISSIVE):
        for tls_chain in _tls_chains(config, rbac, peers):
            if revocation_epoch:
                tls_chain["metadata"] = {
                    "filter_metadata": {"meshtrust": {"revocation_epoch": revocation_epoch}}
                }
            chains.append(tls_chain)
    if mode in (MtlsMode.PERMISSIVE, MtlsMode.DISABLE):
        plain_chain = _inbound_chain(config, rbac, tls=False)
        if mode is MtlsMode.PERMISSIVE:
            plain_chain["filter_chain_match"] = {"transport_protocol": "raw_buffer"}
        chains.append(plain_chain)
    listener: dict[str, Any] = {
        "name": INBOUND_LISTENER,
        "address": {
            "socket_address": {"address": config.inbound_address, "port_value": config.inbound_port}
        },
        # Envoy's default on Linux is SO_REUSEPORT, with which a second Envoy (an orphan of a
        # killed agent) binds the same port and silently takes a share of the connections.
        "enable_reuse_port": False,
        "stat_prefix": prefix,
        "filter_chains": chains,
    }
    if mode is not MtlsMode.DISABLE:
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": _TYPE + _TLS_INSPECTOR},
            }
        ]
        # A plain-text client that waits for the server to speak first reaches the
        # plain-text chain after the inspector's timeout instead of being closed.
        listener["continue_on_listener_filters_timeout"] = True
    return [listener]


def _tls_chains(
    config: SidecarConfig, rbac: tuple[Mapping[str, Any], ...], peers: PeerDomains | None
) -> list[dict[str, Any]]:
    """The inbound TLS chains: one without ``peers``; with them, the mesh's chain, one per
    federated trust domain and one for other trust domains under the mesh's roots.

    Each chain refuses, at the handshake (a URI SAN matcher on its validation context), a
    caller whose SPIFFE ID is of a trust domain that chain does not serve; and, as the
    matcher passes a certificate when *any* of its SANs matches (an SVID has one, a forged
    certificate may have several), a network RBAC DENY before every other filter closes a
    connection when any SAN names such a trust domain."""
    prefix = inbound_stat_prefix(config)
    if peers is None:
        mesh = _inbound_chain(config, rbac, tls=True, name="tls")
        mesh["filter_chain_match"] = {"transport_protocol": "tls"}
        return [mesh]
    own = (peers.own, *peers.aliases)
    mesh = _inbound_chain(
        config,
        rbac,
        tls=True,
        name="tls",
        san=_not_of(peers.federated),
        deny=peers.federated,
        deny_prefix=f"{prefix}_federated_td",
    )
    mesh["filter_chain_match"] = {"transport_protocol": "tls"}
    chains = [mesh]
    for td in peers.federated:
        chain = _inbound_chain(
            config,
            rbac,
            tls=True,
            name=f"tls-td-{td.name}",
            roots=peer_root_secret(td),
            san={"prefix": f"spiffe://{td.name}/"},
            deny=(*own, *(f for f in peers.federated if f != td)),
            deny_prefix=f"{prefix}_td_{td.name.replace('.', '_')}",
        )
        chain["filter_chain_match"] = {
            "transport_protocol": "tls",
            "server_names": [peer_sni(td)],
        }
        chains.append(chain)
    shared = _inbound_chain(
        config,
        rbac,
        tls=True,
        name="tls-shared-root",
        roots=PEER_ROOT_SECRET,
        san=_not_of((*own, *peers.federated)),
        deny=(*own, *peers.federated),
        deny_prefix=f"{prefix}_shared_root_td",
    )
    shared["filter_chain_match"] = {
        "transport_protocol": "tls",
        "server_names": [f"*.{PEER_SNI_SUFFIX}"],
    }
    chains.append(shared)
    return chains


def _not_of(tds: Sequence[TrustDomain]) -> dict[str, Any] | None:
    """A string matcher for SPIFFE IDs of none of ``tds`` (None: every ID)."""
    if not tds:
        return None
    return {"safe_regex": {"regex": not_trust_domains_regex(tds)}}


def _inbound_chain(
    config: SidecarConfig,
    rbac: tuple[Mapping[str, Any], ...],
    *,
    tls: bool,
    name: str | None = None,
    roots: str = ROOT_SECRET,
    san: Mapping[str, Any] | None = None,
    deny: Sequence[TrustDomain] = (),
    deny_prefix: str = "",
) -> dict[str, Any]:
    """One inbound chain. A TLS chain validates the caller with SDS ``roots``; ``san``
    adds a URI SAN matcher the caller must pass at the handshake, ``deny`` a network RBAC
    filter (first of all) closing connections of callers with a SAN in those trust
    domains."""
    prefix = inbound_stat_prefix(config)
    cluster = app_cluster_name(config)
    if config.protocol is Protocol.HTTP:
        xfcc = "SANITIZE_SET" if tls else "SANITIZE"
        filters = [_hcm(prefix, cluster, filters=rbac, xfcc=xfcc)]
    else:
        filters = [*(dict(f) for f in rbac), _tcp_proxy(prefix, cluster)]
    if deny:
        filters.insert(0, deny_trust_domains_filter(deny, stat_prefix=f"{deny_prefix}."))
    default_name = "tls" if tls else "plaintext"
    chain: dict[str, Any] = {"name": name or default_name, "filters": filters}
    if tls:
        common: dict[str, Any] = {
            "tls_params": tls_params(config),
            "tls_certificate_sds_secret_configs": [sds_secret_config("default")],
        }
        if san is None:
            common["validation_context_sds_secret_config"] = sds_secret_config(roots)
        else:
            common["combined_validation_context"] = {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": dict(san)}]
                },
                "validation_context_sds_secret_config": sds_secret_config(roots),
            }
        chain["transport_socket"] = {
            "name": _TLS_SOCKET,
            "typed_config": {
                "@type": _TYPE + _DOWNSTREAM_TLS,
                "require_client_certificate": True,
                "common_tls_context": common,
            },
        }
    return chain


def _check_filters(protocol: Protocol, filters: Iterable[Mapping[str, Any]]) -> None:
    kind = "http" if protocol is Protocol.HTTP else "network"
    wanted = f"{_TYPE}envoy.extensions.filters.{kind}."
    for entry in filters:
        typed = entry.get("typed_config")
        type_url = typed.get("@type") if isinstance(typed, Mapping) else None
        if not isinstance(type_url, str) or not type_url.startswith(wanted):
            raise ValueError(
                f"RBAC filter {entry.get('name')!r} ({type_url or 'no @type'}) is not an "
                f"{kind} filter, which a {protocol.value} workload's inbound listener needs"
            )


def _hcm(
    stat_prefix: str,
    cluster: str,
    *,
    filters: Iterable[Mapping[str, Any]],
    xfcc: str,
) -> dict[str, Any]:
    manager: dict[str, Any] = {
        "@type": _TYPE + _HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "http_filters": [
            *(dict(f) for f in filters),
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _TYPE + _ROUTER}},
        ],
        "route_config": {
            "name": cluster,
            "virtual_hosts": [
                {
                    "name": cluster,
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": cluster,
                                # No per-request deadline (Envoy's default is 15 s): streams
                                # and long polls are the app's business.
                                "timeout": "0s",
                                "retry_policy": _SAFE_RETRIES,
                            },
                        }
                    ],
                }
            ],
        },
        # Paths as RBAC rules see them: "/a/../b" and "//b" are "/b" (Istio's defaults).
        "normalize_path": True,
        "merge_slashes": True,
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "forward_client_cert_details": xfcc,
    }
    if xfcc == "SANITIZE_SET":
        # Only on mTLS chains: the app learns the caller's SPIFFE ID (URI=...).
        manager["set_current_client_cert_details"] = {"uri": True}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": _TYPE + _TCP_PROXY,
            "stat_prefix": stat_prefix,
            "cluster": cluster,
        },
    }


# --- the LDS file -----------------------------------------------------------------------------


def lds_response(listeners: Iterable[Mapping[str, Any]], version: str) -> dict[str, Any]:
    """The LDS file's content: a ``DiscoveryResponse`` whose resources are the listeners."""
    if not version:
        raise ValueError("an LDS version must be a non-empty string")
    return {
        "version_info": version,
        "resources": [{"@type": LISTENER_TYPE_URL, **dict(listener)} for listener in listeners],
    }


def write_lds_file(
    path: Path,
    listeners: Iterable[Mapping[str, Any]],
    version: str,
    *,
    fsync: Fsync = os.fsync,
) -> None:
    """Replace the LDS file at ``path`` atomically and durably, as JSON (through
    :func:`meshtrust.fileio.write_file_atomic`, mode 0600: no keys in it, but the RBAC
    principals of the workload's policy, which are nobody else's business; Envoy runs as the
    agent's user). Envoy sees the rename and applies the listeners; a reader
    never sees a half-written file. Envoy reports the version it applied in the stat
    ``listener_manager.lds.version_text``.

    Raises :class:`OSError` if the directory is not writable (the old file is untouched).
    """
    data = json.dumps(lds_response(listeners, version), indent=1).encode()
    write_file_atomic(Path(path), data, 0o600, fsync=fsync)
