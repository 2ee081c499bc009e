"""Running meshtrust commands as real processes, as a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MESHTRUST = [sys.executable, "-m", "meshtrust"]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now and that no earlier call in this run returned.

    The kernel may hand the same port to two bind-to-0 calls in a row once the first socket is
    closed, and a test that asks for several ports (a mesh file's CA, app and inbound ports)
    would then get a clash it did not ask for.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHTRUST, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


class CaProcess:
    """``meshtrust ca serve`` in a child process, with its log in a file."""

    def __init__(
        self,
        ca_dir: Path,
        *extra: str,
        port: int | None = None,
        prefix: tuple[str, ...] = (),
        options: tuple[str, ...] = (),
    ) -> None:
        """``prefix``: a command that runs the CA (``unshare ... sh -c '...; exec "$@"' sh``);
        ``options``: meshtrust's own, before ``ca`` (``--log-level debug``)."""
        self.ca_dir = ca_dir
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = ca_dir.parent / f"ca-{self.port}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                *prefix,
                *MESHTRUST,
                *options,
                "ca",
                "serve",
                "--ca-dir",
                str(ca_dir),
                "--listen",
                self.address,
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"CA exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.metrics_port}/ready", timeout=1
                ) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"CA not ready after {timeout}s:\n{self.log()}")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
