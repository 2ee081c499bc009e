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
    policies: [policies.yaml]         # Istio YAML: PeerAuthentication, AuthorizationPolicy

Every problem is a :class:`ConfigError` (or :class:`PolicyError`) naming the file, the line
and the field path (``mesh.yaml:14: services[1].upstreams[0].localPort: expected a port
1-65535, got 'x'``): broken YAML, a duplicate key, an unknown key, a name the sidecar would
refuse (names are DNS labels, checked by the same validators the sidecar config and the agent
use), a duplicate service, an upstream to a service that is not in the file, two things on one
port, a ``workDir`` or ``ca.dir`` that cannot be a directory, a bad policy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshtrust.config import (
    ConfigError,
    LineMap,
    check_directory_location,
    check_dns_label,
    check_duration,
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
from meshtrust.errors import InvalidSpiffeId
from meshtrust.policy import Protocol, load_policy_files
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = ["MeshConfig", "ServiceSpec", "UpstreamSpec", "load_mesh_config", "mesh_work_dir"]

_TOP = {"trustDomain", "certTTL", "workDir", "rootNamespace", "ca", "services", "policies"}
_CA = {"listen", "dir"}
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
}
_UPSTREAM = {"service", "localPort"}


@dataclass(frozen=True)
class UpstreamSpec:
    service: str
    local_port: int


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

    @property
    def ca_port(self) -> int:
        """The port of ``ca_listen`` (checked when the file was loaded)."""
        return parse_host_port(self.ca_listen, what="ca.listen")[1]

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
        config = _mesh(raw, path)
    except ConfigError as exc:
        raise exc.located(path, line_for(raw, exc.field)) from None
    load_policy_files(list(config.policy_files))  # a bad policy refuses the mesh before start
    return config


def _mesh(doc: LineMap, path: Path) -> MeshConfig:
    raw = _mapping(doc, "", _TOP)
    base = path.parent.resolve()
    td = check_trust_domain(raw.get("trustDomain", "cluster.local"), "trustDomain")
    ttl = check_duration(raw.get("certTTL", "24h"), "certTTL")
    if ttl < dt.timedelta(seconds=10):
        raise ConfigError("must be at least 10s", field="certTTL")
    work_dir = check_directory_location(_work_dir(raw, path), "workDir")
    root_ns = check_dns_label(raw.get("rootNamespace", "istio-system"), "rootNamespace")
    ca_raw = _mapping(raw.get("ca"), "ca", _CA)
    ca_listen = check_host_port(ca_raw.get("listen", "127.0.0.1:15012"), "ca.listen")
    _, ca_port = parse_host_port(ca_listen, what="ca.listen")
    ca_dir = check_path(ca_raw["dir"], "ca.dir", base) if "dir" in ca_raw else work_dir / "ca"
    check_directory_location(ca_dir, "ca.dir")

    services_raw = _list(raw.get("services"), "services")
    if not services_raw:
        raise ConfigError("expected a non-empty list of services", field="services")
    services = [_service(item, f"services[{i}]", td) for i, item in enumerate(services_raw)]
    _check_services(services)
    _check_ports(services, ca_port)

    policies_raw = _list(raw.get("policies"), "policies")
    policy_files = tuple(check_path(p, f"policies[{i}]", base) for i, p in enumerate(policies_raw))
    for i, p in enumerate(policy_files):
        if not p.is_file():
            raise ConfigError(f"policy file {p} does not exist", field=f"policies[{i}]")
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
    )


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


def _check_ports(services: list[ServiceSpec], ca_port: int) -> None:
    ports: dict[int, str] = {ca_port: "ca.listen"}
    for i, svc in enumerate(services):
        claims = [(svc.port, f"services[{i}].port")]
        if svc.inbound_port is not None:
            claims.append((svc.inbound_port, f"services[{i}].inboundPort"))
        claims += [
            (u.local_port, f"services[{i}].upstreams[{j}].localPort")
            for j, u in enumerate(svc.upstreams)
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


def _service(item: object, field: str, td: TrustDomain) -> ServiceSpec:
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
    upstreams = []
    ups_raw = _list(raw.get("upstreams"), f"{field}.upstreams")
    for j, up in enumerate(ups_raw):
        uk = f"{field}.upstreams[{j}]"
        u = _mapping(up, uk, _UPSTREAM)
        for key in ("service", "localPort"):
            if key not in u:
                raise ConfigError(f"missing required key {key!r}", field=uk)
        upstreams.append(
            UpstreamSpec(
                service=check_dns_label(u["service"], f"{uk}.service"),
                local_port=check_port(u["localPort"], f"{uk}.localPort"),
            )
        )
    return ServiceSpec(
        name=name,
        namespace=namespace,
        service_account=sa,
        labels=labels,
        protocol=_protocol(raw.get("protocol", "http"), f"{field}.protocol"),
        port=port,
        inbound_port=inbound,
        command=command,
        upstreams=tuple(upstreams),
        env=dict(_env_items(raw.get("env"), f"{field}.env")),
        spiffe_id=spiffe_id,
    )
