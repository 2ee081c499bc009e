"""What the dashboard shows, computed from successive observations of the mesh. Pure.

Theory of operation: every second or so the server observes the mesh once
(:mod:`meshtrust.dashboard.observe`) and hands the :class:`Observation` to
:meth:`Tracker.ingest`. The tracker keeps what one observation cannot say by itself:

- *recent counts*: each edge's and node's cumulative counters, sampled over the last
  ``window`` seconds, so an edge shows the calls allowed and denied lately, not since Envoy
  started (a counter that goes down means Envoy restarted: its history starts again);
- *events*: what changed between two observations — a new serial (a rotation), more
  denials, a new policy version (a reload), a policy edit the sidecar refused, a revocation
  in the CA's ledger — numbered, newest last, the last :data:`MAX_EVENTS` kept.

:meth:`Tracker.snapshot` is the JSON document ``/api/state`` serves (docs/dashboard.md). It
holds names, SPIFFE IDs, serials, times and counts only: never a key, a token or a path to
one (the status document it starts from has none either).
"""

from __future__ import annotations

import datetime as dt
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshtrust.mesh.timestamps import format_timestamp, parse_timestamp

__all__ = [
    "MAX_EVENTS",
    "Edge",
    "EdgeCounters",
    "LedgerCert",
    "LedgerView",
    "Observation",
    "Tracker",
    "edge_counters",
]

#: Events kept for the feed (older ones are dropped).
MAX_EVENTS = 200
#: Certificates per service shown on its timeline (the newest).
TIMELINE_CERTS = 6


@dataclass(frozen=True)
class Edge:
    """A declared call: ``caller``'s app reaches ``callee`` through its sidecar."""

    caller: str
    callee: str
    protocol: str  # "http" or "tcp" (the callee's protocol)


@dataclass(frozen=True)
class EdgeCounters:
    """Cumulative counts of one edge, as the caller's Envoy saw them. For TCP a connection
    the callee's policy refuses looks like any other closed connection to the caller, so
    ``denied`` is None (the callee's node still counts its denials)."""

    calls: int
    denied: int | None


def edge_counters(stats: Mapping[str, int], edge: Edge) -> EdgeCounters:
    """An edge's counters from its caller's Envoy stats (``cluster.outbound|<callee>.*``).

    HTTP: requests sent and the 403s answered (the callee's RBAC filter answers 403 "RBAC:
    access denied"; an app that answers 403 itself is counted as denied too). TCP:
    connections opened."""
    prefix = f"cluster.outbound|{edge.callee}."
    if edge.protocol == "http":
        return EdgeCounters(
            stats.get(prefix + "upstream_rq_total", 0), stats.get(prefix + "upstream_rq_403", 0)
        )
    return EdgeCounters(stats.get(prefix + "upstream_cx_total", 0), None)


@dataclass(frozen=True)
class LedgerCert:
    """A certificate in the CA's ledger (serials as :func:`~meshtrust.pki.format_serial`)."""

    serial: str
    spiffe_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    issued_at: dt.datetime  # NotBefore is backdated 2 minutes; this is when it was signed
    revoked_at: dt.datetime | None = None


@dataclass(frozen=True)
class LedgerView:
    certs: tuple[LedgerCert, ...] = ()
    revoked_total: int = 0
    error: str | None = None  # why the ledger could not be read


@dataclass(frozen=True)
class Observation:
    """One look at the mesh: the ``status --json`` document, each declared edge's counters
    (None when the caller's Envoy did not answer) and the CA's ledger (None off the CA's
    host)."""

    now: dt.datetime
    status: Mapping[str, Any]
    edges: Mapping[Edge, EdgeCounters | None]
    ledger: LedgerView | None = None


