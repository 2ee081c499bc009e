"""``mesh.yaml``: a whole local mesh in one file, validated before anything starts.

Example (paths are relative to the file)::

    trustDomain: cluster.local        # default cluster.local
    certTTL: 2m                       # workload certificate lifetime (default 24h)
    workDir: ./.meshtrust/demo        # runtime files: CA dir, sockets, certs, logs, Envoy
    rootNamespace: istio-system       # policies here apply mesh-wide (default istio-system)
    ca:
      listen: 127.0.0.1:15012         # default
      dir: ./.meshtrust/demo/ca       # default <workDir>/ca; created if missing
    services:
      - name: backend
        namespace: default            # default "default"
        serviceAccount: backend       # default = name
        labels: {tier: backend}       # policy selectors; `app: <name>` is always added
        protocol: http                # http | tcp (default http)
        port: 8080                    # the app's plain-text port on loopback
        inboundPort: 16080            # the sidecar's mTLS port (picked when omitted)
        command: ["python3", "app.py", "8080"]   # optional; started and stopped with the mesh
        upstreams:
          - service: other            # a service of this file
            localPort: 19001          # app -> 127.0.0.1:19001 -> mTLS -> other's sidecar
          - host: api.west.test       # or: a host of a ServiceEntry in the policy files
            port: 443                 #   its ServiceEntry port (required with host)
            localPort: 19002          #   app -> 127.0.0.1:19002 -> mTLS -> the endpoint
            name: west-api            #   optional; default the host, dots as dashes
    policies: [policies.yaml]         # Istio YAML: PeerAuthentication, AuthorizationPolicy,
                                      # ServiceEntry, DestinationRule
    trustDomainAliases: [old.test]    # Istio's meshConfig.trustDomainAliases (default none)
    dashboard:
      listen: 127.0.0.1:20001         # the web dashboard of `up` (default; loopback only)

Across hosts (optional; without ``hosts`` everything runs on this host)::

    hosts:
      - name: h1
        address: 198.18.0.1           # how the other hosts reach this one (IP or DNS name)
    ca:
      host: h1                        # required with hosts; listens on <address>:15012
    services:
      - name: api
        host: h2                      # required with hosts
        inboundPort: 16080            # required with hosts (the other hosts dial it)
        certTTL: 12h                  # optional per service; default the mesh's certTTL
        rotationRatio: 0.5            # optional: part of the lifetime left at renewal (0.5)
    meshMTLS:
      minProtocolVersion: TLSV1_3     # TLSV1_2 (default) | TLSV1_3, every sidecar, both ways

Every problem is a :class:`ConfigError` (or :class:`PolicyError`) naming the file, the line
and the field path (``mesh.yaml:14: services[1].upstreams[0].localPort: expected a port
1-65535, got 'x'``): broken YAML, a duplicate key, an unknown key, a name the sidecar would
refuse (names are DNS labels, checked by the same validators the sidecar config and the agent
use), a duplicate service, an upstream to a service that is not in the file, two things on one
port, a ``workDir`` or ``ca.dir`` that cannot be a directory, a bad policy; with ``hosts``: a
duplicate host name or address, a ``ca.host`` missing or unknown, a service without a
``host`` or ``inboundPort`` or on an unknown host (ports must differ only per host).

An upstream naming a ``host`` (services of another mesh) is resolved here, against the
ServiceEntry and DestinationRule objects of the policy files
(:meth:`~meshtrust.policy.PolicySet.remote_service`): the endpoint to dial and the one
identity to accept. It is refused, at the upstream's line, when no ServiceEntry has the
host or the port, when its DestinationRule is not ISTIO_MUTUAL, when there is no identity
to expect or several (the sidecar checks one), when the entry's endpoints mix IP addresses
and DNS names or list one twice (the sidecar balances over all of them, as one STATIC or
STRICT_DNS cluster) or the DestinationRule sets ``sni`` (the sidecar sends none yet). A
``trustDomainAliases`` entry must be a trust domain, not the mesh's own, and not repeated.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshtrust.agent.rotation import check_rotation
from meshtrust.config import (
    ConfigError,
    LineMap,
    check_directory_location,
    check_dns_label,
    check_dns_subdomain,
    check_duration,
    check_float,
    check_host_port,
    check_labels,
    check_path,
    check_port,
    check_string,
    check_string_list,
    check_trust_domain,
    describe,
    line_for,
    load_yaml_mapping,
    parse_host_port,
)
from meshtrust.config.federation import FederationConfig, check_federation
from meshtrust.envoy.sidecar import Upstream
from meshtrust.errors import InvalidSpiffeId
from meshtrust.policy import PolicySet, Protocol, load_policy_files
from meshtrust.policy.networking import RemoteService, UnknownHost
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "TLS_VERSIONS",
    "HostSpec",
    "MeshConfig",
    "RemoteUpstreamSpec",
    "ServiceSpec",
    "UpstreamSpec",
    "check_loopback_listen",
    "host_port",
    "load_mesh_config",
    "mesh_work_dir",
]

_TOP = {
    "trustDomain",
    "certTTL",
    "workDir",
    "rootNamespace",
    "ca",
    "services",
    "policies",
    "hosts",
    "meshMTLS",
    "dashboard",
    "federation",
    "trustDomainAliases",
}
_CA = {"listen", "dir", "host"}
_DASHBOARD = {"listen"}
_HOST = {"name", "address"}
_MESH_MTLS = {"minProtocolVersion"}
#: meshMTLS.minProtocolVersion values, as Istio's meshConfig spells them.
TLS_VERSIONS = ("TLSV1_2", "TLSV1_3")
#: The CA's port on its host when ``ca.listen`` is not given.
CA_PORT = 15012
_SERVICE = {
    "name",
    "namespace",
    "serviceAccount",
    "labels",
    "protocol",
    "port",
    "inboundPort",
    "command",
    "upstreams",
    "env",
    "host",
    "certTTL",
    "rotationRatio",
}
_UPSTREAM = {"service", "localPort", "host", "port", "name"}
#: What the sidecar speaks to a ServiceEntry port, by the port's protocol: HTTP parsed (a
#: pool of mTLS connections, 503 on failure), the others passed on as bytes (the app's own
#: TLS, if it speaks HTTPS, travels inside the sidecars' mTLS).
_SE_PROTOCOL = {
    "HTTP": Protocol.HTTP,
    "HTTP2": Protocol.HTTP,
    "GRPC": Protocol.HTTP,
    "HTTPS": Protocol.TCP,
    "TLS": Protocol.TCP,
    "TCP": Protocol.TCP,
}


def host_port(host: str, port: int) -> str:
    """``HOST:PORT`` as :func:`parse_host_port` reads it back (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class HostSpec:
    name: str
    address: str  # IP address or DNS name the other hosts reach this one at


@dataclass(frozen=True)
class UpstreamSpec:
    service: str
    local_port: int


@dataclass(frozen=True)
class RemoteUpstreamSpec:
    """An upstream naming a host of a ServiceEntry (a service of another mesh), resolved
    against the policy files when the mesh file was loaded."""

    name: str  # the sidecar's upstream name: cluster outbound|<name>, UPSTREAM_<NAME>
    host: str  # the ServiceEntry host, as the mesh file names it
    port: int  # the ServiceEntry port
    local_port: int
    address: str  # HOST:PORT the sidecar dials (the endpoint's)
    spiffe_id: SpiffeId  # the one identity the sidecar accepts there
    protocol: Protocol
    index: int  # its place in the service's ``upstreams`` list (for messages)
    entry: str = ""  # "ServiceEntry ns/name (file:line)", for messages
    # The entry's other endpoints, HOST:PORT, in its order: the sidecar balances over
    # ``address`` and these (all IPs or all DNS names, checked when the file is loaded).
    extra_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    namespace: str
    service_account: str
    labels: dict[str, str]
    protocol: Protocol
    port: int
    inbound_port: int | None
    command: tuple[str, ...] | None
    upstreams: tuple[UpstreamSpec, ...]
    env: dict[str, str]
    spiffe_id: SpiffeId
    host: str | None = None
    cert_ttl: dt.timedelta | None = None  # None: the mesh's certTTL
    rotation_ratio: float | None = None  # None: the agent's default (0.5)
    # Upstreams naming a ServiceEntry host; ``upstreams`` are the mesh file's own services.
    remote_upstreams: tuple[RemoteUpstreamSpec, ...] = ()

    @property
    def upstream_names(self) -> tuple[str, ...]:
        """Every upstream's name in the sidecar (local services, then remote ones)."""
        return tuple(u.service for u in self.upstreams) + tuple(
            u.name for u in self.remote_upstreams
        )


@dataclass(frozen=True)
class MeshConfig:
    path: Path
    trust_domain: TrustDomain
    cert_ttl: dt.timedelta
    work_dir: Path
    root_namespace: str
    ca_listen: str
    ca_dir: Path
    services: tuple[ServiceSpec, ...]
    policy_files: tuple[Path, ...]
    hosts: tuple[HostSpec, ...] = ()
    ca_host: str | None = None  # with hosts: the host the CA runs on
    min_tls_version: str = "TLSV1_2"
    dashboard_listen: str | None = None  # None: the dashboard's default port, or any free one
    # SPIFFE federation of the mesh's CA (docs/federation.md); None: none.
    federation: FederationConfig | None = None
    # Istio's trustDomainAliases: principals naming them are the mesh's own.
    trust_domain_aliases: tuple[TrustDomain, ...] = ()

    @property
    def ca_port(self) -> int:
        """The port of ``ca_listen`` (checked when the file was loaded)."""
        return parse_host_port(self.ca_listen, what="ca.listen")[1]

    @property
    def ca_address(self) -> str:
        """Where agents reach the CA: ``ca.listen`` on one host; with hosts, the CA host's
        address and the CA's port (``ca.listen`` may bind ``0.0.0.0``)."""
        if self.ca_host is None:
            return self.ca_listen
        return host_port(self.host(self.ca_host).address, self.ca_port)

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def services_on(self, host: str | None) -> tuple[ServiceSpec, ...]:
        """The services of ``host`` (every service when ``host`` is None)."""
        return tuple(s for s in self.services if host is None or s.host == host)

    def inbound_address(self, svc: ServiceSpec) -> str:
        """The address ``svc``'s sidecar listens on: loopback on one host; across hosts its
        host's address, or every address of the host (``0.0.0.0``) when that is a DNS name
        (the plan resolves nothing; Envoy binds only IP addresses)."""
        if svc.host is None:
            return "127.0.0.1"
        address = self.host(svc.host).address
        return address if _is_ip(address) else "0.0.0.0"

    def dial_address(self, svc: ServiceSpec) -> str:
        """Where the other sidecars reach ``svc``'s inbound listener (host only)."""
        return "127.0.0.1" if svc.host is None else self.host(svc.host).address

    def service(self, name: str) -> ServiceSpec:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)


