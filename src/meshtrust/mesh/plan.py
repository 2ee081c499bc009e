"""What ``meshtrust up`` will do, decided before it does anything: a :class:`MeshPlan`.

Theory of operation. :func:`plan_mesh` turns a validated :class:`MeshConfig` into a complete,
inspectable plan — every process (the CA, each agent, each app) with its argv, environment,
working directory and log file; every port (the fixed ones from the mesh file and the ones
picked here); every path (sockets, certificate and Envoy directories, tokens); the contents
of every file meshtrust writes for its processes (each agent's ``--config`` YAML and its
sidecar YAML); and the order of starts and waits. It reads no file, opens no socket and
looks at no clock: free ports come from the ``pick_port`` argument, the environment apps
inherit from ``environ``. :mod:`meshtrust.mesh.launch` carries the plan out.

A mesh whose plan cannot work is refused here, before anything starts: today that is a Unix
socket path longer than the kernel's ``sun_path`` (108 bytes with its NUL), which the agent
(SDS, Workload API) or its Envoy (the admin API's socket, in the workload's Envoy
directory) could not bind; and a mesh with ``hosts`` planned without ``host``.

Across hosts (``plan_mesh(config, ..., host="h2")``) the plan is one host's share, as if the
host had its own disk: its files under ``<workDir>/<host>/``, the CA only on ``ca.host``,
only the services placed on the host. Sidecar inbound listeners bind the host's address and
upstreams are dialled at ``<their host's address>:<inboundPort>``; apps, Envoy's admin
socket, agent status and outbound listeners stay on the host's loopback. On the CA's host the
launcher mints each agent's first credential from the CA directory (``credentials ==
"mint"``); on the others they come from a join file (``"join"``) or were put in place by
hand: a token per service and the trust bundle (``"provisioned"``).

An upstream naming a ServiceEntry host (a service of another mesh) was resolved when the
mesh file was loaded (:class:`~meshtrust.mesh.config.RemoteUpstreamSpec`): its sidecar
upstream dials the entry's endpoints (``address``, then ``extra_addresses``: Envoy balances
over them) and accepts there only the identity the DestinationRule's ``subjectAltNames``
(else the entry's service account) names. The mesh's ``trustDomainAliases`` go to every
agent (``trust-domain-aliases``), which compiles its sidecar's policies with them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from meshtrust.config.federation import federation_settings
from meshtrust.envoy.admin import ADMIN_SOCKET
from meshtrust.errors import ConfigError
from meshtrust.mesh.config import MeshConfig, RemoteUpstreamSpec, ServiceSpec, host_port
from meshtrust.mesh.state import CaState, MeshState, ServiceState

__all__ = [
    "SUN_PATH_MAX",
    "HttpOk",
    "MeshPlan",
    "PathExists",
    "PlannedFile",
    "ProcessPlan",
    "ServicePlan",
    "Start",
    "Step",
    "Wait",
    "mesh_state",
    "plan_mesh",
]

#: ``sizeof(sockaddr_un.sun_path)`` on Linux: a socket path has at most 107 bytes plus NUL.
SUN_PATH_MAX = 108

#: How long ``up`` waits for each thing to come up before it gives up and stops everything.
CA_READY_TIMEOUT = 30.0
SOCKET_TIMEOUT = 30.0
SIDECAR_READY_TIMEOUT = 60.0

#: The largest TTL the mesh's CA accepts (its default, unless certTTL is longer).
MAX_TTL_SECONDS = 90 * 86400


@dataclass(frozen=True)
class ProcessPlan:
    """One process of the mesh, as it will be started."""

    key: str  # stable name: "ca", "<service>-agent", "<service>-app"
    what: str  # for messages: "the CA", "the agent of web"
    argv: tuple[str, ...]
    log: Path
    cwd: Path | None = None
    env: Mapping[str, str] | None = None  # None: inherit meshtrust's environment


@dataclass(frozen=True)
class PlannedFile:
    path: Path
    content: str
    private: bool = False  # written 0600


@dataclass(frozen=True)
class HttpOk:
    """Ready when a GET of ``url`` answers 200."""

    url: str


@dataclass(frozen=True)
class PathExists:
    """Ready when ``path`` exists (a socket the agent binds)."""

    path: Path


@dataclass(frozen=True)
class Start:
    process: str  # a ProcessPlan.key
    announce: str  # what `up` prints as it starts it


@dataclass(frozen=True)
class Wait:
    what: str
    until: HttpOk | PathExists
    timeout: float
    log_of: str  # the ProcessPlan.key whose log explains a failure


Step = Start | Wait


@dataclass(frozen=True)
class ServicePlan:
    spec: ServiceSpec
    dir: Path
    inbound_port: int
    status_listen: str  # the agent's /healthz/ready, /metrics, /debug/status
    sds_socket: Path
    workload_socket: Path
    cert_dir: Path
    envoy_workdir: Path
    token_file: Path  # minted by the launcher with the CA's token key (a secret, not planned)
    agent_config: PlannedFile  # the agent's --config
    sidecar_config: PlannedFile  # the agent's `sidecar:` file
    agent: ProcessPlan
    app: ProcessPlan | None

    @property
    def sockets(self) -> tuple[Path, ...]:
        """Every Unix socket the agent binds."""
        return (self.sds_socket, self.workload_socket)

    @property
    def admin_socket(self) -> Path:
        """The Unix socket of Envoy's admin API (0600, Envoy binds it), in the workload's
        Envoy directory: no TCP admin port."""
        return self.envoy_workdir / ADMIN_SOCKET


@dataclass(frozen=True)
class MeshPlan:
    config: MeshConfig
    logs_dir: Path
    fixed_ports: Mapping[int, str]  # port -> what claims it (checked free before start)
    ca_metrics: str | None  # HOST:PORT of the CA's /metrics and /ready (None: not here)
    ca: ProcessPlan | None  # None on a host other than ca.host
    services: tuple[ServicePlan, ...]
    steps: tuple[Step, ...]
    dirs: tuple[Path, ...] = field(default=())  # made before anything starts
    host: str | None = None  # the host this plan is for (None: a mesh without hosts)
    root_cert: Path | None = None  # the trust bundle the agents verify the CA with
    credentials: str = "mint"  # "mint" (from the CA dir) | "join" | "provisioned"
    join_file: Path | None = None
    ca_config: PlannedFile | None = None  # ca serve --config (the mesh's federation)

    @property
    def work_dir(self) -> Path:
        """This host's runtime files: ``<workDir>`` or ``<workDir>/<host>``."""
        return host_dir(self.config, self.host)

    @property
    def address(self) -> str:
        """The address inbound listeners bind (127.0.0.1 without hosts)."""
        return "127.0.0.1" if self.host is None else self.config.host(self.host).address

    @property
    def files(self) -> tuple[PlannedFile, ...]:
        ca = () if self.ca_config is None else (self.ca_config,)
        return ca + tuple(f for s in self.services for f in (s.sidecar_config, s.agent_config))

    def processes(self) -> dict[str, ProcessPlan]:
        out = {} if self.ca is None else {self.ca.key: self.ca}
        for svc in self.services:
            out[svc.agent.key] = svc.agent
            if svc.app is not None:
                out[svc.app.key] = svc.app
        return out

    def service(self, name: str) -> ServicePlan:
        for svc in self.services:
            if svc.spec.name == name:
                return svc
        raise KeyError(name)


