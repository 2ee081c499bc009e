"""The live web dashboard ``meshtrust up`` serves on loopback: the mesh as a graph (who
calls whom, allowed and denied, each node's mTLS mode), certificate timelines, the CA's
counts and a feed of events (docs/dashboard.md).

:mod:`.model` is the pure core (recent counts, events, the ``/api/state`` document);
:mod:`.observe` looks at the mesh, reusing what ``meshtrust status`` observes;
:mod:`.server` serves the packaged page and the state. It sits above :mod:`meshtrust.mesh`.
"""

from __future__ import annotations

from pathlib import Path

from meshtrust.clock import Clock, SystemClock
from meshtrust.config import parse_host_port
from meshtrust.dashboard.model import (
    Edge,
    EdgeCounters,
    LedgerCert,
    LedgerView,
    Observation,
    Tracker,
    edge_counters,
)
from meshtrust.dashboard.observe import LedgerReader, declared_edges, observe
from meshtrust.dashboard.server import ASSETS, DashboardServer
from meshtrust.errors import AddressInUse
from meshtrust.mesh.state import MeshState

__all__ = [
    "ASSETS",
    "DEFAULT_LISTEN",
    "DashboardServer",
    "Edge",
    "EdgeCounters",
    "LedgerCert",
    "LedgerReader",
    "LedgerView",
    "Observation",
    "Tracker",
    "bind_dashboard",
    "declared_edges",
    "edge_counters",
    "observe",
    "watch_mesh",
]

#: Where the dashboard listens without ``dashboard.listen`` (Kiali's port).
DEFAULT_LISTEN = "127.0.0.1:20001"


def bind_dashboard(listen: str | None) -> DashboardServer:
    """The dashboard server bound to ``listen`` (``dashboard.listen``, checked loopback when
    the mesh file was loaded). Without one, :data:`DEFAULT_LISTEN`, or any free loopback
    port when that is taken (another mesh's dashboard): the URL is printed either way.

    Raises AddressInUse when the ``listen`` given is taken."""
    host, port = parse_host_port(listen or DEFAULT_LISTEN, what="dashboard.listen")
    try:
        return DashboardServer(host, port)
    except AddressInUse:
        if listen is not None:
            raise
        return DashboardServer(host, 0)


def watch_mesh(
    server: DashboardServer, state: MeshState, clock: Clock | None = None, interval: float = 1.0
) -> None:
    """Start ``server`` on ``state``'s running mesh, observed every ``interval`` seconds
    (the CA's ledger too, on the CA's host: closed again by :meth:`DashboardServer.stop`)."""
    real = clock or SystemClock()
    ledger = None if state.ca is None else LedgerReader(Path(state.ca.ca_dir))

    def look() -> Observation:
        return observe(state, real, ledger)

    server.start(look, interval, on_stop=None if ledger is None else ledger.close)
