"""Looking at a running mesh from outside: is a process alive, what does an agent's
``/debug/status`` say, what are an Envoy's stats and ``/certs``, what certificate files did
the agent write. Short timeouts; a component that does not answer gives None (or an empty
result), never a traceback. Used by ``status``, ``check``, ``proxy-config`` and
``certs monitor``, which observe with these and then judge what they saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509

from meshtrust.envoy import EnvoyAdmin
from meshtrust.errors import ConfigError, EnvironmentFault, MeshTrustError
from meshtrust.mesh.state import MeshState, ServiceState, find_state, read_state
from meshtrust.pki import format_serial, load_certs_pem

__all__ = [
    "WorkloadUnavailable",
    "admin_json",
    "admin_text",
    "admin_unreachable",
    "agent_status",
    "alive",
    "certs_entries",
    "envoy_info",
    "envoy_stats",
    "fetch",
    "fetch_json",
    "ca_up",
    "load_running_state",
    "parse_serial",
    "port_open",
    "read_chain",
    "read_roots",
    "require_admin",
    "serial_text",
]


class WorkloadUnavailable(EnvironmentFault):
    """The workload's agent or Envoy is not there to be asked."""


def alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie, i.e. our child that exited, does not)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def fetch(url: str, timeout: float = 1.0) -> str | None:
    """The body of a GET, or None when nothing (good) answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.read().decode(errors="replace"))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def agent_status(svc: ServiceState, timeout: float = 2.0) -> dict[str, Any] | None:
    """The agent's ``/debug/status`` JSON, or None when it does not answer."""
    raw = fetch(f"http://{svc.status}/debug/status", timeout=timeout)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def admin_text(admin: str | None, path: str, timeout: float = 2.0) -> str | None:
    """The body of a 200 from the Envoy admin API at ``admin`` (the ``unix:///...`` address
    the agent reports), or None when there is no address, it is not a socket address, or
    nothing answers (``PermissionError`` included: it is another user's Envoy)."""
    if not admin:
        return None
    try:
        client = EnvoyAdmin.at(admin)
    except ValueError:
        return None
    return client.text(path, timeout=timeout)


def admin_json(admin: str | None, path: str, timeout: float = 2.0) -> Any:
    """Like :func:`admin_text`, the body parsed as JSON (None when it is not JSON)."""
    raw = admin_text(admin, path, timeout=timeout)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def admin_unreachable(admin: str) -> str:
    """Why the Envoy admin API at ``admin`` does not answer, for a message a person can act
    on (another user's socket, a missing one, an address from an older agent)."""
    try:
        client = EnvoyAdmin.at(admin)
    except ValueError as exc:
        return f"{exc}: an agent from before the admin API moved to a Unix socket? restart it"
    try:
        client.get("/ready", timeout=2.0)
    except PermissionError:
        return (
            f"permission denied on {client.socket_path}: only the user that runs the mesh "
            "can open Envoy's admin socket; run this as that user"
        )
    except FileNotFoundError:
        return f"{client.socket_path} does not exist: Envoy is not running?"
    except OSError as exc:
        return f"{client.socket_path}: {exc.strerror or exc}"
    return f"{client.socket_path} answers, but not with what was asked"


def envoy_stats(
    admin: str | None, pattern: str = "", timeout: float = 2.0
) -> dict[str, int] | None:
    """Envoy's numeric stats whose name matches ``pattern`` (a regex); None when Envoy (or
    its admin address) is not there."""
    path = f"/stats?filter={urllib.parse.quote(pattern)}" if pattern else "/stats"
    text = admin_text(admin, path, timeout=timeout)
    if text is None:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def fetch_json(url: str, timeout: float = 2.0) -> Any:
    """The JSON body of a GET, or None when nothing answers or the answer is not JSON."""
    raw = fetch(url, timeout=timeout)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def ca_up(state: MeshState) -> bool:
    """Whether the mesh's CA runs: its process on the CA's host; elsewhere, whether its
    address accepts connections (another host's processes are not visible from here)."""
    if state.ca is not None:
        return alive(state.ca.pid)
    from meshtrust.config import parse_host_port

    try:
        host, port = parse_host_port(state.ca_address, what="ca address")
    except ConfigError:
        return False
    return port_open(port, host)


