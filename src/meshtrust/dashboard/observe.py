"""The dashboard's one look at the mesh: what ``status`` observes, plus each caller's
outbound Envoy counters and the CA's ledger. I/O only; the judging is in
:mod:`meshtrust.dashboard.model`.

Reuses :func:`meshtrust.mesh.status.observe_mesh` and :func:`status_document` (the node
fields are those of ``status --json``), so the dashboard and ``meshtrust status`` never
disagree about a service.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

from meshtrust.ca.ledger import SqlLedger, default_ledger_url
from meshtrust.clock import Clock
from meshtrust.dashboard.model import Edge, LedgerCert, LedgerView, Observation, edge_counters
from meshtrust.errors import MeshTrustError
from meshtrust.mesh.probes import envoy_info, envoy_stats, serial_text
from meshtrust.mesh.state import MeshState
from meshtrust.mesh.status import observe_mesh, status_document

__all__ = ["LedgerReader", "declared_edges", "observe"]

#: The caller-side counters of each edge (``cluster.outbound|<callee>.*``).
OUTBOUND_STATS = r"^cluster\.outbound\|.*\.(upstream_rq_total|upstream_rq_403|upstream_cx_total)$"


def declared_edges(state: MeshState) -> tuple[Edge, ...]:
    """Every upstream of every service of this host, as an edge. A callee on another host
    (not in this host's state) is taken as TCP: its denials are not told apart."""
    protocols = {s.name: s.protocol for s in state.services}
    return tuple(
        Edge(svc.name, callee, protocols.get(callee, "tcp"))
        for svc in state.services
        for callee in svc.upstreams
    )


class LedgerReader:
    """The CA's ledger, opened on first use and kept open; the recent certificates of the
    mesh's identities and the revocations. Only on the CA's host (``state.ca``)."""

    def __init__(self, ca_dir: Path) -> None:
        self.ca_dir = ca_dir
        self._ledger: SqlLedger | None = None

    def read(self, identities: Iterable[str], since: dt.datetime) -> LedgerView:
        """Certificates of ``identities`` still valid at ``since``; a ledger that cannot be
        read is a view with its ``error`` (the rest of the dashboard carries on)."""
        try:
            if self._ledger is None:
                self._ledger = SqlLedger(default_ledger_url(self.ca_dir))
            wanted = set(identities)
            revocations = self._ledger.revocations()
            records = self._ledger.certificates(not_expired_at=since)
        except MeshTrustError as exc:
            return LedgerView(error=str(exc))
        certs = []
        for r in records:
            if r.spiffe_id not in wanted:
                continue
            revoked = revocations.get(r.serial)
            certs.append(
                LedgerCert(
                    serial=serial_text(r.serial) or r.serial,
                    spiffe_id=r.spiffe_id,
                    not_before=r.not_before,
                    not_after=r.not_after,
                    issued_at=r.issued_at,
                    revoked_at=None if revoked is None else revoked.revoked_at,
                )
            )
        return LedgerView(tuple(certs), revoked_total=len(revocations))

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None


def observe(state: MeshState, clock: Clock, ledger: LedgerReader | None) -> Observation:
    """Observe ``state``'s mesh once (short timeouts: a part that does not answer is seen
    as missing)."""
    mesh = observe_mesh(state)
    now = clock.now()
    edges = declared_edges(state)
    counters = {}
    for svc in mesh.services:
        admin = envoy_info(svc.agent).get("admin")
        mine = [e for e in edges if e.caller == svc.service.name]
        if not mine:
            continue
        stats = envoy_stats(admin if isinstance(admin, str) else None, OUTBOUND_STATS)
        for edge in mine:
            counters[edge] = None if stats is None else edge_counters(stats, edge)
    view = None
    if ledger is not None:
        identities = {s.spiffe_id for s in state.services} | set(state.identities)
        view = ledger.read(identities, now - dt.timedelta(seconds=2 * state.cert_ttl_seconds))
    return Observation(now, status_document(mesh, now), counters, view)
