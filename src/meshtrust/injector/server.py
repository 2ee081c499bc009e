"""The injector on the wire: HTTPS, ``POST /inject`` (AdmissionReview in, AdmissionReview
out) and ``GET /ready``, on a small threaded server (admission calls are few and short).

Its serving certificate is short-lived (``meshtrust injector cert`` signs it with the mesh's
CA), so :class:`ReloadingTlsContext` re-reads the certificate and key files when they change
— a Secret volume update, cert-manager renewing it, the command run again — with no restart.

Namespace labels come from the API server through :class:`NamespaceLabelCache`, cached for
a few seconds: a Deployment scaled to 100 replicas asks about the same namespace 100 times.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meshtrust.errors import ConfigError, MeshTrustError
from meshtrust.fileio import load_cert_chain_pem
from meshtrust.injector.inject import InjectorSettings
from meshtrust.injector.webhook import InvalidReview, NamespaceLabels, review_response

__all__ = ["InjectorServer", "NamespaceLabelCache", "ReloadingTlsContext"]

log = logging.getLogger("meshtrust.injector")
MAX_REVIEW_BYTES = 8 * 1024 * 1024
LABELS_TTL = 5.0
#: Per connection, for the TLS handshake and each read: a client that connects and stalls
#: holds one thread this long, never the accept loop.
CONNECTION_TIMEOUT = 10.0
#: How often, at most, the serving certificate's files are looked at (on a connection).
RELOAD_CHECK_INTERVAL = 1.0


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context from the PEM files; :class:`ConfigError` saying which pair
    and why when they do not load (never the key's bytes)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        load_cert_chain_pem(ctx, cert.read_bytes(), key.read_bytes())
    except ssl.SSLError as exc:  # an OSError too: first
        raise ConfigError(
            f"{cert} / {key}: not a usable certificate and key ({exc.reason})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{exc.filename or cert}: cannot read: {exc.strerror}") from None
    return ctx


class ReloadingTlsContext:
    """The serving context for ``cert`` + ``key``, rebuilt when either file changes.

    Checked at most every ``interval`` seconds, from the connection threads (a stat of two
    files). A pair that does not load — a half-written update, a key that does not match —
    is logged once and the last good context stays in use; the next change is tried again.
    The first load happens in the constructor and raises :class:`ConfigError`.
    """

    def __init__(
        self,
        cert: Path,
        key: Path,
        interval: float = RELOAD_CHECK_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cert, self._key = cert, key
        self._interval = interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stamp = self._read_stamp()
        self._context = _server_context(cert, key)
        self._checked = monotonic()
        self.reloads = 0
        self.failures = 0

    def _read_stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in (self._cert, self._key):
            try:
                st = os.stat(path)  # through the Secret volume's ..data symlink
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def current(self) -> ssl.SSLContext:
        now = self._monotonic()
        with self._lock:
            if now - self._checked < self._interval:
                return self._context
            self._checked = now
            stamp = self._read_stamp()
            if stamp == self._stamp:
                return self._context
            self._stamp = stamp
            try:
                self._context = _server_context(self._cert, self._key)
            except ConfigError as exc:
                self.failures += 1
                log.error("serving certificate not reloaded, keeping the last good one: %s", exc)
            else:
                self.reloads += 1
                log.info("serving certificate reloaded from %s", self._cert)
            return self._context


class _TlsPerThreadServer(http.server.ThreadingHTTPServer):
    """Accepts plain TCP and does the TLS handshake on the connection's own thread.

    Wrapping the listening socket would run every handshake inside ``accept()`` on the one
    serving thread, where a client that connects and sends nothing stops the webhook.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler],
                 ssl_context: Callable[[], ssl.SSLContext]) -> None:  # fmt: skip
        super().__init__(address, handler)
        self.ssl_context = ssl_context

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT)
        try:
            tls = self.ssl_context().wrap_socket(request, server_side=True)
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
        ssl_context: ssl.SSLContext | ReloadingTlsContext,
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

        contexts: Callable[[], ssl.SSLContext] = (
            ssl_context.current
            if isinstance(ssl_context, ReloadingTlsContext)
            else lambda: ssl_context
        )
        self._httpd = _TlsPerThreadServer((host, port), Handler, contexts)
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