def load_running_state(mesh_file: Path | None, host: str | None = None) -> MeshState:
    """The state of ``mesh_file``'s mesh on ``host`` (or of the mesh started last on this
    machine).

    Raises ConfigError when no mesh was started, or none of its processes is alive.
    """
    state = read_state(find_state(mesh_file, host))
    if not any(alive(pid) for pid in state.pids()):
        raise ConfigError(
            f"the mesh {state.mesh_file} is not running (none of its processes is alive); "
            f"start it with `meshtrust up {state.mesh_file}`"
        )
    return state


def envoy_info(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``envoy`` part of an agent's status ({} without one)."""
    envoy = status.get("envoy") if status else None
    return envoy if isinstance(envoy, dict) else {}


def parse_serial(text: object) -> int | None:
    """A hex serial number as the agent or Envoy prints it, or None."""
    try:
        return int(str(text), 16)
    except ValueError:
        return None


def serial_text(value: object) -> str | None:
    """A hex serial as the agent or Envoy prints it, in the one form of
    :func:`~meshtrust.pki.format_serial`; None when there is none."""
    serial = parse_serial(value)
    return None if serial is None else format_serial(serial)


def certs_entries(certs_json: Any, key: str) -> list[dict[str, Any]]:
    """Every certificate listed under ``key`` (cert_chain / ca_cert) in Envoy's ``/certs``."""
    out: list[dict[str, Any]] = []
    if not isinstance(certs_json, dict):
        return out
    for context in certs_json.get("certificates") or []:
        if isinstance(context, dict):
            out += [c for c in context.get(key) or [] if isinstance(c, dict)]
    return out


def read_chain(svc: ServiceState) -> tuple[list[x509.Certificate] | None, str | None]:
    """The agent's ``cert-chain.pem`` (leaf first), or None and why not."""
    path = Path(svc.cert_dir) / "cert-chain.pem"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    try:
        return load_certs_pem(data, source=str(path)), None
    except MeshTrustError as exc:
        return None, str(exc)


def read_roots(state: MeshState) -> tuple[list[x509.Certificate] | None, str]:
    """The mesh's root certificates and where they are (or None and why not)."""
    path = Path(state.root_cert)
    try:
        return load_certs_pem(path.read_bytes(), source=str(path)), str(path)
    except OSError as exc:
        return None, f"cannot read the mesh root {path}: {exc.strerror}"
    except MeshTrustError as exc:
        return None, str(exc)


def require_admin(svc: ServiceState) -> tuple[dict[str, Any], str]:
    """The agent's status and its Envoy's admin URL, or a WorkloadUnavailable saying why not."""
    status = agent_status(svc)
    if status is None:
        if not alive(svc.agent_pid):
            raise WorkloadUnavailable(
                f"the agent of {svc.name} (pid {svc.agent_pid}) is not running, so neither is "
                f"its Envoy; see its log {svc.agent_log}, then restart the mesh "
                "(`meshtrust down`, `meshtrust up MESH_FILE`)"
            )
        raise WorkloadUnavailable(
            f"the agent of {svc.name} (pid {svc.agent_pid}) does not answer on "
            f"http://{svc.status}/debug/status; see its log {svc.agent_log}"
        )
    envoy = envoy_info(status)
    admin = envoy.get("admin")
    if not envoy:
        raise WorkloadUnavailable(f"the agent of {svc.name} runs no Envoy sidecar")
    if not isinstance(admin, str) or not envoy.get("live"):
        raise WorkloadUnavailable(
            f"the Envoy of {svc.name} is not live (the agent restarts it; restarts so far: "
            f"{envoy.get('restarts')}); see {svc.agent_log} and the Envoy log in "
            f"{svc.envoy_workdir}"
        )
    return status, admin
