"""The injector on the wire: HTTPS, ``POST /inject`` (AdmissionReview in, AdmissionReview
out) and ``GET /ready``, on a small threaded server (admission calls are few and short).

Namespace labels come from the API server through :class:`NamespaceLabelCache`, cached for
a few seconds: a Deployment scaled to 100 replicas asks about the same namespace 100 times.
"""

from __future__ import annotations

import http.server
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from meshtrust.errors import MeshTrustError
from meshtrust.injector.inject import InjectorSettings
from meshtrust.injector.webhook import InvalidReview, NamespaceLabels, review_response

__all__ = ["InjectorServer", "NamespaceLabelCache"]

log = logging.getLogger("meshtrust.injector")
MAX_REVIEW_BYTES = 8 * 1024 * 1024
LABELS_TTL = 5.0
#: Per connection, for the TLS handshake and each read: a client that connects and stalls
#: holds one thread this long, never the accept loop.
CONNECTION_TIMEOUT = 10.0


class _TlsPerThreadServer(http.server.ThreadingHTTPServer):
    """Accepts plain TCP and does the TLS handshake on the connection's own thread.

    Wrapping the listening socket would run every handshake inside ``accept()`` on the one
    serving thread, where a client that connects and sends nothing stops the webhook.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler],
                 ssl_context: ssl.SSLContext) -> None:  # fmt: skip
        super().__init__(address, handler)
        self.ssl_context = ssl_context

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class NamespaceLabelCache:
    """``labels_of(namespace)`` through ``fetch`` (a GET of the Namespace), kept ``ttl`` s."""

    def __init__(
        self,
        fetch: Callable[[str], Mapping[str, Any]],
        ttl: float = LABELS_TTL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._monotonic = monotonic
        self._cache: dict[str, tuple[float, Mapping[str, str]]] = {}
        self._lock = threading.Lock()

    def __call__(self, namespace: str) -> Mapping[str, str]:
        now = self._monotonic()
        with self._lock:
            hit = self._cache.get(namespace)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        obj = self._fetch(namespace)
        meta = obj.get("metadata")
        raw = meta.get("labels") if isinstance(meta, Mapping) else None
        labels = (
            {str(k): str(v) for k, v in (raw or {}).items()} if isinstance(raw, Mapping) else {}
        )
        with self._lock:
            self._cache[namespace] = (now, labels)
        return labels


class InjectorServer:
    """The webhook's HTTPS server, on a thread; :meth:`start`, :meth:`stop`."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        labels_of: NamespaceLabels,
        settings: InjectorSettings,
    ) -> None:
        outer = self
        self.settings = settings
        self.labels_of = labels_of

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] in ("/ready", "/healthz"):
                    self._send(200, b"ready\n", "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                if self.path.split("?")[0] != "/inject":
                    self._send(404, b"not found\n", "text/plain")
                    return
                try:
                    length = int(self.headers.get("Content-Length") or "-1")
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_REVIEW_BYTES:
                    self._send(400, b"a Content-Length up to 8 MiB is required\n", "text/plain")
                    return
                body = self.rfile.read(length)
                try:
                    answer = review_response(body, outer.labels_of, outer.settings)
                except InvalidReview as exc:
                    self._send(400, f"{exc}\n".encode(), "text/plain")
                    return
                except MeshTrustError as exc:  # pragma: no cover - review_response maps ours
                    log.error("injection failed: %s", exc)
                    self._send(500, f"{exc}\n".encode(), "text/plain")
                    return
                outer.log_answer(answer)
                self._send(200, json.dumps(answer).encode())

            timeout = CONNECTION_TIMEOUT

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("%s " + format, self.address_string(), *args)

        self._httpd = _TlsPerThreadServer((host, port), Handler, ssl_context)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @staticmethod
    def log_answer(answer: Mapping[str, Any]) -> None:
        response = answer.get("response", {})
        if "patch" in response:
            log.info("injected a sidecar (review %s)", response.get("uid"))
        elif not response.get("allowed", True):
            log.warning("refused review %s: %s", response.get("uid"),
                        response.get("status", {}).get("message"))  # fmt: skip

    def start(self) -> None:
        self._thread.start()

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop_soon(self) -> None:
        """Stop from a signal handler (which runs on the serving thread itself)."""
        threading.Thread(target=self.stop, daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
