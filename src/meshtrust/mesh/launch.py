"""Carrying out a :class:`~meshtrust.mesh.plan.MeshPlan`: check its ports, write its files,
start its processes in its order, and stop them again.

Everything that can be checked is checked before the first process starts (the plan, every
fixed port, the CA directory). If something fails while starting — a port taken after all,
an app that exits, an Envoy that refuses its config, a CA that does not come up, a file
that cannot be written — everything already started is stopped again and the error says
what failed, naming the path or ending with the process's log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from meshtrust.ca.authn import mint_token
from meshtrust.ca.cadir import (
    ensure_token_signing_key,
    init_ca_dir,
    load_ca_dir,
    token_issuer_for,
)
from meshtrust.clock import SystemClock
from meshtrust.errors import ConfigError, EnvironmentFault
from meshtrust.fileio import PRIVATE_FILE_MODE, ensure_private_dir, open_log, write_file_atomic
from meshtrust.joinfile import JoinFile, load_join_file
from meshtrust.mesh.config import MeshConfig
from meshtrust.mesh.plan import (
    HttpOk,
    MeshPlan,
    PathExists,
    ProcessPlan,
    Start,
    Wait,
    mesh_state,
    plan_mesh,
)
from meshtrust.mesh.probes import agent_status, alive
from meshtrust.mesh.prometheus import prometheus_dir, write_prometheus_files
from meshtrust.mesh.state import STATE_FILE, MeshState, ServiceState, read_state, write_state

__all__ = [
    "MeshStartFailed",
    "MeshStartInterrupted",
    "StopRequested",
    "UP_LOCK",
    "envoy_pid",
    "launch",
    "mesh_lock",
    "pick_free_port",
    "port_free",
    "start_mesh",
    "stop_mesh",
]

TOKEN_TTL = dt.timedelta(days=30)

#: ``<workDir>/up.lock``: held (``flock``) by the ``up`` starting or running the mesh; it
#: holds that ``up``'s pid. Never removed: removing a lock file races with the next taker.
UP_LOCK = "up.lock"


class MeshStartFailed(EnvironmentFault):
    """The mesh could not be started; what was started has been stopped again."""


class MeshStartInterrupted(MeshStartFailed):
    """Asked to stop (Ctrl-C, SIGTERM) while starting; what was started has been stopped."""


#: Whether the user asked ``up`` to stop. Looked at between steps, never an exception
#: raised from a signal handler: one raised between the fork of a process and its record
#: here would leave that process running, unknown to the launcher.
StopRequested = Callable[[], bool]


def _never() -> bool:
    return False


def _check_stop(stop: StopRequested) -> None:
    if stop():
        raise MeshStartInterrupted(
            "interrupted while the mesh was starting; everything started has been stopped"
        )


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port``.

    With SO_REUSEADDR, as every server sets it: connections of a mesh that just stopped
    linger in TIME_WAIT for a minute, and without it they would look like a running mesh.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def _answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return int(resp.status) == 200
    except urllib.error.HTTPError:
        return False
    except OSError:
        return False


def _ready(until: HttpOk | PathExists) -> bool:
    if isinstance(until, HttpOk):
        return _answers_ok(until.url)
    return until.path.exists()


def _os_error(exc: OSError, doing: str) -> MeshStartFailed:
    where = f" {exc.filename}" if exc.filename else ""
    return MeshStartFailed(f"cannot {doing}{where}: {exc.strerror or exc}")


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
        self.procs: dict[str, tuple[ProcessPlan, subprocess.Popen[bytes]]] = {}

    def spawn(self, process: ProcessPlan) -> subprocess.Popen[bytes]:
        try:
            out = open_log(process.log)
        except OSError as exc:
            raise _os_error(exc, f"open the log of {process.what}") from exc
        with out:
            try:
                proc = subprocess.Popen(
                    list(process.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=process.cwd,
                    env=None if process.env is None else dict(process.env),
                    start_new_session=True,
                )
            except OSError as exc:
                raise MeshStartFailed(
                    f"cannot start {process.what} ({process.argv[0]}): {exc.strerror}"
                ) from exc
        self.procs[process.key] = (process, proc)
        _CHILDREN[proc.pid] = proc
        return proc

    def pids(self) -> dict[str, int]:
        return {key: proc.pid for key, (_, proc) in self.procs.items()}

    def check_running(self) -> None:
        for process, proc in self.procs.values():
            if proc.poll() is not None:
                raise MeshStartFailed(
                    f"{process.what} exited with status {proc.returncode} while the mesh was "
                    f"starting; its log ({process.log}) ends with:\n{_tail(process.log)}"
                )

    def stop_all(self) -> None:
        procs = [p for _, p in self.procs.values()]
        _terminate([p.pid for p in reversed(procs)])
        for proc in procs:
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


def _wait(step: Wait, started: _Started, plan: MeshPlan, stop: StopRequested) -> None:
    deadline = time.monotonic() + step.timeout
    while time.monotonic() < deadline:
        started.check_running()
        _check_stop(stop)
        if _ready(step.until):
            return
        time.sleep(0.1)
    log = plan.processes()[step.log_of].log
    raise MeshStartFailed(f"{step.what} was not ready after {step.timeout:.0f}s\n{_tail(log)}")


# Locks this process holds, by workDir: `up` holds its mesh's for its whole life and
# `launch` takes it again inside (two flocks on one file conflict even in one process).
_HELD: dict[Path, int] = {}


@contextlib.contextmanager
def mesh_lock(work_dir: Path) -> Iterator[None]:
    """Hold ``<workDir>/up.lock`` (exclusive ``flock``), made before anything else of the
    mesh (the workDir first, 0700). Re-entrant within a process. The kernel drops the lock
    when its holder dies, so a killed ``up`` leaves nothing stale.

    Raises ConfigError: "the mesh ... is still running" when another ``up`` holds it and its
    mesh runs, "another `meshtrust up` of this mesh is starting (pid N)" while it starts.
    """
    key = work_dir.resolve()
    if key in _HELD:
        yield
        return
    try:
        ensure_private_dir(work_dir)
        fd = os.open(work_dir / UP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _os_error(exc, "create the directory") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            _refuse_if_still_running(work_dir)
            raise ConfigError(
                f"another `meshtrust up` of this mesh is starting (pid {holder}) in "
                f"{work_dir}; wait for it, then `meshtrust status`"
            ) from None
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = fd
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int) -> str:
    """The pid the holder wrote (it writes it just after taking the lock: look a few times)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.05)
    return "unknown"


