"""Starting and stopping a local mesh: the CA, then per service its agent (which runs the
Envoy sidecar) and its app, as background processes with their logs in ``<workDir>/logs``.

Everything that can be checked is checked before the first process starts (the mesh file,
the policies, every fixed port). If something fails while starting — a port taken after
all, an app that exits, an Envoy that refuses its config, a CA that does not come up —
everything already started is stopped again and the error says what failed, with the end of
its log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from meshtrust.ca.authn import mint_token
from meshtrust.ca.cadir import init_ca_dir, load_ca_dir, load_token_signing_key, token_issuer_for
from meshtrust.clock import SystemClock
from meshtrust.errors import ConfigError, EnvironmentFault
from meshtrust.fileio import write_private_file
from meshtrust.mesh.config import MeshConfig, ServiceSpec
from meshtrust.mesh.probes import agent_status, alive
from meshtrust.mesh.state import CaState, MeshState, ServiceState, write_state

__all__ = ["MeshStartFailed", "start_mesh", "stop_mesh"]

MESHTRUST = [sys.executable, "-m", "meshtrust"]
TOKEN_TTL = dt.timedelta(days=30)


class MeshStartFailed(EnvironmentFault):
    """The mesh could not be started; what was started has been stopped again."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int, taken: set[int]) -> list[int]:
    out: list[int] = []
    while len(out) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken and port not in out:
            out.append(port)
    return out


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def _get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _answers_ok(url: str) -> bool:
    try:
        return _get(url)[0] == 200
    except OSError:
        return False


# The mesh's processes outlive the Popen objects of the call that started them (`up
# --detach` returns, a test goes on). Kept here, they are reaped when stopped instead of
# warning "still running" when garbage-collected.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


class _Started:
    """What has been started so far, to stop again on failure."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def spawn(
        self,
        what: str,
        args: Sequence[str],
        log: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            try:
                proc = subprocess.Popen(
                    list(args),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise MeshStartFailed(f"cannot start {what} ({args[0]}): {exc.strerror}") from exc
        self.procs.append((what, proc, log))
        _CHILDREN[proc.pid] = proc
        return proc

    def check_running(self) -> None:
        for what, proc, log in self.procs:
            if proc.poll() is not None:
                raise MeshStartFailed(
                    f"{what} exited with status {proc.returncode} while the mesh was "
                    f"starting; its log ({log}) ends with:\n{_tail(log)}"
                )

    def stop_all(self) -> None:
        _terminate([p.pid for _, p, _ in reversed(self.procs)])
        for _, proc, _ in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)


def _terminate(pids: Sequence[int], timeout: float = 15.0) -> None:
    """SIGTERM every process (group), wait, SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        proc = _CHILDREN.get(pid)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    _reap()


