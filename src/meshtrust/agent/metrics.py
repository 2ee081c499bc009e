"""Agent metrics with istio-agent's names, served on the status port.

Counters keep Istio's exact names (no ``_total`` suffix) so istio-agent dashboards work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

__all__ = ["AgentMetrics"]


class AgentMetrics:
    def __init__(
        self, registry: CollectorRegistry, expiry_seconds: Callable[[], float | None]
    ) -> None:
        self._lock = threading.Lock()
        self._expiry_seconds = expiry_seconds
        self.outgoing = 0
        self.failed = 0
        self.latency_ms = 0.0
        self.rotations_ok = 0
        self.rotations_failed = 0
        self.refused_responses = 0
        registry.register(self)

    def request_done(self, seconds: float, ok: bool) -> None:
        with self._lock:
            self.outgoing += 1
            self.latency_ms += seconds * 1000.0
            if not ok:
                self.failed += 1

    def rotation(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.rotations_ok += 1
            else:
                self.rotations_failed += 1

    def refused_response(self) -> None:
        with self._lock:
            self.refused_responses += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            values = [
                (
                    "istio_agent_num_outgoing_requests",
                    "CSRs sent to the CA.",
                    "unknown",
                    {"request_type": "csr"},
                    float(self.outgoing),
                ),
                (
                    "istio_agent_num_failed_outgoing_requests",
                    "CSRs that failed or were refused.",
                    "unknown",
                    {"request_type": "csr"},
                    float(self.failed),
                ),
                (
                    "istio_agent_outgoing_latency",
                    "Total milliseconds spent on CSRs.",
                    "unknown",
                    {"request_type": "csr"},
                    self.latency_ms,
                ),
            ]
            ok, failed, refused = self.rotations_ok, self.rotations_failed, self.refused_responses
        for name, doc, kind, labels, value in values:
            m = Metric(name, doc, kind)
            m.add_sample(name, labels, value)
            yield m
        rot = Metric("meshtrust_agent_rotations", "Certificate issuances by result.", "counter")
        rot.add_sample("meshtrust_agent_rotations_total", {"result": "success"}, float(ok))
        rot.add_sample("meshtrust_agent_rotations_total", {"result": "failure"}, float(failed))
        yield rot
        bad = Metric(
            "meshtrust_agent_refused_ca_responses",
            "CA responses refused by verification (wrong identity, untrusted root).",
            "counter",
        )
        bad.add_sample("meshtrust_agent_refused_ca_responses_total", {}, float(refused))
        yield bad
        expiry = self._expiry_seconds()
        if expiry is not None:
            g = Metric(
                "istio_agent_cert_expiry_seconds",
                "Seconds until the workload certificate expires (negative: expired).",
                "gauge",
            )
            g.add_sample("istio_agent_cert_expiry_seconds", {"resource_name": "default"}, expiry)
            yield g