def _refuse_if_still_running(work_dir: Path) -> None:
    """Refuse to start over a mesh of this workDir that still runs.

    Its state file would be replaced, and ``down`` could no longer find its processes (the
    fixed-port check does not catch it when the mesh file's ports were edited). A state
    file whose processes are gone, or whose pids now belong to other programs, does not
    count.
    """
    try:
        previous = read_state(work_dir / STATE_FILE)
    except ConfigError:
        return  # none, or damaged: there is nothing it could still stop
    ours = [*previous.pids()]
    running = [pid for pid in ours if alive(pid) and _runs_meshtrust(pid)]
    if running:
        raise ConfigError(
            f"the mesh of {previous.mesh_file} in {work_dir} is still running "
            f"(pids {', '.join(map(str, running))}); stop it first: "
            f"`meshtrust down {previous.mesh_file}`"
        )


def _check_ports(plan: MeshPlan) -> None:
    addresses = dict.fromkeys(["127.0.0.1", plan.address])
    if plan.host is not None and not _address_here(plan.address):
        raise ConfigError(
            f"host {plan.host}'s address {plan.address} is not an address of this machine: "
            f"is this {plan.host}? (`--host` names the host `up` runs on)"
        )
    for port, what in plan.fixed_ports.items():
        for address in addresses:
            if not port_free(port, address):
                raise ConfigError(
                    f"port {port} ({what}) is already in use on {address} — is "
                    "another mesh running? (`meshtrust down`)"
                )


