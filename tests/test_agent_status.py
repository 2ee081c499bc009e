"""The agent's status port: the pure routing table, then the server on loopback port 0 with
a real HTTP client (``http.client``), including a hostile request and a taken port."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from meshtrust.agent.status import StatusServer, route
from meshtrust.errors import AddressInUse
from meshtrust.metrics_text import CONTENT_TYPE


@dataclass
class Registry:
    text: bytes = b"# TYPE istio_agent_num_outgoing_requests counter\n"

    def exposition(self) -> bytes:
        return self.text


@dataclass
class State:
    ok: bool = False
    snapshot: dict[str, object] = field(default_factory=lambda: {"spiffe_id": "spiffe://x/y"})


@pytest.mark.parametrize(
    ("path", "ready", "expected"),
    [
        ("/healthz/ready", True, (200, "text/plain", b"ready\n")),
        ("/ready", True, (200, "text/plain", b"ready\n")),
        ("/healthz/ready", False, (503, "text/plain", b"not ready\n")),
        ("/healthz/ready?x=1", False, (503, "text/plain", b"not ready\n")),
        ("/metrics", False, (200, CONTENT_TYPE, Registry().text)),
        ("/nope", True, (404, "text/plain", b"not found\n")),
    ],
)
def test_route(path: str, ready: bool, expected: tuple[int, str, bytes]) -> None:
    assert route(path, Registry(), lambda: ready, None) == expected


def test_route_debug_status_is_json_only_when_there_is_a_snapshot() -> None:
    code, ctype, body = route("/debug/status", Registry(), lambda: True, lambda: {"a": 1})
    assert (code, ctype, json.loads(body)) == (200, "application/json", {"a": 1})
    assert route("/debug/status", Registry(), lambda: True, None)[0] == 404


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[StatusServer, State]]:
    state = State()
    srv = StatusServer("127.0.0.1", 0, Registry(), lambda: state.ok, lambda: state.snapshot)
    await srv.start()
    try:
        yield srv, state
    finally:
        await srv.stop()


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


@pytest.mark.asyncio
async def test_served_over_http(server: tuple[StatusServer, State]) -> None:
    srv, state = server
    assert srv.port != 0
    assert (await asyncio.to_thread(_get, srv.port, "/healthz/ready"))[0] == 503
    state.ok = True
    assert await asyncio.to_thread(_get, srv.port, "/healthz/ready") == (
        200,
        "text/plain",
        b"ready\n",
    )
    code, ctype, body = await asyncio.to_thread(_get, srv.port, "/debug/status")
    assert (code, ctype, json.loads(body)) == (200, "application/json", state.snapshot)
    code, ctype, body = await asyncio.to_thread(_get, srv.port, "/metrics")
    assert (code, ctype, body) == (200, CONTENT_TYPE, Registry().text)
    assert await asyncio.to_thread(_get, srv.port, "/metrics", "HEAD") == (200, CONTENT_TYPE, b"")
    assert (await asyncio.to_thread(_get, srv.port, "/metrics", "POST"))[0] == 405


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:  # the server closed with our excess bytes unread
            pass
        return b"".join(chunks)


@pytest.mark.asyncio
async def test_garbage_and_oversized_requests_are_refused_and_the_port_keeps_serving(
    server: tuple[StatusServer, State],
) -> None:
    srv, state = server
    answer = await asyncio.to_thread(_raw, srv.port, b"\x00\xff garbage\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"
    assert await asyncio.to_thread(_raw, srv.port, huge) == b""  # dropped, nothing echoed
    state.ok = True
    assert (await asyncio.to_thread(_get, srv.port, "/healthz/ready"))[0] == 200


@pytest.mark.asyncio
async def test_a_taken_port_is_a_clear_error(server: tuple[StatusServer, State]) -> None:
    srv, _ = server
    other = StatusServer("127.0.0.1", srv.port, Registry(), lambda: True)
    with pytest.raises(AddressInUse, match=f"127.0.0.1:{srv.port} is already in use"):
        await other.start()
