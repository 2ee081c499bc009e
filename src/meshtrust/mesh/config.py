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

Every problem is a :class:`ConfigError` (or :class:`PolicyError`) naming the file and the
key: broken YAML (with its line), an unknown key, a duplicate service, an upstream to a
service that is not in the file, two things on one port, a bad policy.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshtrust.ca.config import parse_host_port
from meshtrust.durations import parse_duration
from meshtrust.errors import ConfigError, InvalidDuration, InvalidSpiffeId
from meshtrust.policy import Protocol, load_policy_files
from meshtrust.settings import read_yaml_mapping
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

    def service(self, name: str) -> ServiceSpec:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)


class _Where:
    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"mesh file {self.path}, {key}: {problem}")

    def mapping(self, value: object, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, "expected a mapping")
        for k in value:
            if k not in allowed:
                raise self.error(
                    f"{key}.{k}" if key else str(k),
                    f"unknown key (known keys: {', '.join(sorted(allowed))})",
                )
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, "expected a non-empty string")
        return value

    def port(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.error(key, f"expected a port number 1-65535, got {value!r}")
        return value


def mesh_work_dir(path: Path) -> Path:
    """Only the ``workDir`` of ``path``: what ``status``/``down`` need to find a running mesh,
    even after its policy file was edited into something invalid."""
    raw = read_yaml_mapping(path, what="mesh file")
    value = raw.get("workDir", ".meshtrust/" + path.stem)
    if not isinstance(value, str) or not value:
        raise _Where(path).error("workDir", "expected a non-empty string")
    work = Path(value)
    return work if work.is_absolute() else path.parent.resolve() / work


def load_mesh_config(path: Path) -> MeshConfig:
    """Read and check ``path``; raises ConfigError/PolicyError naming the problem."""
    w = _Where(path)
    raw = w.mapping(read_yaml_mapping(path, what="mesh file"), "", _TOP)
    base = path.parent.resolve()

    def rel(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base / q

    try:
        td = TrustDomain.parse(str(raw.get("trustDomain", "cluster.local")))
    except InvalidSpiffeId as exc:
        raise w.error("trustDomain", str(exc)) from exc
    try:
        ttl = parse_duration(raw.get("certTTL", "24h"), what="certTTL")
    except InvalidDuration as exc:
        raise w.error("certTTL", str(exc)) from exc
    if ttl < dt.timedelta(seconds=10):
        raise w.error("certTTL", "must be at least 10s")
    work_dir = mesh_work_dir(path)
    root_ns = w.string(raw.get("rootNamespace", "istio-system"), "rootNamespace")
    ca_raw = w.mapping(raw.get("ca", {}) or {}, "ca", _CA)
    ca_listen = w.string(ca_raw.get("listen", "127.0.0.1:15012"), "ca.listen")
    try:
        _, ca_port = parse_host_port(ca_listen, what=f"mesh file {path}, ca.listen")
    except ConfigError as exc:
        raise w.error("ca.listen", str(exc)) from exc
    ca_dir = rel(w.string(ca_raw["dir"], "ca.dir")) if "dir" in ca_raw else work_dir / "ca"

    services_raw = raw.get("services")
    if not isinstance(services_raw, list) or not services_raw:
        raise w.error("services", "expected a non-empty list of services")
    services = [_service(w, item, f"services[{i}]", td, rel) for i, item in enumerate(services_raw)]

    names: dict[str, str] = {}
    for i, svc in enumerate(services):
        if svc.name in names:
            raise w.error(
                f"services[{i}].name", f"duplicate service {svc.name!r} (also {names[svc.name]})"
            )
        names[svc.name] = f"services[{i}]"
    for i, svc in enumerate(services):
        for j, up in enumerate(svc.upstreams):
            if up.service not in names:
                raise w.error(
                    f"services[{i}].upstreams[{j}].service",
                    f"no service {up.service!r} in this file",
                )
            if up.service == svc.name:
                raise w.error(
                    f"services[{i}].upstreams[{j}].service", "a service cannot be its own upstream"
                )

    ports: dict[int, str] = {ca_port: "ca.listen"}
    for i, svc in enumerate(services):
        claims = [(svc.port, f"services[{i}].port")]
        if svc.inbound_port is not None:
            claims.append((svc.inbound_port, f"services[{i}].inboundPort"))
        claims += [
            (u.local_port, f"services[{i}].upstreams[{j}].localPort")
            for j, u in enumerate(svc.upstreams)
        ]
        for port, key in claims:
            if port in ports:
                raise w.error(key, f"port {port} is already used by {ports[port]}")
            ports[port] = key

    policies_raw = raw.get("policies", [])
    if not isinstance(policies_raw, list) or not all(isinstance(p, str) for p in policies_raw):
        raise w.error("policies", "expected a list of file names")
    policy_files = tuple(rel(p) for p in policies_raw)
    for i, p in enumerate(policy_files):
        if not p.is_file():
            raise w.error(f"policies[{i}]", f"policy file {p} does not exist")
    load_policy_files(list(policy_files))  # a bad policy refuses the mesh before it starts

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


def _service(w: _Where, item: object, key: str, td: TrustDomain, rel: Any) -> ServiceSpec:
    raw = w.mapping(item, key, _SERVICE)
    name = w.string(raw.get("name"), f"{key}.name")
    namespace = w.string(raw.get("namespace", "default"), f"{key}.namespace")
    sa = w.string(raw.get("serviceAccount", name), f"{key}.serviceAccount")
    try:
        spiffe_id = SpiffeId.for_workload(td, namespace, sa)
    except InvalidSpiffeId as exc:
        raise w.error(key, str(exc)) from exc
    labels_raw = raw.get("labels", {}) or {}
    if not isinstance(labels_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels_raw.items()
    ):
        raise w.error(f"{key}.labels", "expected a mapping of strings to strings")
    labels = {**labels_raw, "app": name}
    try:
        protocol = Protocol(str(raw.get("protocol", "http")))
    except ValueError:
        raise w.error(f"{key}.protocol", "expected http or tcp") from None
    port = w.port(raw.get("port"), f"{key}.port")
    inbound = w.port(raw["inboundPort"], f"{key}.inboundPort") if "inboundPort" in raw else None
    command: tuple[str, ...] | None = None
    if "command" in raw:
        cmd = raw["command"]
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
            raise w.error(f"{key}.command", "expected a non-empty list of strings")
        command = tuple(cmd)
    env_raw = raw.get("env", {}) or {}
    if not isinstance(env_raw, dict):
        raise w.error(f"{key}.env", "expected a mapping")
    env = {str(k): str(v) for k, v in env_raw.items()}
    ups_raw = raw.get("upstreams", []) or []
    if not isinstance(ups_raw, list):
        raise w.error(f"{key}.upstreams", "expected a list")
    upstreams = []
    for j, up in enumerate(ups_raw):
        uk = f"{key}.upstreams[{j}]"
        u = w.mapping(up, uk, _UPSTREAM)
        upstreams.append(
            UpstreamSpec(
                service=w.string(u.get("service"), f"{uk}.service"),
                local_port=w.port(u.get("localPort"), f"{uk}.localPort"),
            )
        )
    return ServiceSpec(
        name=name,
        namespace=namespace,
        service_account=sa,
        labels=labels,
        protocol=protocol,
        port=port,
        inbound_port=inbound,
        command=command,
        upstreams=tuple(upstreams),
        env=env,
        spiffe_id=spiffe_id,
    )