def host_dir(config: MeshConfig, host: str | None) -> Path:
    """Where ``host``'s runtime files are: ``<workDir>/<host>`` (``<workDir>`` without)."""
    return config.work_dir if host is None else config.work_dir / host


def runs_ca(config: MeshConfig, host: str | None) -> bool:
    return host is None or host == config.ca_host


def fixed_ports(config: MeshConfig, host: str | None = None) -> dict[int, str]:
    """Every port the mesh file names on ``host``, and what names it."""
    fixed: dict[int, str] = {config.ca_port: "ca.listen"} if runs_ca(config, host) else {}
    for svc in config.services_on(host):
        fixed[svc.port] = f"service {svc.name} port"
        if svc.inbound_port is not None:
            fixed[svc.inbound_port] = f"service {svc.name} inboundPort"
        for up in svc.upstreams:
            fixed[up.local_port] = f"service {svc.name} upstream {up.service} localPort"
        for remote in svc.remote_upstreams:
            fixed[remote.local_port] = f"service {svc.name} upstream {remote.host} localPort"
    return fixed


def _picker(pick_port: Callable[[], int], taken: set[int]) -> Callable[[], int]:
    def pick() -> int:
        for _ in range(1000):
            port = pick_port()
            if port not in taken:
                taken.add(port)
                return port
        raise ConfigError("could not find a free port on 127.0.0.1")

    return pick