def _address_here(address: str) -> bool:
    """Whether ``address`` can be bound here (a DNS name is resolved by the kernel's rules)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def _ensure_ca(config: MeshConfig) -> None:
    now = SystemClock().now()
    if config.ca_dir.is_relative_to(config.work_dir):
        ensure_private_dir(config.ca_dir, tighten=True)  # ours; a user's ca.dir is checked
    if not (config.ca_dir / "root-cert.pem").exists():
        init_ca_dir(config.ca_dir, config.trust_domain, now)
        return
    # The signing CA may have rotated away from ca-cert.pem (meshtrust.ca.signing).
    hint = load_ca_dir(config.ca_dir, now, signer_may_expire=True).trust_domain_hint()
    if hint is not None and hint != config.trust_domain:
        raise ConfigError(
            f"the CA in {config.ca_dir} is for trust domain {hint}, but {config.path} says "
            f"{config.trust_domain}; remove the directory or fix trustDomain"
        )


def _prepare(plan: MeshPlan, join: JoinFile | None) -> None:
    """Directories, the CA directory, every planned file and each agent's token.

    Modes whatever the umask: directories 0700, every file 0600 (configs name sockets and
    token files; the token is a credential). The workDir itself may be the user's: one that
    others could write to is refused; the directories inside it are meshtrust's, and made
    0700 again if an earlier run left them more open.
    """
    config = plan.config
    own = [*plan.dirs, *(p for s in plan.services for p in (s.cert_dir, s.envoy_workdir))]
    try:
        ensure_private_dir(config.work_dir)
        ensure_private_dir(plan.work_dir)
        for directory in own:
            ensure_private_dir(directory, tighten=True)
    except OSError as exc:
        raise _os_error(exc, "create the directory") from exc
    if plan.ca is not None:
        try:
            _ensure_ca(config)
        except OSError as exc:
            raise _os_error(exc, "set up the CA directory") from exc
    for planned in plan.files:
        _write(planned.path, planned.content.encode(), PRIVATE_FILE_MODE, "write")
    try:
        write_prometheus_files(plan)  # scrape targets + prometheus.yml (mesh/prometheus.py)
    except OSError as exc:
        raise _os_error(exc, "write the Prometheus targets") from exc
    if plan.credentials == "mint":
        _mint_tokens(plan)
    elif join is not None:
        _credentials_from_join(plan, join)


def _check_provisioned(plan: MeshPlan) -> None:
    """A host other than the CA's, started without a join file: its agents' first
    credentials must already be in place (put there by hand), or nothing starts."""
    needed = [p for p in (plan.root_cert, *(s.token_file for s in plan.services)) if p]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(
            f"host {plan.host} does not run the CA, and its agents have no first credential "
            f"({', '.join(missing)} missing): start it with `--join FILE`, a join file made "
            f"on the CA's host with `meshtrust join create {plan.config.path} --host "
            f"{plan.host} -o FILE`"
        )


def _read_join(plan: MeshPlan) -> JoinFile:
    """The join file's trust bundle and token, as every agent of this host reads them: the
    token is a bearer credential like a service-account token (the CA grants only the
    identities it lists), the bundle is what the agents verify the CA with.

    Refused before anything starts: an expired file, or one for other identities (another
    host's file), with a message saying which."""
    assert plan.join_file is not None and plan.root_cert is not None
    join = load_join_file(plan.join_file)
    if join.expired(SystemClock().now()):
        raise ConfigError(
            f"the join file {plan.join_file} expired at {join.expires_at:%Y-%m-%d %H:%M:%S} "
            f"UTC; make a new one on the CA's host (`meshtrust join create "
            f"{plan.config.path} --host {plan.host}`)"
        )
    wanted = {str(s.spec.spiffe_id) for s in plan.services}
    allowed = {str(i) for i in join.identities}
    if not wanted <= allowed:
        raise ConfigError(
            f"the join file {plan.join_file} is not for host {plan.host}: it cannot obtain "
            f"{', '.join(sorted(wanted - allowed))} (made for another host?)"
        )
    return join


def _credentials_from_join(plan: MeshPlan, join: JoinFile) -> None:
    assert plan.root_cert is not None
    _write(plan.root_cert, join.bundle_pem, PRIVATE_FILE_MODE, "write the trust bundle")
    for svc in plan.services:
        _write(svc.token_file, join.token.encode(), PRIVATE_FILE_MODE, "write the token")


def _mint_tokens(plan: MeshPlan) -> None:
    config = plan.config
    # A plugged-in CA (the article's cacerts) has no token issuer yet: made on first use.
    token_key = ensure_token_signing_key(config.ca_dir)
    for svc in plan.services:
        token = mint_token(
            token_key,
            token_issuer_for(config.trust_domain),
            svc.spec.namespace,
            svc.spec.service_account,
            SystemClock().now(),
            TOKEN_TTL,
        )
        _write(svc.token_file, token.encode(), PRIVATE_FILE_MODE, "write the token")


def _write(path: Path, data: bytes, mode: int, doing: str) -> None:
    """Whole or not at all (an earlier mesh's file stays as it was), naming ``path`` on
    failure rather than the temporary file beside it."""
    try:
        write_file_atomic(path, data, mode)
    except OSError as exc:
        raise MeshStartFailed(f"cannot {doing} {path}: {exc.strerror or exc}") from exc


def launch(
    plan: MeshPlan, progress: Callable[[str], None] = print, stop: StopRequested = _never
) -> MeshState:
    """Carry out ``plan`` and return the mesh's state once every sidecar is ready.

    Holds the mesh's lock while it starts (see :func:`mesh_lock`; ``up`` holds it longer).

    Raises ConfigError (another ``up`` of this mesh starting, this workDir's previous mesh
    still running, a port in use, a CA directory for another trust domain) before anything
    starts, MeshStartFailed (everything started is stopped again) after;
    MeshStartInterrupted when ``stop()`` turns true before the mesh is ready.
    """
    with mesh_lock(plan.work_dir):
        return _launch(plan, progress, stop)


def _launch(plan: MeshPlan, progress: Callable[[str], None], stop: StopRequested) -> MeshState:
    # The join file is input, checked first: an expired one is refused as such, whatever runs.
    join = _read_join(plan) if plan.credentials == "join" else None
    if plan.credentials == "provisioned":
        _check_provisioned(plan)
    _refuse_if_still_running(plan.work_dir)
    _check_ports(plan)
    _prepare(plan, join)
    progress(f"Prometheus scrape targets and config: {prometheus_dir(plan) / 'prometheus.yml'}")
    started = _Started()
    try:
        _start_in_order(plan, started, progress, stop)
        state = mesh_state(plan, started.pids())
        for svc in state.services:
            svc.envoy_pid = envoy_pid(svc)
        progress("all sidecars have their certificates and are ready")
        try:
            write_state(state)
        except OSError as exc:
            # A state file for a mesh stopped again would send `status` to dead pids.
            with contextlib.suppress(OSError):  # the error to report is the one above
                (plan.work_dir / STATE_FILE).unlink(missing_ok=True)
            raise _os_error(exc, "write the mesh state") from exc
        return state
    except BaseException:
        started.stop_all()
        raise


def _start_in_order(
    plan: MeshPlan, started: _Started, progress: Callable[[str], None], stop: StopRequested
) -> None:
    processes = plan.processes()
    for step in plan.steps:
        _check_stop(stop)
        if isinstance(step, Start):
            progress(step.announce)
            started.spawn(processes[step.process])
        else:
            _wait(step, started, plan, stop)


def start_mesh(
    config: MeshConfig,
    progress: Callable[[str], None] = print,
    stop: StopRequested = _never,
    *,
    host: str | None = None,
    join_file: Path | None = None,
) -> MeshState:
    """Plan ``config`` (``host``'s share) and launch it (see :func:`plan_mesh`, :func:`launch`)."""
    plan = plan_mesh(config, pick_free_port, python=sys.executable, host=host, join_file=join_file)
    return launch(plan, progress, stop)


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
    if state.ca is not None and alive(state.ca.pid):
        _terminate([state.ca.pid])
        done.append("stopped the CA")
    for svc in state.services:
        for sock in (svc.sds_socket, svc.workload_socket):
            with contextlib.suppress(FileNotFoundError):
                Path(sock).unlink()
                done.append(f"removed {sock}")
    return done


def _runs_meshtrust(pid: int) -> bool:
    """Whether ``pid`` runs ``python -m meshtrust`` (as the CA and the agents do)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(argv[i : i + 2] == [b"-m", b"meshtrust"] for i in range(len(argv)))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
