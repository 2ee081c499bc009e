"""Envoy's admin API, reached over its Unix socket: the one client every tool uses.

The admin API can switch Envoy to trace logging (request headers, bearer tokens included,
into the log), stop it (``/quitquitquit``), fail its health checks and dump its config, so it
never listens on TCP, where every local user reaches it. The bootstrap puts it on a Unix
socket created 0600 (:func:`~meshtrust.envoy.bootstrap.admin`) in the workload's Envoy
directory (0700): only the agent's user can open it. The agent, ``meshtrust status``,
``check``, ``proxy-config``, ``certs monitor`` and the tests all talk to it through
:class:`EnvoyAdmin`.

An admin *address*, as the agent reports it in its status (``envoy.admin``), is
``unix://`` followed by the socket's absolute path (:func:`admin_address`), the form of
``SPIFFE_ENDPOINT_SOCKET``.

Blocking on purpose (``http.client``): asyncio callers go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["ADMIN_SOCKET", "EnvoyAdmin", "admin_address", "active_listener_names"]

#: The admin socket's name in the workload's Envoy directory.
ADMIN_SOCKET = "admin.sock"

_SCHEME = "unix://"


def admin_address(socket_path: Path | str) -> str:
    """The address of the admin API on ``socket_path``: ``unix:///abs/path``."""
    return _SCHEME + os.path.abspath(socket_path)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix stream socket (``http.client`` only knows TCP)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class EnvoyAdmin:
    """Envoy's admin API on the Unix socket ``socket_path``."""

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = Path(socket_path)

    @classmethod
    def at(cls, address: str) -> EnvoyAdmin:
        """The admin API at ``address`` (``unix:///path``, see :func:`admin_address`).

        Raises :class:`ValueError` for anything else: an ``http://`` address is an agent from
        before the admin API moved to a socket.
        """
        if not address.startswith(_SCHEME + "/"):
            raise ValueError(f"{address!r} is not an Envoy admin address (unix:///PATH)")
        return cls(address[len(_SCHEME) :])

    @property
    def address(self) -> str:
        return admin_address(self.socket_path)

    def get(self, path: str, *, timeout: float = 2.0) -> tuple[int, str]:
        """GET ``path`` (``/stats?filter=...``): the status and the body.

        Raises :class:`OSError` when the socket cannot be reached (missing: Envoy is not
        running; ``PermissionError``: it is not ours) or the answer is not HTTP.
        """
        conn = _UnixHTTPConnection(os.fspath(self.socket_path), timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        except http.client.HTTPException as exc:
            raise OSError(f"Envoy admin {path}: {exc!r}") from exc
        finally:
            conn.close()

    def text(self, path: str, *, timeout: float = 2.0) -> str | None:
        """The body of a 200 answer to ``path``, or None when nothing (good) answers."""
        try:
            status, body = self.get(path, timeout=timeout)
        except OSError:
            return None
        return body if status == 200 else None

    def json(self, path: str, *, timeout: float = 2.0) -> Any:
        """The JSON body of a 200 answer to ``path``, or None (no answer, or not JSON)."""
        body = self.text(path, timeout=timeout)
        if body is None:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None


def active_listener_names(listeners_json: Any) -> frozenset[str] | None:
    """The names of the active listeners in ``/listeners?format=json`` (Envoy 1.40 lists a
    listener there only once it is bound and serving: one that failed to bind, or is still
    warming, is absent); None when the document is not that listing."""
    if not isinstance(listeners_json, dict):
        return None
    statuses = listeners_json.get("listener_statuses")
    if statuses is None:
        return frozenset()  # no listener at all: Envoy omits the empty list
    if not isinstance(statuses, list):
        return None
    return frozenset(
        s["name"] for s in statuses if isinstance(s, dict) and isinstance(s.get("name"), str)
    )