def check_socket_path(service: str, path: Path) -> None:
    """Raises ConfigError naming ``service`` when ``path`` cannot be bound as a Unix socket."""
    size = len(os.fsencode(path))
    if size >= SUN_PATH_MAX:
        raise ConfigError(
            f"service {service}: its socket path {path} is {size} bytes, more than the "
            f"{SUN_PATH_MAX - 1} a Unix socket path may have; use a shorter workDir or "
            "service name"
        )


def _seconds(config: MeshConfig, svc: ServiceSpec | None = None) -> int:
    ttl = config.cert_ttl if svc is None or svc.cert_ttl is None else svc.cert_ttl
    return int(ttl.total_seconds())


def _max_ttl(config: MeshConfig) -> int:
    return max(_seconds(config), *(_seconds(config, s) for s in config.services), MAX_TTL_SECONDS)


def _ca_config(config: MeshConfig, hdir: Path) -> PlannedFile | None:
    """The CA's ``--config`` file when the mesh has a ``federation`` section."""
    if config.federation is None:
        return None
    settings = {"federation": federation_settings(config.federation)}
    return PlannedFile(hdir / "ca.yaml", yaml.safe_dump(settings, sort_keys=False), True)


def _ca_process(
    config: MeshConfig,
    python: str,
    metrics: str,
    logs: Path,
    ca_config: PlannedFile | None = None,
) -> ProcessPlan:
    """``ca serve`` for the mesh. The trust domain is the mesh file's, said explicitly: a
    plugged-in CA's root need not name it in its O (the article's says My-Organization)."""
    ttl = _seconds(config)
    settings = () if ca_config is None else ("--config", str(ca_config.path))
    return ProcessPlan(
        key="ca",
        what="the CA",
        argv=(
            python,
            "-m",
            "meshtrust",
            "ca",
            "serve",
            "--ca-dir",
            str(config.ca_dir),
            "--trust-domain",
            config.trust_domain.name,
            "--listen",
            config.ca_listen,
            "--metrics-listen",
            metrics,
            "--default-ttl",
            f"{ttl}s",
            "--max-ttl",
            f"{_max_ttl(config)}s",
            *settings,
        ),
        log=logs / "ca.log",
    )


def _sidecar_yaml(config: MeshConfig, svc: ServiceSpec, inbound: Mapping[str, int]) -> str:
    sidecar = {
        "name": svc.name,
        "namespace": svc.namespace,
        "labels": svc.labels,
        "app_port": svc.port,
        "inbound_port": inbound[svc.name],
        "inbound_address": config.inbound_address(svc),
        "min_tls_version": config.min_tls_version,
        "protocol": svc.protocol.value,
        "upstreams": [
            {
                "name": up.service,
                "local_port": up.local_port,
                "address": host_port(
                    config.dial_address(config.service(up.service)), inbound[up.service]
                ),
                "spiffe_id": str(config.service(up.service).spiffe_id),
                "protocol": config.service(up.service).protocol.value,
            }
            for up in svc.upstreams
        ]
        + [_remote_upstream(remote) for remote in svc.remote_upstreams],
    }
    return yaml.safe_dump(sidecar, sort_keys=False)


