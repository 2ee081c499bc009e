"""A small HTTP server for ``/metrics`` (Prometheus), readiness and a JSON status, on a
thread (``/debug/status``: what ``meshtrust status`` shows; no secrets in it).

Used by the CA (``/ready``) and the agent (``/healthz/ready``, Istio's path); both paths
answer on both. ``/metrics`` renders a registry that renders itself: both use
:class:`meshtrust.metrics_text.TextRegistry`.
"""

from __future__ import annotations

import errno
import http.server
import json
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from meshtrust.errors import AddressInUse, ConfigError
from meshtrust.metrics_text import CONTENT_TYPE

__all__ = ["MetricsRegistry", "StatusHttpServer", "TextExposition"]


class TextExposition(Protocol):
    """A registry that renders itself (:class:`meshtrust.metrics_text.TextRegistry`)."""

    def exposition(self) -> bytes: ...


#: What ``/metrics`` serves.
MetricsRegistry = TextExposition


class StatusHttpServer:
    """``/metrics`` (Prometheus) and ``/ready`` on a small HTTP server thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: MetricsRegistry,
        ready: Callable[[], bool | tuple[bool, str]],
        status: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        """``ready`` answers readiness: a bool, or (ready, why not) to say why in the 503."""
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] == "/metrics":
                    body, ctype, code = outer.registry.exposition(), CONTENT_TYPE, 200
                elif self.path.split("?")[0] in ("/ready", "/healthz/ready"):
                    answer = outer.ready()
                    ok, reason = answer if isinstance(answer, tuple) else (answer, "")
                    text = "ready" if ok else f"not ready: {reason}" if reason else "not ready"
                    body = f"{text}\n".encode()
                    ctype, code = "text/plain; charset=utf-8", 200 if ok else 503
                elif self.path.split("?")[0] == "/debug/status" and outer.status is not None:
                    body = json.dumps(outer.status(), indent=2, default=str).encode()
                    ctype, code = "application/json", 200
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.registry = registry
        self.ready = ready
        self.status = status
        try:
            self._httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    f"metrics listen address {host}:{port} is already in use"
                ) from exc
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, daemon=True, name="ca-status-http"
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
