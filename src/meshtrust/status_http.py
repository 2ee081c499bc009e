"""A small HTTP server for ``/metrics`` (Prometheus), readiness and a JSON status, on a
thread (``/debug/status``: what ``meshtrust status`` shows; no secrets in it).

Used by the CA (``/ready``) and the agent (``/healthz/ready``, Istio's path); both paths
answer on both. ``/metrics`` renders either a ``prometheus_client`` ``CollectorRegistry`` (the
CA's) or any registry with an ``exposition()`` method, such as
:class:`meshtrust.metrics_text.TextRegistry` (the agent's, which spares the agent
prometheus_client: it is imported only for a ``CollectorRegistry``).
"""

from __future__ import annotations

import errno
import http.server
import json
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypeAlias, cast

from meshtrust.errors import AddressInUse, ConfigError
from meshtrust.metrics_text import CONTENT_TYPE

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["MetricsRegistry", "StatusHttpServer", "TextExposition"]


class TextExposition(Protocol):
    """A registry that renders itself (:class:`meshtrust.metrics_text.TextRegistry`)."""

    def exposition(self) -> bytes: ...


#: What ``/metrics`` serves: a ``prometheus_client.CollectorRegistry``, or a registry that
#: renders itself.
MetricsRegistry: TypeAlias = "CollectorRegistry | TextExposition"


def _exposition(registry: MetricsRegistry) -> Callable[[], tuple[bytes, str]]:
    """How to render ``registry``: its own ``exposition()``, or prometheus_client's."""
    render: Callable[[], bytes] | None = getattr(registry, "exposition", None)
    if render is not None:

        def text() -> tuple[bytes, str]:
            return render(), CONTENT_TYPE

        return text
    from prometheus_client import generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    collectors = cast("CollectorRegistry", registry)

    def prometheus() -> tuple[bytes, str]:
        return generate_latest(collectors), CONTENT_TYPE_LATEST

    return prometheus


class StatusHttpServer:
    """``/metrics`` (Prometheus) and ``/ready`` on a small HTTP server thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: MetricsRegistry,
        ready: Callable[[], bool],
        status: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] == "/metrics":
                    (body, ctype), code = outer._metrics(), 200
                elif self.path.split("?")[0] in ("/ready", "/healthz/ready"):
                    ok = outer.ready()
                    body = b"ready\n" if ok else b"not ready\n"
                    ctype, code = "text/plain", 200 if ok else 503
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

        self._metrics = _exposition(registry)
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