def _wait(
    what: str, check: Callable[[], bool], started: _Started, timeout: float, hint: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started.check_running()
        if check():
            return
        time.sleep(0.1)
    raise MeshStartFailed(f"{what} was not ready after {timeout:.0f}s\n{hint()}")


def _ensure_ca(config: MeshConfig) -> None:
    now = SystemClock().now()
    if not (config.ca_dir / "root-cert.pem").exists():
        init_ca_dir(config.ca_dir, config.trust_domain, now)
        return
    hint = load_ca_dir(config.ca_dir, now).trust_domain_hint()
    if hint is not None and hint != config.trust_domain:
        raise ConfigError(
            f"the CA in {config.ca_dir} is for trust domain {hint}, but {config.path} says "
            f"{config.trust_domain}; remove the directory or fix trustDomain"
        )


def start_mesh(config: MeshConfig, progress: Callable[[str], None] = print) -> MeshState:
    """Start the whole mesh and return its state once every sidecar is ready.

    Raises ConfigError (a port in use, a CA directory for another trust domain) before
    anything starts, MeshStartFailed (everything started is stopped again) after.
    """
    fixed: dict[int, str] = {}
    ca_port = int(config.ca_listen.rpartition(":")[2])
    fixed[ca_port] = "ca.listen"
    for svc in config.services:
        fixed[svc.port] = f"service {svc.name} port"
        if svc.inbound_port is not None:
            fixed[svc.inbound_port] = f"service {svc.name} inboundPort"
        for up in svc.upstreams:
            fixed[up.local_port] = f"service {svc.name} upstream {up.service} localPort"
    for port, what in fixed.items():
        if not _port_free(port):
            raise ConfigError(
                f"port {port} ({what}) is already in use on 127.0.0.1 — is "
                "another mesh running? (`meshtrust down`)"
            )
    missing_inbound = [s for s in config.services if s.inbound_port is None]
    picked = _pick_ports(1 + len(config.services) + len(missing_inbound), set(fixed))
    metrics_port, picked = picked[0], picked[1:]
    status_ports = dict(zip([s.name for s in config.services], picked, strict=False))
    picked = picked[len(config.services) :]
    inbound = {s.name: s.inbound_port for s in config.services if s.inbound_port is not None}
    inbound.update(zip([s.name for s in missing_inbound], picked, strict=True))

    work = config.work_dir
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _ensure_ca(config)
    started = _Started()
    try:
        progress(f"starting the CA for {config.trust_domain} on {config.ca_listen}")
        ca_log = logs / "ca.log"
        ca_proc = started.spawn(
            "the CA",
            [
                *MESHTRUST,
                "ca",
                "serve",
                "--ca-dir",
                str(config.ca_dir),
                "--listen",
                config.ca_listen,
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                "--default-ttl",
                f"{int(config.cert_ttl.total_seconds())}s",
                "--max-ttl",
                f"{max(int(config.cert_ttl.total_seconds()), 90 * 86400)}s",
            ],
            ca_log,
        )
        _wait(
            "the CA",
            functools.partial(_answers_ok, f"http://127.0.0.1:{metrics_port}/ready"),
            started,
            30,
            lambda: _tail(ca_log),
        )

        token_key = load_token_signing_key(config.ca_dir)
        if token_key is None:
            raise MeshStartFailed(f"{config.ca_dir} has no token-key.pem to mint tokens with")
        services: list[ServiceState] = []
        agents: list[tuple[ServiceSpec, int]] = []
        for svc in config.services:
            progress(f"starting {svc.name}: agent + Envoy ({svc.spiffe_id})")
            sdir = work / svc.name
            sdir.mkdir(parents=True, exist_ok=True)
            token = mint_token(
                token_key,
                token_issuer_for(config.trust_domain),
                svc.namespace,
                svc.service_account,
                SystemClock().now(),
                TOKEN_TTL,
            )
            write_private_file(sdir / "token", token.encode())
            sidecar = {
                "name": svc.name,
                "namespace": svc.namespace,
                "labels": svc.labels,
                "app_port": svc.port,
                "inbound_port": inbound[svc.name],
                "protocol": svc.protocol.value,
                "upstreams": [
                    {
                        "name": up.service,
                        "local_port": up.local_port,
                        "address": f"127.0.0.1:{inbound[up.service]}",
                        "spiffe_id": str(config.service(up.service).spiffe_id),
                        "protocol": config.service(up.service).protocol.value,
                    }
                    for up in svc.upstreams
                ],
            }
            (sdir / "sidecar.yaml").write_text(yaml.safe_dump(sidecar, sort_keys=False))
            args = [
                *MESHTRUST,
                "agent",
                "--ca-address",
                config.ca_listen,
                "--ca-root",
                str(config.ca_dir / "root-cert.pem"),
                "--token-file",
                str(sdir / "token"),
                "--namespace",
                svc.namespace,
                "--service-account",
                svc.service_account,
                "--trust-domain",
                config.trust_domain.name,
                "--cert-ttl",
                f"{int(config.cert_ttl.total_seconds())}s",
                "--sds-socket",
                str(sdir / "sds.sock"),
                "--workload-socket",
                str(sdir / "workload.sock"),
                "--output-dir",
                str(sdir / "certs"),
                "--status-listen",
                f"127.0.0.1:{status_ports[svc.name]}",
                "--sidecar",
                str(sdir / "sidecar.yaml"),
                "--envoy-workdir",
                str(sdir / "envoy"),
                "--root-namespace",
                config.root_namespace,
            ]
            for policy in config.policy_files:
                args += ["--policy", str(policy)]
            agent_log = logs / f"{svc.name}-agent.log"
            agent = started.spawn(f"the agent of {svc.name}", args, agent_log)
            agents.append((svc, agent.pid))
            services.append(
                ServiceState(
                    name=svc.name,
                    namespace=svc.namespace,
                    spiffe_id=str(svc.spiffe_id),
                    protocol=svc.protocol.value,
                    app_port=svc.port,
                    inbound_port=inbound[svc.name],
                    status=f"127.0.0.1:{status_ports[svc.name]}",
                    agent_pid=agent.pid,
                    app_pid=None,
                    sds_socket=str(sdir / "sds.sock"),
                    workload_socket=str(sdir / "workload.sock"),
                    cert_dir=str(sdir / "certs"),
                    envoy_workdir=str(sdir / "envoy"),
                    agent_log=str(agent_log),
                    app_log=None,
                    upstreams={up.service: up.local_port for up in svc.upstreams},
                )
            )

        for svc, state in zip(config.services, services, strict=True):
            _wait(
                f"the Workload API socket of {svc.name}",
                functools.partial(Path(state.workload_socket).exists),
                started,
                30,
                functools.partial(_tail, Path(state.agent_log)),
            )
            if svc.command is None:
                continue
            command = list(svc.command)
            if command[0] in ("python", "python3"):
                command[0] = sys.executable
            env = {
                **os.environ,
                **svc.env,
                "PORT": str(svc.port),
                "SERVICE_NAME": svc.name,
                "SPIFFE_ENDPOINT_SOCKET": f"unix://{state.workload_socket}",
                "PYTHONUNBUFFERED": "1",
            }
            for up in svc.upstreams:
                env[f"UPSTREAM_{up.service.upper().replace('-', '_')}"] = (
                    f"127.0.0.1:{up.local_port}"
                )
            app_log = logs / f"{svc.name}-app.log"
            app = started.spawn(
                f"the app of {svc.name}", command, app_log, cwd=config.path.parent, env=env
            )
            state.app_pid, state.app_log = app.pid, str(app_log)

        for state in services:
            url = f"http://{state.status}/healthz/ready"
            _wait(
                f"{state.name} (certificate + Envoy)",
                functools.partial(_answers_ok, url),
                started,
                60,
                functools.partial(_tail, Path(state.agent_log)),
            )
        for state in services:
            state.envoy_pid = envoy_pid(state)
        progress("all sidecars have their certificates and are ready")
        mesh = MeshState(
            mesh_file=str(config.path),
            work_dir=str(work),
            trust_domain=config.trust_domain.name,
            cert_ttl_seconds=config.cert_ttl.total_seconds(),
            ca=CaState(
                pid=ca_proc.pid,
                address=config.ca_listen,
                metrics=f"127.0.0.1:{metrics_port}",
                ca_dir=str(config.ca_dir),
                log=str(ca_log),
            ),
            services=services,
            policy_files=[str(p) for p in config.policy_files],
        )
        write_state(mesh)
        return mesh
    except BaseException:
        started.stop_all()
        raise


def envoy_pid(svc: ServiceState) -> int | None:
    """The pid of the service's Envoy, from its agent (None if the agent does not answer)."""
    envoy = (agent_status(svc) or {}).get("envoy")
    pid = envoy.get("pid") if isinstance(envoy, dict) else None
    return pid if isinstance(pid, int) else None


def stop_mesh(state: MeshState) -> list[str]:
    """Stop every process of the mesh and remove its sockets. Idempotent; returns what it did."""
    done: list[str] = []
    envoys = [p for s in state.services for p in (envoy_pid(s), s.envoy_pid) if p is not None]
    apps = [s.app_pid for s in state.services if s.app_pid is not None and alive(s.app_pid)]
    agents = [s.agent_pid for s in state.services if alive(s.agent_pid)]
    if apps:
        _terminate(apps)
        done.append(f"stopped {len(apps)} app(s)")
    if agents:
        _terminate(agents)
        done.append(f"stopped {len(agents)} agent(s) and their Envoys")
    left = [p for p in envoys if alive(p) and "envoy" in _cmdline(p)]
    if left:
        _terminate(left)
        done.append(f"stopped {len(left)} orphaned Envoy(s)")
    if alive(state.ca.pid):
        _terminate([state.ca.pid])
        done.append("stopped the CA")
    for svc in state.services:
        for sock in (svc.sds_socket, svc.workload_socket):
            with contextlib.suppress(FileNotFoundError):
                Path(sock).unlink()
                done.append(f"removed {sock}")
    return done


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
