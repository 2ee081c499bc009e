"""Agent metrics with istio-agent's names, served on the status port.

Counters keep Istio's exact names (no ``_total`` suffix) so istio-agent dashboards work.

:class:`AgentMetrics` registers itself with a :class:`~meshtrust.metrics_text.TextRegistry`
(``families()``), not with prometheus_client, which would cost the agent more memory than
its metrics are worth.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from meshtrust.metrics_text import MetricFamily, Sample

__all__ = ["AgentMetrics", "CaFailoverMetrics"]


class _Registry(Protocol):
    def register(self, collector: Any) -> None: ...


_CSR = {"request_type": "csr"}


class AgentMetrics:
    def __init__(self, registry: _Registry, expiry_seconds: Callable[[], float | None]) -> None:
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

    def families(self) -> list[MetricFamily]:
        """The current values (for a :class:`~meshtrust.metrics_text.TextRegistry`)."""
        with self._lock:
            outgoing, failed, latency = float(self.outgoing), float(self.failed), self.latency_ms
            ok, bad = float(self.rotations_ok), float(self.rotations_failed)
            refused = float(self.refused_responses)
        out = [
            # "unknown" (untyped) keeps Istio's exact names: a counter would get "_total".
            _single("istio_agent_num_outgoing_requests", "CSRs sent to the CA.", _CSR, outgoing),
            _single(
                "istio_agent_num_failed_outgoing_requests",
                "CSRs that failed or were refused.",
                _CSR,
                failed,
            ),
            _single(
                "istio_agent_outgoing_latency", "Total milliseconds spent on CSRs.", _CSR, latency
            ),
            MetricFamily(
                "meshtrust_agent_rotations",
                "Certificate issuances by result.",
                "counter",
                (
                    Sample("meshtrust_agent_rotations_total", {"result": "success"}, ok),
                    Sample("meshtrust_agent_rotations_total", {"result": "failure"}, bad),
                ),
            ),
            MetricFamily(
                "meshtrust_agent_refused_ca_responses",
                "CA responses refused by verification (wrong identity, untrusted root).",
                "counter",
                (Sample("meshtrust_agent_refused_ca_responses_total", {}, refused),),
            ),
        ]
        expiry = self._expiry_seconds()
        if expiry is not None:
            out.append(
                MetricFamily(
                    "istio_agent_cert_expiry_seconds",
                    "Seconds until the workload certificate expires (negative: expired).",
                    "gauge",
                    (
                        Sample(
                            "istio_agent_cert_expiry_seconds", {"resource_name": "default"}, expiry
                        ),
                    ),
                )
            )
            out.append(
                MetricFamily(
                    "meshtrust_agent_cert_expired",
                    "1 while the held workload certificate has expired (it is then handed "
                    "out to no new client), else 0.",
                    "gauge",
                    (
                        Sample(
                            "meshtrust_agent_cert_expired",
                            {"resource_name": "default"},
                            1.0 if expiry <= 0 else 0.0,
                        ),
                    ),
                )
            )
        return out


class CaFailoverMetrics:
    """``meshtrust_agent_ca_failovers_total``: how often the CA client moved on to another
    CA endpoint because one was unavailable (:mod:`meshtrust.caapi.failover`). Failovers are
    not failed renewals: a renewal fails only when no endpoint answered."""

    def __init__(self, failovers: Callable[[], int]) -> None:
        self._failovers = failovers

    def families(self) -> list[MetricFamily]:
        name = "meshtrust_agent_ca_failovers"
        doc = "Moves to another CA endpoint after one was unavailable."
        value = float(self._failovers())
        return [MetricFamily(name, doc, "counter", (Sample(f"{name}_total", {}, value),))]


def _single(name: str, doc: str, labels: dict[str, str], value: float) -> MetricFamily:
    return MetricFamily(name, doc, "unknown", (Sample(name, labels, value),))