class _Window:
    """Samples of one cumulative counter over the last ``seconds``: ``recent`` is how much it
    grew since the oldest sample in the window (since the first one, early on)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.samples: deque[tuple[dt.datetime, int]] = deque()

    def add(self, now: dt.datetime, value: int) -> int:
        """Record ``value`` at ``now``; returns the growth since the previous sample."""
        if self.samples and value < self.samples[-1][1]:
            self.samples.clear()  # Envoy restarted: its counters began again at zero
        grew = value - self.samples[-1][1] if self.samples else 0
        self.samples.append((now, value))
        horizon = now - dt.timedelta(seconds=self.seconds)
        while len(self.samples) > 1 and self.samples[1][0] <= horizon:
            self.samples.popleft()
        return grew

    @property
    def recent(self) -> int:
        return self.samples[-1][1] - self.samples[0][1] if self.samples else 0


@dataclass
class _EdgeHistory:
    calls: _Window
    denied: _Window
    latest: EdgeCounters | None = None


@dataclass
class _Previous:
    """What the last observation said, per service, to see what changed."""

    serial: dict[str, str | None] = field(default_factory=dict)
    policy_version: dict[str, int | None] = field(default_factory=dict)
    policy_error: dict[str, str | None] = field(default_factory=dict)
    revoked: set[str] | None = None


class Tracker:
    """Recent counts and events across observations; :meth:`snapshot` is ``/api/state``."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._seq = 0
        self._edges: dict[Edge, _EdgeHistory] = {}
        self._denied: dict[str, _Window] = {}
        self._allowed: dict[str, _Window] = {}
        self._prev = _Previous()
        self._last: Observation | None = None

    def ingest(self, obs: Observation) -> list[dict[str, Any]]:
        """Take one observation; returns the events it brought (also kept in ``events``)."""
        new: list[dict[str, Any]] = []
        if self._last is None:  # the baseline: what the next looks are compared with
            count, td = len(obs.status.get("services", [])), obs.status.get("trust_domain")
            text = f"dashboard started: {count} service(s) in {td}"
            new.append(self._event(obs.now, "observing", None, text))
        denied_by: dict[str, list[str]] = {}
        for edge, counters in obs.edges.items():
            hist = self._edges.setdefault(edge, _EdgeHistory(self._w(), self._w()))
            hist.latest = counters
            if counters is None:
                continue
            hist.calls.add(obs.now, counters.calls)
            if counters.denied is not None and hist.denied.add(obs.now, counters.denied) > 0:
                denied_by.setdefault(edge.callee, []).append(edge.caller)
        for svc in obs.status.get("services", []):
            new += self._service_events(obs.now, svc, denied_by.get(svc["name"], []))
        if obs.ledger is not None:
            new += self._revocation_events(obs.now, obs.ledger)
        self._last = obs
        self.events.extend(new)
        return new

    def _w(self) -> _Window:
        return _Window(self.window)

    def _event(self, now: dt.datetime, kind: str, service: str | None, text: str) -> dict[str, Any]:
        self._seq += 1
        return {
            "seq": self._seq,
            "at": format_timestamp(now),
            "kind": kind,
            "service": service,
            "text": text,
        }

    def _service_events(
        self, now: dt.datetime, svc: Mapping[str, Any], callers: Sequence[str]
    ) -> list[dict[str, Any]]:
        name, prev, out = svc["name"], self._prev, []
        conns, envoy = svc["connections"], svc["envoy"]
        grew = self._denied.setdefault(name, self._w()).add(now, conns["denied"])
        self._allowed.setdefault(name, self._w()).add(now, conns["allowed"])
        if grew > 0:
            who = f" (from {', '.join(sorted(callers))})" if callers else ""
            out.append(self._event(now, "denial", name, f"{name} denied {_calls(grew)}{who}"))
        serial = svc.get("serial")
        old_serial = prev.serial.get(name)
        if serial is not None and old_serial is not None and serial != old_serial:
            out.append(
                self._event(
                    now,
                    "rotation",
                    name,
                    f"{name} rotated: serial {_short(old_serial)} → "
                    f"{_short(serial)}, expires {svc.get('not_after')}",
                )
            )
        if serial is not None:
            prev.serial[name] = serial
        version, old_version = envoy.get("policy_version"), prev.policy_version.get(name)
        if version is None:
            return out  # its agent did not answer: nothing is known of its policy
        if old_version is not None and version > old_version:
            text = f"{name} applied policy version {version} ({envoy.get('mtls_mode')})"
            out.append(self._event(now, "policy-reload", name, text))
        prev.policy_version[name] = version
        error = envoy.get("policy_error")
        if error and error != prev.policy_error.get(name):
            text = f"{name} refused a policy edit (keeps version {version}): {error}"
            out.append(self._event(now, "policy-refused", name, text))
        prev.policy_error[name] = error
        return out

    def _revocation_events(self, now: dt.datetime, ledger: LedgerView) -> list[dict[str, Any]]:
        revoked = {c.serial: c for c in ledger.certs if c.revoked_at is not None}
        before, self._prev.revoked = self._prev.revoked, set(revoked)
        if before is None:
            return []
        return [
            self._event(now, "revocation", None, f"revoked {c.spiffe_id} serial {_short(s)}")
            for s, c in sorted(revoked.items())
            if s not in before
        ]

    def snapshot(self) -> dict[str, Any]:
        """The ``/api/state`` document of the latest observation (docs/dashboard.md)."""
        obs = self._last
        if obs is None:
            return {"schema_version": 1, "observed": False, "events": []}
        status = obs.status
        services = list(status.get("services", []))
        ledger = obs.ledger
        return {
            "schema_version": 1,
            "observed": True,
            "generated_at": format_timestamp(obs.now),
            "window_seconds": math.floor(self.window),
            "trust_domain": status.get("trust_domain"),
            "mesh_file": status.get("mesh_file"),
            "state": status.get("state"),
            "host": status.get("host"),
            "cert_ttl_seconds": status.get("cert_ttl_seconds"),
            "ca": {
                **status.get("ca", {}),
                "revoked": None if ledger is None else ledger.revoked_total,
                "ledger_error": None if ledger is None else ledger.error,
            },
            "nodes": [self._node(s) for s in services],
            "edges": [self._edge(e, h) for e, h in self._edges.items() if e in obs.edges],
            "timelines": [_timeline(s, ledger, obs.now) for s in services],
            "events": list(self.events),
        }

    def _node(self, svc: Mapping[str, Any]) -> dict[str, Any]:
        envoy, conns, name = svc["envoy"], svc["connections"], svc["name"]
        return {
            "name": name,
            "spiffe_id": svc["spiffe_id"],
            "mtls_mode": envoy.get("mtls_mode"),
            "agent": svc["agent"],
            "app": svc["app"],
            "envoy": envoy.get("state"),
            "ready": svc.get("ready"),
            "policy_version": envoy.get("policy_version"),
            "policy_error": envoy.get("policy_error"),
            "allowed_total": conns["allowed"],
            "denied_total": conns["denied"],
            "allowed_recent": self._allowed[name].recent if name in self._allowed else 0,
            "denied_recent": self._denied[name].recent if name in self._denied else 0,
            "tls_errors": conns["tls_errors"],
        }

    def _edge(self, edge: Edge, hist: _EdgeHistory) -> dict[str, Any]:
        latest = hist.latest
        denied_recent = None if latest is not None and latest.denied is None else hist.denied.recent
        calls_recent = hist.calls.recent
        if latest is None:
            state = "unknown"
        elif denied_recent:
            state = "denied"
        elif calls_recent:
            state = "allowed"
        else:
            state = "idle"
        return {
            "from": edge.caller,
            "to": edge.callee,
            "protocol": edge.protocol,
            "state": state,
            "calls_total": None if latest is None else latest.calls,
            "denied_total": None if latest is None else latest.denied,
            "calls_recent": calls_recent,
            "denied_recent": denied_recent,
            "allowed_recent": calls_recent - (denied_recent or 0),
        }


