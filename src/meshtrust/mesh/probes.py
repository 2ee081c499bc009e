"""Looking at a running mesh from outside: is a process alive, what does an agent's
``/debug/status`` say, what are an Envoy's stats. Short timeouts; a component that does not
answer gives None (or an empty result), never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from meshtrust.mesh.state import ServiceState

__all__ = ["agent_status", "alive", "envoy_stats", "fetch"]


def alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie, i.e. our child that exited, does not)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def fetch(url: str, timeout: float = 1.0) -> str | None:
    """The body of a GET, or None when nothing (good) answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.read().decode(errors="replace"))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def agent_status(svc: ServiceState, timeout: float = 2.0) -> dict[str, Any] | None:
    """The agent's ``/debug/status`` JSON, or None when it does not answer."""
    raw = fetch(f"http://{svc.status}/debug/status", timeout=timeout)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def envoy_stats(
    admin: str | None, pattern: str = "", timeout: float = 2.0
) -> dict[str, int] | None:
    """Envoy's numeric stats whose name matches ``pattern`` (a regex); None when Envoy (or
    its admin address) is not there."""
    if not admin:
        return None
    url = f"{admin}/stats?filter={urllib.parse.quote(pattern)}" if pattern else f"{admin}/stats"
    text = fetch(url, timeout=timeout)
    if text is None:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out