def _remote_upstream(remote: RemoteUpstreamSpec) -> dict[str, object]:
    """The sidecar upstream of a ServiceEntry host: every endpoint, the one identity."""
    upstream: dict[str, object] = {
        "name": remote.name,
        "local_port": remote.local_port,
        "address": remote.address,
        "spiffe_id": str(remote.spiffe_id),
        "protocol": remote.protocol.value,
    }
    if remote.extra_addresses:
        upstream["extra_addresses"] = list(remote.extra_addresses)
    return upstream


def _agent_yaml(
    config: MeshConfig, svc: ServiceSpec, paths: Mapping[str, Path], status: str, root: Path
) -> str:
    """The agent's ``--config`` file: its keys are ``meshtrust agent``'s flag names."""
    settings: dict[str, object] = {
        "ca-address": config.ca_address,
        "ca-root": str(root),
        "token-file": str(paths["token"]),
        "trust-domain": config.trust_domain.name,
        "namespace": svc.namespace,
        "service-account": svc.service_account,
        "cert-ttl": f"{_seconds(config, svc)}s",
        "sds-socket": str(paths["sds"]),
        "workload-socket": str(paths["workload"]),
        "output-dir": str(paths["certs"]),
        "status-listen": status,
        "sidecar": str(paths["sidecar"]),
        "envoy-workdir": str(paths["envoy"]),
        "root-namespace": config.root_namespace,
        "policy": [str(p) for p in config.policy_files],
    }
    if config.trust_domain_aliases:
        settings["trust-domain-aliases"] = [td.name for td in config.trust_domain_aliases]
    if svc.rotation_ratio is not None:
        settings["rotation-ratio"] = svc.rotation_ratio
    return yaml.safe_dump(settings, sort_keys=False)


def _app_process(
    config: MeshConfig,
    svc: ServiceSpec,
    workload_socket: Path,
    python: str,
    environ: Mapping[str, str],
    logs: Path,
) -> ProcessPlan | None:
    if svc.command is None:
        return None
    command = list(svc.command)
    if command[0] in ("python", "python3"):
        command[0] = python  # the Python that runs meshtrust, whatever is on PATH
    env = {
        **environ,
        **svc.env,
        "PORT": str(svc.port),
        "SERVICE_NAME": svc.name,
        "SPIFFE_ENDPOINT_SOCKET": f"unix://{workload_socket}",
        "PYTHONUNBUFFERED": "1",
    }
    for name, port in _upstream_ports(svc).items():
        env[f"UPSTREAM_{name.upper().replace('-', '_')}"] = f"127.0.0.1:{port}"
    return ProcessPlan(
        key=f"{svc.name}-app",
        what=f"the app of {svc.name}",
        argv=tuple(command),
        log=logs / f"{svc.name}-app.log",
        cwd=config.path.parent,
        env=env,
    )


def _upstream_ports(svc: ServiceSpec) -> dict[str, int]:
    """Each upstream's name in the sidecar and its local port (services, then remote)."""
    ports = {up.service: up.local_port for up in svc.upstreams}
    ports.update({remote.name: remote.local_port for remote in svc.remote_upstreams})
    return ports


