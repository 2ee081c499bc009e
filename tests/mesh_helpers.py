"""Running small meshes in tests: write mesh.yaml + policies, start, always stop."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from meshtrust.envoy import EnvoyAdmin
from meshtrust.mesh import MeshState, load_mesh_config, start_mesh, stop_mesh
from tests.processes import free_port


def meshtrust(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m meshtrust ARGS`` with its own ``MESHTRUST_HOME`` (where `up` records meshes)."""
    return subprocess.run(
        [sys.executable, "-m", "meshtrust", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MESHTRUST_HOME": str(home)},
    )


ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "quickstart" / "app.py"

#: The steps of `meshtrust check`, in the order a user reads them (ids in --json).
CHECK_WALK = [
    "agent",
    "app",
    "envoy",
    "certificate",
    "chain",
    "identity",
    "envoy-cert",
    "time-left",
    "policy",
    "tls-errors",
    "rbac",
]

TCP_ECHO = """
import os, socket, threading
srv = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
def serve(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(b"echo:" + data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def write_mesh(
    directory: Path, services: list[dict[str, Any]], policies: str, cert_ttl: str = "30s"
) -> Path:
    """A mesh file in ``directory``; every port not given is picked free."""
    for svc in services:
        svc.setdefault("port", free_port())
        svc.setdefault("inboundPort", free_port())
        for up in svc.get("upstreams", []):
            up.setdefault("localPort", free_port())
    (directory / "policies.yaml").write_text(policies)
    (directory / "tcp_echo.py").write_text(TCP_ECHO)
    mesh = {
        "trustDomain": "cluster.local",
        "certTTL": cert_ttl,
        "workDir": str(directory / "work"),
        "ca": {"listen": f"127.0.0.1:{free_port()}"},
        "services": services,
        "policies": ["policies.yaml"],
    }
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    return path


@contextlib.contextmanager
def running_mesh(path: Path) -> Iterator[MeshState]:
    """Start the mesh of ``path`` (its "current mesh" pointer kept beside it, not in the
    user's ~/.meshtrust) and always stop it."""
    old = os.environ.get("MESHTRUST_HOME")
    os.environ["MESHTRUST_HOME"] = str(path.parent / "home")
    try:
        state = start_mesh(load_mesh_config(path), progress=lambda _: None)
        try:
            yield state
        finally:
            stop_mesh(state)
    finally:
        if old is None:
            del os.environ["MESHTRUST_HOME"]
        else:
            os.environ["MESHTRUST_HOME"] = old


def upstream_port(state: MeshState, service: str, upstream: str) -> int:
    return state.service(service).upstreams[upstream]


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    """One request as the app would make it: plain HTTP to its sidecar's local port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def tcp_roundtrip(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> bytes:
    """Send ``payload`` through a TCP upstream; b"" when the connection was closed on us."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(payload)
        try:
            return conn.recv(4096)
        except ConnectionResetError:
            return b""


def agent_status(state: MeshState, service: str) -> dict[str, Any]:
    url = f"http://{state.service(service).status}/debug/status"
    with urllib.request.urlopen(url, timeout=5) as resp:
        data = json.loads(resp.read())
    assert isinstance(data, dict)
    return data


def envoy_serial(state: MeshState, service: str) -> int:
    admin = agent_status(state, service)["envoy"]["admin"]  # unix:///.../envoy/admin.sock
    status, body = EnvoyAdmin.at(admin).get("/certs", timeout=5)
    assert status == 200, body
    certs = json.loads(body)
    for entry in certs["certificates"]:
        for cert in entry.get("cert_chain", []):
            return int(cert["serial_number"], 16)
    return 0


# --------------------------------------------------------------------------------------------
# The `status --json` schema, read from its documentation (docs/status-json.md) so the two
# cannot drift apart.

STATUS_DOC = ROOT / "docs" / "status-json.md"
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_SERIAL = re.compile(r"^[0-9a-f]{32}$")  # as the doc says: 32 digits


def status_schema() -> dict[str, tuple[str, bool]]:
    """``{field path: (type, nullable)}`` from the doc's tables (`services[].envoy.pid`)."""
    fields: dict[str, tuple[str, bool]] = {}
    for line in STATUS_DOC.read_text().splitlines():
        m = re.match(r"^\| `([^`]+)` \| ([a-z]+)( or null)? \|", line)
        if m:
            fields[m.group(1)] = (m.group(2), m.group(3) is not None)
    return fields


def status_example() -> Any:
    text = STATUS_DOC.read_text()
    return json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])


def _fields(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every field; the objects of an array are walked, not listed."""
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            yield child, item
            yield from _fields(item, child)
    elif isinstance(value, list):
        for item in value:
            yield from _fields(item, f"{path}[]")


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "timestamp":
        return isinstance(value, str) and bool(_TIMESTAMP.match(value))
    if kind == "serial":
        return isinstance(value, str) and bool(_SERIAL.match(value))
    types = {"string": str, "boolean": bool, "object": dict, "array": list}
    return isinstance(value, types[kind])


def assert_status_schema(document: Any) -> None:
    """``document`` has exactly the documented fields, each of its documented type."""
    schema = status_schema()
    assert len(schema) > 30  # the doc's tables were read
    seen: set[str] = set()
    for path, value in _fields(document):
        assert path in schema, f"{path} is not in {STATUS_DOC.name}"
        kind, nullable = schema[path]
        seen.add(path)
        if value is None:
            assert nullable, f"{path} is null but documented as {kind}"
        else:
            assert _type_ok(kind, value), f"{path} = {value!r} is not a {kind}"
    listed = {
        p
        for p in schema
        if not any(p.startswith(f"{a}[]") and not document[a] for a in ("services", "identities"))
    }
    assert listed <= seen, f"documented but missing: {sorted(listed - seen)}"
