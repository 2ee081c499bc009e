"""Fakes for the agent's sidecar collaborators: an Envoy launcher and a policy source that
implement the protocols of :mod:`meshtrust.agent.sidecar` in memory, on a fake clock."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtrust.clock import FakeClock
from meshtrust.errors import EnvoyFailed, PolicyError
from meshtrust.policy import PolicySet

__all__ = ["FakeEnvoy", "FakeLauncher", "FakePolicies"]


@dataclass
class FakeEnvoy:
    """An Envoy that starts (or fails to) at once, dies on request and says LIVE when
    running. ``starts`` records the fake clock's time of every start attempt.

    Like the real one it reports as active every listener of its bootstrap and of its LDS
    file (read from disk, as Envoy does), except those named in ``unbound`` (their port is
    taken by another process)."""

    clock: FakeClock
    fail_starts: int = 0
    says_live: bool = True
    starts: list[float] = field(default_factory=list)
    stops: int = 0
    running: bool = False
    pid: int | None = None
    admin_url: str | None = None
    bootstrap: Mapping[str, Any] = field(default_factory=dict)
    unbound: set[str] = field(default_factory=set)
    admin_answers: bool = True
    _lds_names: set[str] = field(default_factory=set)

    async def start(self) -> None:
        self.starts.append(self.clock.monotonic())
        if self.fail_starts > 0:
            self.fail_starts -= 1
            raise EnvoyFailed("envoy-web: Envoy exited with status 1 while starting")
        self.running, self.pid = True, 4000 + len(self.starts)
        self.admin_url = "unix:///run/web/envoy/admin.sock"

    async def stop(self) -> None:
        self.running = False
        self.stops += 1

    async def ready(self) -> bool:
        return self.running and self.says_live

    async def active_listeners(self) -> frozenset[str] | None:
        if not (self.running and self.admin_answers):
            return None
        names = {item["name"] for item in self.bootstrap["static_resources"]["listeners"]}
        lds = self.bootstrap["dynamic_resources"]["lds_config"]["path_config_source"]["path"]
        try:  # Envoy keeps the listeners of the last file it could read
            self._lds_names = {
                item["name"] for item in json.loads(Path(lds).read_text())["resources"]
            }
        except (OSError, ValueError):
            pass
        return frozenset((names | self._lds_names) - self.unbound)

    def log_tail(self) -> str:
        return "[warning] fake Envoy log"

    def die(self) -> None:
        self.running = False


@dataclass
class FakeLauncher:
    envoy: FakeEnvoy
    prepared: list[tuple[Mapping[str, Any], Path, str]] = field(default_factory=list)

    def prepare(self, bootstrap: Mapping[str, Any], workdir: Path, name: str) -> FakeEnvoy:
        self.prepared.append((bootstrap, workdir, name))
        self.envoy.bootstrap = bootstrap
        return self.envoy


@dataclass
class FakePolicies:
    """A policy source holding a PolicySet (or the error loading it would raise)."""

    current: PolicySet | PolicyError
    pending: bool = False
    loads: int = 0

    def load(self) -> PolicySet:
        self.loads += 1
        self.pending = False
        if isinstance(self.current, PolicyError):
            raise self.current
        return self.current

    def changed(self) -> bool:
        return self.pending

    def edit(self, policies: PolicySet | PolicyError) -> None:
        self.current, self.pending = policies, True