def _service_plan(
    config: MeshConfig,
    svc: ServiceSpec,
    inbound: Mapping[str, int],
    status_port: int,
    python: str,
    environ: Mapping[str, str],
    logs: Path,
    where: tuple[Path, Path],  # the host's directory, the trust bundle
) -> ServicePlan:
    sdir = where[0] / svc.name
    paths = {
        "token": sdir / "token",
        "sds": sdir / "sds.sock",
        "workload": sdir / "workload.sock",
        "certs": sdir / "certs",
        "envoy": sdir / "envoy",
        "sidecar": sdir / "sidecar.yaml",
        "agent": sdir / "agent.yaml",
    }
    for socket_path in (paths["sds"], paths["workload"], paths["envoy"] / ADMIN_SOCKET):
        check_socket_path(svc.name, socket_path)
    status = f"127.0.0.1:{status_port}"
    return ServicePlan(
        spec=svc,
        dir=sdir,
        inbound_port=inbound[svc.name],
        status_listen=status,
        sds_socket=paths["sds"],
        workload_socket=paths["workload"],
        cert_dir=paths["certs"],
        envoy_workdir=paths["envoy"],
        token_file=paths["token"],
        agent_config=PlannedFile(paths["agent"], _agent_yaml(config, svc, paths, status, where[1])),
        sidecar_config=PlannedFile(paths["sidecar"], _sidecar_yaml(config, svc, inbound)),
        agent=ProcessPlan(
            key=f"{svc.name}-agent",
            what=f"the agent of {svc.name}",
            argv=(python, "-m", "meshtrust", "agent", "--config", str(paths["agent"])),
            log=logs / f"{svc.name}-agent.log",
        ),
        app=_app_process(config, svc, paths["workload"], python, environ, logs),
    )


def _steps(
    config: MeshConfig,
    ca: ProcessPlan | None,
    metrics: str | None,
    services: tuple[ServicePlan, ...],
) -> tuple[Step, ...]:
    """The CA first (agents need it for their first certificate); then every agent at once;
    each app once its agent's Workload API socket exists (apps may fetch their SVID at
    start); done when every sidecar is ready (certificate + Envoy live)."""
    steps: list[Step] = []
    if ca is not None and metrics is not None:
        steps += [
            Start(ca.key, f"starting the CA for {config.trust_domain} on {config.ca_listen}"),
            Wait("the CA", HttpOk(f"http://{metrics}/ready"), CA_READY_TIMEOUT, ca.key),
        ]
    steps += [
        Start(s.agent.key, f"starting {s.spec.name}: agent + Envoy ({s.spec.spiffe_id})")
        for s in services
    ]
    for s in services:
        steps.append(
            Wait(
                f"the Workload API socket of {s.spec.name}",
                PathExists(s.workload_socket),
                SOCKET_TIMEOUT,
                s.agent.key,
            )
        )
        if s.app is not None:
            steps.append(Start(s.app.key, f"starting {s.app.what}"))
    steps += [
        Wait(
            f"{s.spec.name} (certificate + Envoy)",
            HttpOk(f"http://{s.status_listen}/healthz/ready"),
            SIDECAR_READY_TIMEOUT,
            s.agent.key,
        )
        for s in services
    ]
    return tuple(steps)


def plan_mesh(
    config: MeshConfig,
    pick_port: Callable[[], int],
    *,
    python: str = sys.executable,
    environ: Mapping[str, str] | None = None,
    host: str | None = None,
    join_file: Path | None = None,
) -> MeshPlan:
    """The plan for ``config`` (on ``host``, when the mesh has hosts). ``pick_port`` returns
    a free loopback port each call (a port the mesh file names, or one already picked, is
    skipped); ``environ`` is the environment apps inherit (default: meshtrust's own);
    ``join_file`` is where a host other than the CA's gets its agents' first credential.

    Raises ConfigError naming the service when a socket path would be too long, and when
    ``host`` is missing (the mesh has hosts), unknown, or given for a mesh without hosts.
    """
    _check_host(config, host, join_file)
    fixed = fixed_ports(config, host)
    pick = _picker(pick_port, set(fixed))
    here = config.services_on(host)
    with_ca = runs_ca(config, host)
    metrics = f"127.0.0.1:{pick()}" if with_ca else None
    status_ports = {s.name: pick() for s in here}
    inbound = {
        s.name: s.inbound_port if s.inbound_port is not None else pick() for s in config.services
    }
    hdir = host_dir(config, host)
    logs = hdir / "logs"
    env = dict(os.environ if environ is None else environ)
    ca_config = _ca_config(config, hdir) if metrics is not None else None
    ca = _ca_process(config, python, metrics, logs, ca_config) if metrics is not None else None
    root = config.ca_dir / "root-cert.pem" if with_ca else hdir / "trust" / "root-cert.pem"
    services = tuple(
        _service_plan(config, s, inbound, status_ports[s.name], python, env, logs, (hdir, root))
        for s in here
    )
    dirs = (logs, *(s.dir for s in services))
    if not with_ca:
        dirs = (*dirs, root.parent)
    credentials = "mint" if with_ca else ("join" if join_file is not None else "provisioned")
    return MeshPlan(
        config=config,
        logs_dir=logs,
        fixed_ports=fixed,
        ca_metrics=metrics,
        ca=ca,
        services=services,
        steps=_steps(config, ca, metrics, services),
        dirs=dirs,
        host=host,
        root_cert=root,
        credentials=credentials,
        join_file=join_file,
        ca_config=ca_config,
    )