def _mapping(value: object, field: str, allowed: set[str]) -> Mapping[str, object]:
    """``value`` as a mapping whose keys are all in ``allowed``; null is an empty mapping."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {describe(value)}", field=field)
    for key in value:
        if key not in allowed:
            raise ConfigError(
                f"unknown key (known keys: {', '.join(sorted(allowed))})",
                field=f"{field}.{key}" if field else str(key),
            )
    return value


def _list(value: object, field: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"expected a list, got {describe(value)}", field=field)
    return value


def _work_dir(raw: Mapping[str, object], path: Path) -> Path:
    return check_path(
        raw.get("workDir", ".meshtrust/" + path.stem), "workDir", path.parent.resolve()
    )


def mesh_work_dir(path: Path) -> Path:
    """Only the ``workDir`` of ``path``: what ``status``/``down`` need to find a running mesh,
    even after its policy file was edited into something invalid."""
    raw = load_yaml_mapping(path)
    try:
        return _work_dir(raw, path)
    except ConfigError as exc:
        raise exc.located(path, line_for(raw, exc.field)) from None


def load_mesh_config(path: Path) -> MeshConfig:
    """Read and check ``path``; raises ConfigError/PolicyError naming file, line and field."""
    raw = load_yaml_mapping(path)
    try:
        return _mesh(raw, path)
    except ConfigError as exc:  # a PolicyError keeps its own file and line
        raise exc.located(path, line_for(raw, exc.field)) from None


def _mesh(doc: LineMap, path: Path) -> MeshConfig:
    raw = _mapping(doc, "", _TOP)
    base = path.parent.resolve()
    td = check_trust_domain(raw.get("trustDomain", "cluster.local"), "trustDomain")
    ttl = check_duration(raw.get("certTTL", "24h"), "certTTL")
    if ttl < dt.timedelta(seconds=10):
        raise ConfigError("must be at least 10s", field="certTTL")
    work_dir = check_directory_location(_work_dir(raw, path), "workDir")
    root_ns = check_dns_label(raw.get("rootNamespace", "istio-system"), "rootNamespace")
    hosts = _hosts(raw.get("hosts"))
    ca_raw = _mapping(raw.get("ca"), "ca", _CA)
    ca_host = _ca_host(ca_raw, hosts)
    default_listen = (
        f"127.0.0.1:{CA_PORT}"
        if ca_host is None
        else host_port(next(h.address for h in hosts if h.name == ca_host), CA_PORT)
    )
    ca_listen = check_host_port(ca_raw.get("listen", default_listen), "ca.listen")
    _, ca_port = parse_host_port(ca_listen, what="ca.listen")
    # Across hosts each host's files are under <workDir>/<host>/, the CA's too.
    default_ca_dir = work_dir / "ca" if ca_host is None else work_dir / ca_host / "ca"
    ca_dir = check_path(ca_raw["dir"], "ca.dir", base) if "dir" in ca_raw else default_ca_dir
    check_directory_location(ca_dir, "ca.dir")

    policies_raw = _list(raw.get("policies"), "policies")
    policy_files = tuple(check_path(p, f"policies[{i}]", base) for i, p in enumerate(policies_raw))
    for i, p in enumerate(policy_files):
        if not p.is_file():
            raise ConfigError(f"policy file {p} does not exist", field=f"policies[{i}]")
    # A bad policy refuses the mesh before start; ServiceEntries resolve remote upstreams.
    policies = load_policy_files(list(policy_files))
    aliases = _aliases(raw.get("trustDomainAliases"), td)

    services_raw = _list(raw.get("services"), "services")
    if not services_raw:
        raise ConfigError("expected a non-empty list of services", field="services")
    services = [
        _service(item, f"services[{i}]", td, policies) for i, item in enumerate(services_raw)
    ]
    _check_services(services)
    _check_placement(services, hosts)
    for host in [None] if not hosts else [h.name for h in hosts]:
        _check_ports(services, ca_port if host == ca_host else None, host)
    min_tls = _min_tls(raw.get("meshMTLS"))
    dashboard = _dashboard_listen(_mapping(raw.get("dashboard"), "dashboard", _DASHBOARD))
    federation = (
        check_federation(raw["federation"], "federation", base)
        if raw.get("federation") is not None
        else None
    )
    return MeshConfig(
        path=path.resolve(),
        trust_domain=td,
        cert_ttl=ttl,
        work_dir=work_dir,
        root_namespace=root_ns,
        ca_listen=ca_listen,
        ca_dir=ca_dir,
        services=tuple(services),
        policy_files=policy_files,
        hosts=hosts,
        ca_host=ca_host,
        min_tls_version=min_tls,
        dashboard_listen=dashboard,
        federation=federation,
        trust_domain_aliases=aliases,
    )


def _aliases(value: object, own: TrustDomain) -> tuple[TrustDomain, ...]:
    """``trustDomainAliases``: trust domains, none the mesh's own, none twice."""
    out: list[TrustDomain] = []
    for i, item in enumerate(_list(value, "trustDomainAliases")):
        field = f"trustDomainAliases[{i}]"
        alias = check_trust_domain(item, field)
        if alias == own:
            raise ConfigError(
                f"{alias} is the mesh's own trust domain (trustDomain), not an alias", field=field
            )
        if alias in out:
            raise ConfigError(f"{alias} is listed twice", field=field)
        out.append(alias)
    return tuple(out)


