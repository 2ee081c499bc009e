"""The dashboard's HTTP server: the page, its two assets and ``/api/state``, on loopback.

Two threads: one HTTP server (stdlib, as :mod:`meshtrust.status_http`), and one that
observes the mesh every ``interval`` seconds and feeds a :class:`~.model.Tracker`. A request
never observes anything itself: it is answered from the latest snapshot, so ten open tabs
cost the mesh nothing more than one.

Read-only: GET and HEAD only. The assets ship in the package (no CDN: it works offline).
The Host header must name the loopback address it was reached at — a page from elsewhere
that rebinds its own DNS name to 127.0.0.1 gets nothing (421).
"""

from __future__ import annotations

import errno
import http.server
import json
import logging
import socket
import threading
from collections.abc import Callable
from importlib import resources

from meshtrust.dashboard.model import Observation, Tracker
from meshtrust.errors import AddressInUse, ConfigError

__all__ = ["ASSETS", "DashboardServer"]

log = logging.getLogger(__name__)

#: Path -> (asset file, content type): everything the page loads.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}

_CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"


def _asset(name: str) -> bytes:
    return resources.files("meshtrust.dashboard").joinpath("assets", name).read_bytes()


class DashboardServer:
    """Bound at construction (a taken port fails before the mesh starts); serving from
    :meth:`start` until :meth:`stop`."""

    def __init__(self, host: str, port: int, tracker: Tracker | None = None) -> None:
        """Raises AddressInUse when ``host:port`` is taken, ConfigError when it cannot be
        bound at all."""
        self.tracker = tracker or Tracker()
        self._lock = threading.Lock()
        self._state = json.dumps(self.tracker.snapshot()).encode()
        self._assets = {path: (_asset(name), ctype) for path, (name, ctype) in ASSETS.items()}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._on_stop: Callable[[], None] | None = None
        server_class = _Server6 if ":" in host else _Server4
        try:
            self._httpd = server_class((host, port), self._handler())
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"dashboard.listen {host}:{port} is already in use") from exc
            raise ConfigError(f"dashboard cannot listen on {host}:{port}: {exc.strerror}") from exc
        self.host, self.port = host, int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(
        self,
        observe: Callable[[], Observation],
        interval: float = 1.0,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        """Serve, and observe the mesh with ``observe`` every ``interval`` seconds;
        ``on_stop`` is called once the observing has stopped (it closes what ``observe``
        reads)."""
        self._on_stop = on_stop
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, daemon=True, name="dashboard"),
            threading.Thread(
                target=self._poll, args=(observe, interval), daemon=True, name="dashboard-poll"
            ),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._threads:
            self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._on_stop is not None:
            self._on_stop()
            self._on_stop = None

    def state_json(self) -> bytes:
        with self._lock:
            return self._state

    def _poll(self, observe: Callable[[], Observation], interval: float) -> None:
        while not self._stopping.is_set():
            try:
                obs = observe()
            except Exception as exc:  # noqa: BLE001
                # A failed look is logged and the next one tried: one bad answer from one
                # agent must not freeze the page for good.
                log.warning("dashboard: observing the mesh failed: %s", exc)
            else:
                with self._lock:
                    self.tracker.ingest(obs)
                    self._state = json.dumps(self.tracker.snapshot()).encode()
            self._stopping.wait(interval)

    def _allowed_hosts(self) -> set[str]:
        names = {self.host, "localhost", "127.0.0.1", "[::1]"}
        return {f"{n}:{self.port}" for n in names} | {
            f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        }

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "meshtrust-dashboard"
            sys_version = ""

            def do_GET(self) -> None:  # noqa: N802
                self._answer(head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(head=True)

            def _answer(self, head: bool) -> None:
                path = self.path.split("?")[0]
                if self.headers.get("Host", "") not in outer._allowed_hosts():
                    body, ctype, code = b"misdirected request\n", "text/plain", 421
                elif path == "/api/state":
                    body, ctype, code = outer.state_json(), "application/json", 200
                elif path in outer._assets:
                    (body, ctype), code = outer._assets[path], 200
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Security-Policy", _CSP)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return Handler


class _Server4(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Server6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
