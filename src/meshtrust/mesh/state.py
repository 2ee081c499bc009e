"""What a running local mesh looks like on disk: ``<workDir>/state.json``.

``meshtrust up`` writes it once everything started; ``status``, ``down``, ``proxy-config``,
``check`` and ``certs monitor`` read it. ``~/.meshtrust/current`` holds the path of the
state file of the mesh started last on this machine, for commands given no ``--mesh``.
The file holds addresses and process ids, never keys or tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshtrust.errors import ConfigError
from meshtrust.fileio import PRIVATE_FILE_MODE, ensure_private_dir, write_file_atomic

__all__ = [
    "CaState",
    "MeshState",
    "ServiceState",
    "current_pointer",
    "find_state",
    "read_state",
    "write_state",
]

STATE_FILE = "state.json"


def current_pointer() -> Path:
    home = Path(os.environ.get("MESHTRUST_HOME", Path.home() / ".meshtrust"))
    return home / "current"


@dataclass
class CaState:
    pid: int
    address: str  # gRPC HOST:PORT
    metrics: str  # HOST:PORT of /metrics and /ready
    ca_dir: str
    log: str


@dataclass
class ServiceState:
    name: str
    namespace: str
    spiffe_id: str
    protocol: str
    app_port: int
    inbound_port: int
    status: str  # HOST:PORT of the agent's /healthz/ready, /metrics, /debug/status
    agent_pid: int
    app_pid: int | None
    sds_socket: str
    workload_socket: str
    cert_dir: str
    envoy_workdir: str
    agent_log: str
    app_log: str | None
    upstreams: dict[str, int] = field(default_factory=dict)  # service -> local port
    envoy_pid: int | None = None  # at start; the agent may restart Envoy (ask its status)


@dataclass
class MeshState:
    mesh_file: str
    work_dir: str
    trust_domain: str
    cert_ttl_seconds: float
    ca: CaState | None  # None on a host of the mesh other than the CA's
    services: list[ServiceState]
    policy_files: list[str] = field(default_factory=list)
    host: str | None = None  # the host of a mesh with hosts
    ca_address: str = ""  # where the agents reach the CA
    root_cert: str = ""  # the trust bundle the agents use
    identities: dict[str, str | None] = field(default_factory=dict)  # on the CA host: id -> host

    def service(self, name: str) -> ServiceState:
        for svc in self.services:
            if svc.name == name:
                return svc
        known = ", ".join(s.name for s in self.services)
        raise ConfigError(f"no service {name!r} in the mesh {self.mesh_file} (services: {known})")

    def pids(self) -> list[int]:
        out = [] if self.ca is None else [self.ca.pid]
        for svc in self.services:
            out.append(svc.agent_pid)
            if svc.app_pid is not None:
                out.append(svc.app_pid)
        return out


def write_state(state: MeshState) -> Path:
    """Write ``state.json`` and point ``~/.meshtrust/current`` at it, each whole or not at
    all, 0600 (pids, ports and paths are nobody else's business). Raises OSError (or
    :class:`~meshtrust.fileio.UnsafeDirectory` for a ``MESHTRUST_HOME`` others can write
    to); then neither was changed, or only the pointer was not."""
    path = Path(state.work_dir) / STATE_FILE
    write_file_atomic(path, json.dumps(asdict(state), indent=2).encode(), PRIVATE_FILE_MODE)
    pointer = current_pointer()
    ensure_private_dir(pointer.parent)
    write_file_atomic(pointer, (str(path.resolve()) + "\n").encode(), PRIVATE_FILE_MODE)
    return path


def read_state(path: Path) -> MeshState:
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"no running mesh: cannot read {path} ({exc.strerror})") from exc
    except ValueError as exc:
        raise ConfigError(f"mesh state {path} is damaged: {exc}") from exc
    try:
        return MeshState(
            mesh_file=raw["mesh_file"],
            work_dir=raw["work_dir"],
            trust_domain=raw["trust_domain"],
            cert_ttl_seconds=raw["cert_ttl_seconds"],
            ca=None if raw["ca"] is None else CaState(**raw["ca"]),
            services=[ServiceState(**s) for s in raw["services"]],
            policy_files=list(raw.get("policy_files", [])),
            host=raw.get("host"),
            identities=dict(raw.get("identities") or {}),
            ca_address=raw.get("ca_address") or (raw["ca"] or {}).get("address", ""),
            root_cert=raw.get("root_cert")
            or str(Path((raw["ca"] or {}).get("ca_dir", "")) / "root-cert.pem"),
        )
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"mesh state {path} is damaged or from another version") from exc


def find_state(mesh_file: Path | None, host: str | None = None) -> Path:
    """The state file of ``mesh_file``'s mesh (of its ``host``: ``<workDir>/<host>/``), or of
    the mesh started last on this machine."""
    if mesh_file is not None:
        from meshtrust.mesh.config import mesh_work_dir

        work = mesh_work_dir(mesh_file)
        return (work if host is None else work / host) / STATE_FILE
    if host is not None:
        raise ConfigError("--host needs the mesh file")
    pointer = current_pointer()
    try:
        return Path(pointer.read_text().strip())
    except OSError:
        raise ConfigError(
            "no mesh has been started on this machine (run `meshtrust up mesh.yaml`), "
            "or pass the mesh file"
        ) from None