def _timeline(
    svc: Mapping[str, Any], ledger: LedgerView | None, now: dt.datetime
) -> dict[str, Any]:
    """One service's certificates: the one it serves (from its agent) and the newest ones
    the ledger holds for its SPIFFE ID, revocations marked."""
    certs = [c for c in (ledger.certs if ledger else ()) if c.spiffe_id == svc["spiffe_id"]]
    certs = sorted(certs, key=lambda c: c.issued_at)[-TIMELINE_CERTS:]
    current = svc.get("serial")
    signed = next((c.issued_at for c in certs if c.serial == current), None)
    issued = signed or parse_timestamp(svc.get("not_before"))
    return {
        "service": svc["name"],
        "spiffe_id": svc["spiffe_id"],
        "serial": current,
        "issued": None if issued is None else format_timestamp(issued),
        "next_rotation": svc.get("next_rotation"),
        "not_after": svc.get("not_after"),
        "rotations": svc.get("rotations"),
        "age_seconds": None if issued is None else math.floor((now - issued).total_seconds()),
        "certs": [
            {
                "serial": c.serial,
                "issued": format_timestamp(c.issued_at),
                "not_before": format_timestamp(c.not_before),
                "not_after": format_timestamp(c.not_after),
                "revoked_at": None if c.revoked_at is None else format_timestamp(c.revoked_at),
                "current": c.serial == current,
            }
            for c in certs
        ],
    }


def _calls(n: int) -> str:
    return f"{n} call" if n == 1 else f"{n} calls"


def _short(serial: str) -> str:
    return serial if len(serial) <= 12 else serial[:12] + "…"