def _dashboard_listen(raw: Mapping[str, object]) -> str | None:
    return None if "listen" not in raw else check_loopback_listen(raw["listen"], "dashboard.listen")


def check_loopback_listen(value: object, field: str) -> str:
    """A ``HOST:PORT`` on loopback (127.0.0.0/8, ``::1``, ``localhost``): the dashboard has
    no authentication, so it never listens where another machine can reach it."""
    listen = check_host_port(value, field)
    host = parse_host_port(listen, what=field)[0]
    if host != "localhost" and not (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
        raise ConfigError(
            f"{host} is not a loopback address (the dashboard has no authentication: "
            "it binds 127.0.0.1, ::1 or localhost only)",
            field=field,
        )
    return listen


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host_address(value: object, field: str) -> str:
    """An IP address or a DNS name (what a sidecar dials and binds)."""
    text = check_string(value, field)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        return check_dns_subdomain(text, field)
    except ConfigError:
        raise ConfigError(
            f"expected an IP address or a DNS name, got {describe(value)}", field=field
        ) from None


def _hosts(value: object) -> tuple[HostSpec, ...]:
    out: list[HostSpec] = []
    names: dict[str, str] = {}
    addresses: dict[str, str] = {}
    for i, item in enumerate(_list(value, "hosts")):
        field = f"hosts[{i}]"
        raw = _mapping(item, field, _HOST)
        for key in ("name", "address"):
            if key not in raw:
                raise ConfigError(f"missing required key {key!r}", field=field)
        name = check_dns_label(raw["name"], f"{field}.name")
        address = _host_address(raw["address"], f"{field}.address")
        if name in names:
            raise ConfigError(
                f"duplicate host {name!r} (also {names[name]})", field=f"{field}.name"
            )
        if address in addresses:
            raise ConfigError(
                f"address {address} is also {addresses[address]}'s", field=f"{field}.address"
            )
        names[name] = field
        addresses[address] = name
        out.append(HostSpec(name=name, address=address))
    if value is not None and not out:
        raise ConfigError("expected a non-empty list of hosts (or no hosts key)", field="hosts")
    return tuple(out)


def _ca_host(ca_raw: Mapping[str, object], hosts: tuple[HostSpec, ...]) -> str | None:
    if not hosts:
        if "host" in ca_raw:
            raise ConfigError("ca.host needs a hosts list", field="ca.host")
        return None
    if "host" not in ca_raw:
        raise ConfigError("missing required key 'host' (the mesh has hosts)", field="ca")
    name = check_dns_label(ca_raw["host"], "ca.host")
    if name not in {h.name for h in hosts}:
        raise ConfigError(f"no host {name!r} in hosts", field="ca.host")
    return name


def _check_placement(services: list[ServiceSpec], hosts: tuple[HostSpec, ...]) -> None:
    known = {h.name for h in hosts}
    for i, svc in enumerate(services):
        field = f"services[{i}]"
        if not hosts:
            if svc.host is not None:
                raise ConfigError("a service host needs a hosts list", field=f"{field}.host")
            continue
        if svc.host is None:
            raise ConfigError("missing required key 'host' (the mesh has hosts)", field=field)
        if svc.host not in known:
            raise ConfigError(
                f"no host {svc.host!r} in hosts (hosts: {', '.join(sorted(known))})",
                field=f"{field}.host",
            )
        if svc.inbound_port is None:
            # Each host plans alone from the mesh file: a port picked on h2 is unknown to h3.
            raise ConfigError(
                "missing required key 'inboundPort' (the mesh has hosts: the other hosts dial it)",
                field=field,
            )


def _min_tls(value: object) -> str:
    raw = _mapping(value, "meshMTLS", _MESH_MTLS)
    version = raw.get("minProtocolVersion", "TLSV1_2")
    if version not in TLS_VERSIONS:
        raise ConfigError(
            f"expected {' or '.join(TLS_VERSIONS)}, got {describe(version)}",
            field="meshMTLS.minProtocolVersion",
        )
    return str(version)


def _check_services(services: list[ServiceSpec]) -> None:
    names: dict[str, str] = {}
    for i, svc in enumerate(services):
        if svc.name in names:
            raise ConfigError(
                f"duplicate service {svc.name!r} (also {names[svc.name]})",
                field=f"services[{i}].name",
            )
        names[svc.name] = f"services[{i}]"
    for i, svc in enumerate(services):
        for j, up in enumerate(svc.upstreams):
            field = f"services[{i}].upstreams[{j}].service"
            if up.service not in names:
                raise ConfigError(f"no service {up.service!r} in this file", field=field)
            if up.service == svc.name:
                raise ConfigError("a service cannot be its own upstream", field=field)
        seen: dict[str, str] = {}
        for up in svc.upstreams:
            seen.setdefault(up.service, up.service)
        for remote in svc.remote_upstreams:
            field = f"services[{i}].upstreams[{remote.index}]"
            if remote.name in seen:
                raise ConfigError(
                    f"upstream name {remote.name!r} is also the upstream {seen[remote.name]!r}"
                    " (give this one another name)",
                    field=f"{field}.name",
                )
            seen[remote.name] = remote.host


def _check_ports(services: list[ServiceSpec], ca_port: int | None, host: str | None) -> None:
    """Two things on one port of one host (the CA's port counts on the CA's host)."""
    ports: dict[int, str] = {} if ca_port is None else {ca_port: "ca.listen"}
    for i, svc in enumerate(services):
        if host is not None and svc.host != host:
            continue
        claims = [(svc.port, f"services[{i}].port")]
        if svc.inbound_port is not None:
            claims.append((svc.inbound_port, f"services[{i}].inboundPort"))
        claims += [
            (u.local_port, f"services[{i}].upstreams[{j}].localPort")
            for j, u in enumerate(svc.upstreams)
        ]
        claims += [
            (u.local_port, f"services[{i}].upstreams[{u.index}].localPort")
            for u in svc.remote_upstreams
        ]
        for port, field in claims:
            if port in ports:
                raise ConfigError(f"port {port} is already used by {ports[port]}", field=field)
            ports[port] = field


def _protocol(value: object, field: str) -> Protocol:
    for protocol in Protocol:
        if value == protocol.value:
            return protocol
    raise ConfigError(f"expected http or tcp, got {describe(value)}", field=field)


def _env_items(value: object, field: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {describe(value)}", field=field)
    out = []
    for key, item in value.items():
        name = check_string(str(key), field)
        if "=" in name:
            raise ConfigError(f"variable name {describe(name)} must not contain '='", field=field)
        if isinstance(item, list | dict) or item is None:
            raise ConfigError(f"expected a string, got {describe(item)}", field=f"{field}.{name}")
        # Numbers and booleans as YAML wrote them (str(True) would be "True").
        text = str(item).lower() if isinstance(item, bool) else str(item)
        out.append((name, check_string(text, f"{field}.{name}", empty=True)))
    return out


def _cert_settings(
    raw: Mapping[str, object], field: str
) -> tuple[dt.timedelta | None, float | None]:
    """A service's own ``certTTL`` and ``rotationRatio`` (None: the mesh's / the agent's)."""
    ttl = None
    if "certTTL" in raw:
        ttl = check_duration(raw["certTTL"], f"{field}.certTTL")
        if ttl < dt.timedelta(seconds=10):
            raise ConfigError("must be at least 10s", field=f"{field}.certTTL")
    ratio = None
    if "rotationRatio" in raw:
        ratio = check_float(raw["rotationRatio"], f"{field}.rotationRatio")
        try:  # the agent's own check, with its default jitter
            check_rotation(ratio, 0.01)
        except ValueError:
            raise ConfigError(
                f"expected a number between 0.02 and 0.98, got {describe(raw['rotationRatio'])}",
                field=f"{field}.rotationRatio",
            ) from None
    return ttl, ratio


def _upstreams(
    value: object, field: str, td: TrustDomain, policies: PolicySet
) -> tuple[list[UpstreamSpec], list[RemoteUpstreamSpec]]:
    """A service's ``upstreams``: services of this file, and ServiceEntry hosts (resolved)."""
    local: list[UpstreamSpec] = []
    remote: list[RemoteUpstreamSpec] = []
    for j, up in enumerate(_list(value, field)):
        uk = f"{field}[{j}]"
        u = _mapping(up, uk, _UPSTREAM)
        if "localPort" not in u:
            raise ConfigError("missing required key 'localPort'", field=uk)
        local_port = check_port(u["localPort"], f"{uk}.localPort")
        if "service" in u and "host" in u:
            raise ConfigError(
                "give either service (a service of this file) or host (a ServiceEntry host), "
                "not both",
                field=f"{uk}.host",
            )
        if "host" in u:
            remote.append(_remote_upstream(u, uk, j, local_port, td, policies))
            continue
        if "service" not in u:
            raise ConfigError(
                "missing required key 'service' (or 'host', for a ServiceEntry host)", field=uk
            )
        for key in ("port", "name"):
            if key in u:
                raise ConfigError(
                    f"{key} is for an upstream naming a ServiceEntry host (host:), "
                    "not a service of this file",
                    field=f"{uk}.{key}",
                )
        local.append(
            UpstreamSpec(
                service=check_dns_label(u["service"], f"{uk}.service"), local_port=local_port
            )
        )
    return local, remote


def _remote_upstream(
    u: Mapping[str, object],
    uk: str,
    index: int,
    local_port: int,
    td: TrustDomain,
    policies: PolicySet,
) -> RemoteUpstreamSpec:
    """An upstream naming a ServiceEntry host, resolved: where to dial, whom to accept."""
    host = check_dns_subdomain(u["host"], f"{uk}.host")
    if "port" not in u:
        raise ConfigError("missing required key 'port' (the ServiceEntry port)", field=uk)
    port = check_port(u["port"], f"{uk}.port")
    if "name" in u:
        name = check_dns_label(u["name"], f"{uk}.name")
    else:
        name = host.replace(".", "-")
        try:
            check_dns_label(name, f"{uk}.host")
        except ConfigError:
            raise ConfigError(
                f"{host} does not make an upstream name ({name!r} is not a DNS label of at "
                "most 63 characters): give the upstream a name",
                field=f"{uk}.host",
            ) from None
    try:
        resolved = policies.remote_service(host, port, td)
    except UnknownHost as exc:
        field = f"{uk}.port" if "no port" in str(exc) else f"{uk}.host"
        raise ConfigError(f"{exc} (in the policy files)", field=field) from None
    except InvalidSpiffeId as exc:
        raise ConfigError(f"{host}: {exc}", field=f"{uk}.host") from None
    return _remote_spec(resolved, uk, name=name, local_port=local_port, index=index)


def _remote_spec(
    resolved: RemoteService, uk: str, *, name: str, local_port: int, index: int
) -> RemoteUpstreamSpec:
    entry = resolved.entry
    where = entry.obj + (
        f" ({entry.file}" + (f":{entry.line}" if entry.line else "") + ")" if entry.file else ""
    )
    if len(resolved.expected) != 1:
        names = ", ".join(str(i) for i in resolved.expected)
        raise ConfigError(
            f"{resolved.host} expects {len(resolved.expected)} identities ({names}); the "
            "sidecar accepts one identity per upstream: name one in subjectAltNames",
            field=f"{uk}.host",
        )
    if resolved.sni is not None:
        raise ConfigError(
            f"the DestinationRule for {resolved.host} sets tls.sni ({resolved.sni}), which "
            "meshtrust's sidecars do not send yet: remove it",
            field=f"{uk}.host",
        )
    port = next(p for p in entry.ports if p.number == resolved.port)
    first, *others = (host_port(address, target) for address, target in resolved.addresses)
    spec = RemoteUpstreamSpec(
        name=name,
        host=resolved.host,
        port=resolved.port,
        local_port=local_port,
        address=first,
        spiffe_id=resolved.expected[0],
        protocol=_SE_PROTOCOL.get(port.protocol, Protocol.TCP),
        index=index,
        entry=where,
        extra_addresses=tuple(others),
    )
    try:  # what the sidecar will check of the endpoints, checked now, at the upstream's line
        Upstream(
            name=spec.name,
            local_port=spec.local_port,
            address=spec.address,
            spiffe_id=spec.spiffe_id,
            protocol=spec.protocol,
            extra_addresses=spec.extra_addresses,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}'s endpoints: {exc.problem}", field=f"{uk}.host") from None
    return spec


def _service(item: object, field: str, td: TrustDomain, policies: PolicySet) -> ServiceSpec:
    raw = _mapping(item, field, _SERVICE)
    if "name" not in raw:
        raise ConfigError("missing required key 'name'", field=field)
    # Names become the sidecar's name, file and socket names and the `app` label: the same
    # check the sidecar config applies, so mesh.yaml cannot plan a sidecar the agent refuses.
    name = check_dns_label(raw["name"], f"{field}.name")
    namespace = check_dns_label(raw.get("namespace", "default"), f"{field}.namespace")
    sa = check_dns_label(raw.get("serviceAccount", name), f"{field}.serviceAccount")
    try:
        spiffe_id = SpiffeId.for_workload(td, namespace, sa)
    except InvalidSpiffeId as exc:
        raise ConfigError(str(exc), field=field) from exc
    labels = check_labels(raw.get("labels"), f"{field}.labels")
    if labels.setdefault("app", name) != name:
        raise ConfigError(
            f"app is {labels['app']!r} but the service is {name!r} "
            "(the app label is always the service's name)",
            field=f"{field}.labels.app",
        )
    if "port" not in raw:
        raise ConfigError("missing required key 'port'", field=field)
    port = check_port(raw["port"], f"{field}.port")
    inbound = (
        check_port(raw["inboundPort"], f"{field}.inboundPort") if "inboundPort" in raw else None
    )
    command = check_string_list(raw["command"], f"{field}.command") if "command" in raw else None
    upstreams, remote = _upstreams(raw.get("upstreams"), f"{field}.upstreams", td, policies)
    ttl, ratio = _cert_settings(raw, field)
    host = check_dns_label(raw["host"], f"{field}.host") if "host" in raw else None
    return ServiceSpec(
        host=host,
        cert_ttl=ttl,
        rotation_ratio=ratio,
        name=name,
        namespace=namespace,
        service_account=sa,
        labels=labels,
        protocol=_protocol(raw.get("protocol", "http"), f"{field}.protocol"),
        port=port,
        inbound_port=inbound,
        command=command,
        upstreams=tuple(upstreams),
        remote_upstreams=tuple(remote),
        env=dict(_env_items(raw.get("env"), f"{field}.env")),
        spiffe_id=spiffe_id,
    )