def _check_host(config: MeshConfig, host: str | None, join_file: Path | None) -> None:
    names = ", ".join(h.name for h in config.hosts)
    if host is None and config.hosts:
        raise ConfigError(
            f"{config.path} places services on hosts ({names}): say which one this is, "
            "with --host NAME"
        )
    if host is not None and not config.hosts:
        raise ConfigError(f"{config.path} has no hosts: start it without --host")
    if host is not None and host not in {h.name for h in config.hosts}:
        raise ConfigError(f"{config.path} has no host {host!r} (hosts: {names})")
    if join_file is not None and runs_ca(config, host):
        raise ConfigError(
            f"{host} runs the CA: its agents get their first credential from the CA "
            "directory, not from a join file (drop --join)"
        )


def _service_state(svc: ServicePlan, pids: Mapping[str, int]) -> ServiceState:
    return ServiceState(
        name=svc.spec.name,
        namespace=svc.spec.namespace,
        spiffe_id=str(svc.spec.spiffe_id),
        protocol=svc.spec.protocol.value,
        app_port=svc.spec.port,
        inbound_port=svc.inbound_port,
        status=svc.status_listen,
        agent_pid=pids[svc.agent.key],
        app_pid=pids[svc.app.key] if svc.app is not None else None,
        sds_socket=str(svc.sds_socket),
        workload_socket=str(svc.workload_socket),
        cert_dir=str(svc.cert_dir),
        envoy_workdir=str(svc.envoy_workdir),
        agent_log=str(svc.agent.log),
        app_log=str(svc.app.log) if svc.app is not None else None,
        upstreams=_upstream_ports(svc.spec),
    )


def mesh_state(plan: MeshPlan, pids: Mapping[str, int]) -> MeshState:
    """The state file of ``plan``'s mesh once its processes run with ``pids`` (by
    :attr:`ProcessPlan.key`). Raises KeyError when one of them is missing."""
    config = plan.config
    services = [_service_state(svc, pids) for svc in plan.services]
    ca = None
    if plan.ca is not None and plan.ca_metrics is not None:
        ca = CaState(
            pid=pids[plan.ca.key],
            address=config.ca_listen,
            metrics=plan.ca_metrics,
            ca_dir=str(config.ca_dir),
            log=str(plan.ca.log),
        )
    return MeshState(
        mesh_file=str(config.path),
        work_dir=str(plan.work_dir),
        trust_domain=config.trust_domain.name,
        cert_ttl_seconds=int(config.cert_ttl.total_seconds()),
        ca=ca,
        services=services,
        policy_files=[str(p) for p in config.policy_files],
        host=plan.host,
        ca_address=config.ca_address,
        root_cert=str(plan.root_cert or config.ca_dir / "root-cert.pem"),
        identities={str(s.spiffe_id): s.host for s in config.services} if ca is not None else {},
    )
