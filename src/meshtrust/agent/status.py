"""The agent's status port: ``/healthz/ready`` (Istio's path; ``/ready`` too), ``/metrics``
(Prometheus text), ``/stats/prometheus`` (the agent's metrics followed by its Envoy's, as
istio-agent merges them on port 15020: one scrape per workload) and ``/debug/status`` (what
``meshtrust status`` shows; no secrets).

Envoy's stats come from its admin API on its Unix socket (the admin API never listens on
TCP), fetched for each scrape by :func:`fetch_unix_http` on the event loop: not through
``http.client`` on a worker thread, whose malloc arena kept ~0.6 MB of each ~140 KiB answer
(``benchmarks/stats_scrape.py``). When Envoy does not answer, ``/stats/prometheus`` still serves
the agent's own metrics, with ``meshtrust_agent_envoy_stats_up 0``, so a scrape shows the
agent's view (certificate expiry, failed rotations) exactly when Envoy is in trouble.

Served on the agent's own event loop with :func:`asyncio.start_server` rather than
``http.server`` on a thread: the answers are read from the agent's state on the thread that
changes it (no snapshot half-way through a rotation), and the long-lived agent carries
neither a thread nor ``http.server``'s imports (``email``, ``html``, ``mimetypes``, a reverse
DNS lookup at bind) — about 1.5 MB of its resident memory. One request per connection
(``Connection: close``), GET and HEAD only, request heads capped at 8 KiB and 10 s.

:func:`route` is the pure part: path in, status, content type and body out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from meshtrust.errors import AddressInUse, ConfigError
from meshtrust.metrics_text import CONTENT_TYPE

__all__ = [
    "MERGED_STATS",
    "EnvoyStats",
    "StatusServer",
    "TextExposition",
    "fetch_unix_http",
    "merge_stats",
    "parse_http_response",
    "route",
]

log = logging.getLogger("meshtrust.agent")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[503] = "Service Unavailable"
_MAX_HEAD = 8192
_MAX_ANSWER = 64 << 20  # Envoy's stats: ~140 KiB for a sidecar with a few clusters


class TextExposition(Protocol):
    """A registry that renders itself (:class:`meshtrust.metrics_text.TextRegistry`)."""

    def exposition(self) -> bytes: ...


StatusSnapshot = Callable[[], Mapping[str, object]]
#: Envoy's ``/stats/prometheus`` body, or None when Envoy does not answer.
EnvoyStats = Callable[[], Awaitable[bytes | None]]

MERGED_STATS = "/stats/prometheus"


def _envoy_stats_up(up: bool) -> bytes:
    name = "meshtrust_agent_envoy_stats_up"
    return (
        f"# HELP {name} 1 when this scrape includes the sidecar Envoy's stats, else 0.\n"
        f"# TYPE {name} gauge\n{name} {1.0 if up else 0.0}\n"
    ).encode()


def merge_stats(own: bytes, envoy: bytes | None) -> bytes:
    """The agent's exposition followed by Envoy's (their names never collide: Envoy's all
    start ``envoy_``), with the gauge saying whether Envoy's part is there."""
    if envoy is None:
        return own + _envoy_stats_up(False)
    if envoy and not envoy.endswith(b"\n"):
        envoy += b"\n"
    return own + _envoy_stats_up(True) + envoy


def route(
    path: str,
    registry: TextExposition,
    ready: Callable[[], bool],
    status: StatusSnapshot | None,
    envoy: bytes | None = None,
    *,
    sidecar: bool = False,
) -> tuple[int, str, bytes]:
    """The answer to ``GET path`` (query string ignored): (status code, type, body).
    With a ``sidecar``, :data:`MERGED_STATS` adds ``envoy``, its Envoy's stats (None: Envoy
    did not answer); without, it is the agent's metrics alone."""
    path = path.split("?", 1)[0]
    if path == "/metrics":
        return 200, CONTENT_TYPE, registry.exposition()
    if path == MERGED_STATS:
        own = registry.exposition()
        return 200, CONTENT_TYPE, merge_stats(own, envoy) if sidecar else own
    if path in ("/ready", "/healthz/ready"):
        ok = ready()
        return (200, "text/plain", b"ready\n") if ok else (503, "text/plain", b"not ready\n")
    if path == "/debug/status" and status is not None:
        body = json.dumps(status(), indent=2, default=str).encode()
        return 200, "application/json", body
    return 404, "text/plain", b"not found\n"


def parse_http_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.1 response read until the server closed (the body
    ``Content-Length`` long, chunked, or up to the close). Raises :class:`ValueError` when
    it is not one."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("not an HTTP/1.x response")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if headers.get(b"transfer-encoding") == b"chunked":
        return int(parts[1]), _dechunk(rest)
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(rest) < length:
            raise ValueError("response body shorter than its Content-Length")
        return int(parts[1]), rest[:length]
    return int(parts[1]), rest


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    at = 0
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            raise ValueError("chunked body cut short")
        size = int(data[at:end].split(b";", 1)[0], 16)  # ValueError for a bad size
        if size == 0:
            return b"".join(out)
        start = end + 2
        if len(data) < start + size + 2:
            raise ValueError("chunked body cut short")
        out.append(data[start : start + size])
        at = start + size + 2


async def fetch_unix_http(socket_path: str, target: str, timeout: float) -> tuple[int, bytes]:
    """GET ``target`` over HTTP/1.1 on the Unix socket ``socket_path``: (status, body).
    Raises :class:`OSError` (no answer: missing socket, refused, ``TimeoutError``) or
    :class:`ValueError` (an answer that is not HTTP)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            pieces: list[bytes] = []
            size = 0
            while piece := await reader.read(1 << 16):  # to the close: Connection: close
                pieces.append(piece)
                size += len(piece)
                if size > _MAX_ANSWER:
                    raise ValueError(f"answer to {target} larger than {_MAX_ANSWER} bytes")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return parse_http_response(b"".join(pieces))


def _response(code: int, ctype: str, body: bytes, *, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + (b"" if head_only else body)


class StatusServer:
    """The status port on ``host:port`` (0: any free port; :attr:`port` says which)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: TextExposition,
        ready: Callable[[], bool],
        status: StatusSnapshot | None = None,
        *,
        envoy_stats: EnvoyStats | None = None,
        timeout: float = 10.0,
    ) -> None:
        """``envoy_stats`` fetches the sidecar Envoy's stats (None: no sidecar, and
        :data:`MERGED_STATS` serves the agent's metrics alone)."""
        self.host, self.port = host, port
        self.registry, self.ready, self.status = registry, ready, status
        self.envoy_stats = envoy_stats
        self.timeout = timeout
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen. Raises :class:`AddressInUse` or :class:`ConfigError`."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=_MAX_HEAD
            )
        except OSError as exc:
            where = f"{self.host}:{self.port}"
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"status listen address {where} is already in use") from exc
            raise ConfigError(f"cannot listen on {where}: {exc.strerror}") from exc
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(await self._answer(head))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # a client that went away or sent too much: nothing to answer
        except ConnectionError:
            pass
        except Exception:  # a bug in a snapshot must not take the port down
            log.exception("status port: request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response(400, "text/plain", b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain", b"only GET\n")
        envoy = None
        if target.split("?", 1)[0] == MERGED_STATS and self.envoy_stats is not None:
            envoy = await self.envoy_stats()
        code, ctype, body = route(
            target,
            self.registry,
            self.ready,
            self.status,
            envoy,
            sidecar=self.envoy_stats is not None,
        )
        return _response(code, ctype, body, head_only=method == "HEAD")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
