"""Agent metrics with istio-agent's names, served on the status port.

Counters keep Istio's exact names (no ``_total`` suffix) so istio-agent dashboards work.
Beside them, the names of the article meshtrust started from, so its alert rules
(``deploy/prometheus/meshtrust-rules.yaml``) work as written:
``istio_certificate_expiration_timestamp_seconds`` (gauge, Unix time of NotAfter) and
``istio_agent_certificate_rotation_success_total`` / ``_failure_total`` (counters: every
certificate issued, the first included, and every failed attempt). Istio itself has neither.
:class:`CrlMetrics` reports the CA's CRL as the agent holds it. Every family carries a
``# TYPE`` line (see docs/observability.md for the table).

:class:`AgentMetrics` registers itself with a :class:`~meshtrust.metrics_text.TextRegistry`
(``families()``), not with prometheus_client, which would cost the agent more memory than
its metrics are worth.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any, Protocol

from cryptography import x509

from meshtrust.metrics_text import MetricFamily, Sample

__all__ = ["AgentMetrics", "CaFailoverMetrics", "CrlMetrics", "CrlState"]


class _Registry(Protocol):
    def register(self, collector: Any) -> None: ...


_CSR = {"request_type": "csr"}


#: (received at, NotAfter) of the held workload certificate, or None before the first.
Validity = Callable[[], tuple[dt.datetime, dt.datetime] | None]


class AgentMetrics:
    """The agent's own counters and gauges. ``expiry_seconds`` answers the seconds the held
    certificate has left (at the agent's clock); ``validity`` its receipt time and NotAfter
    (for the seed's expiry timestamp and the lifetime the rules compare it with)."""

    def __init__(
        self,
        registry: _Registry,
        expiry_seconds: Callable[[], float | None],
        validity: Validity | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._expiry_seconds = expiry_seconds
        self._validity = validity
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
            # The article's names (deploy/prometheus/meshtrust-rules.yaml uses them).
            MetricFamily(
                "istio_agent_certificate_rotation_success",
                "Workload certificates issued and verified (the first one included).",
                "counter",
                (Sample("istio_agent_certificate_rotation_success_total", {}, ok),),
            ),
            MetricFamily(
                "istio_agent_certificate_rotation_failure",
                "Failed attempts to obtain a workload certificate (each retry counts).",
                "counter",
                (Sample("istio_agent_certificate_rotation_failure_total", {}, bad),),
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
        out.extend(self._validity_families())
        return out

    def _validity_families(self) -> list[MetricFamily]:
        held = self._validity() if self._validity is not None else None
        if held is None:
            return []
        received_at, not_after = held
        default = {"resource_name": "default"}
        return [
            _gauge(
                "istio_certificate_expiration_timestamp_seconds",
                "Unix time when the workload certificate expires (its NotAfter).",
                default,
                not_after.timestamp(),
            ),
            _gauge(
                "meshtrust_agent_cert_lifetime_seconds",
                "Lifetime of the held certificate, from its receipt to NotAfter (the agent "
                "renews when about half of it is left).",
                default,
                (not_after - received_at).total_seconds(),
            ),
        ]


class CrlState(Protocol):
    """What :class:`meshtrust.agent.crl.CrlFollower` tracks (read, never changed here)."""

    @property
    def accepted(self) -> int: ...

    @property
    def refused(self) -> int: ...

    def stale(self, now: dt.datetime) -> bool: ...


class CrlMetrics:
    """The CA's CRL as this agent holds it: ``meshtrust_agent_crl_stale`` (1 once the held
    CRL is past its nextUpdate with no newer one received), the CRLs accepted and refused,
    and the held CRL's nextUpdate and number of revoked certificates. Registered only when
    the agent follows a CA's CRL."""

    def __init__(
        self,
        follower: CrlState,
        held: Callable[[], x509.CertificateRevocationList | None],
        now: Callable[[], dt.datetime],
    ) -> None:
        self._follower = follower
        self._held = held
        self._now = now

    def families(self) -> list[MetricFamily]:
        follower, crl = self._follower, self._held()
        out = [
            _counter(
                "meshtrust_agent_crl_accepted",
                "CRLs from the CA verified and handed on.",
                float(follower.accepted),
            ),
            _counter(
                "meshtrust_agent_crl_refused",
                "CRLs from the CA refused (unparsable, wrong signer, past nextUpdate, older).",
                float(follower.refused),
            ),
            _gauge(
                "meshtrust_agent_crl_stale",
                "1 while the held CRL is past its nextUpdate and no newer one came, else 0.",
                {},
                1.0 if follower.stale(self._now()) else 0.0,
            ),
        ]
        if crl is not None:
            if crl.next_update_utc is not None:
                out.append(
                    _gauge(
                        "meshtrust_agent_crl_next_update_timestamp_seconds",
                        "Unix time of the held CRL's nextUpdate.",
                        {},
                        crl.next_update_utc.timestamp(),
                    )
                )
            out.append(
                _gauge(
                    "meshtrust_agent_crl_revoked_certificates",
                    "Certificates the held CRL lists as revoked.",
                    {},
                    float(len(crl)),
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


def _gauge(name: str, doc: str, labels: dict[str, str], value: float) -> MetricFamily:
    return MetricFamily(name, doc, "gauge", (Sample(name, labels, value),))


def _counter(name: str, doc: str, value: float) -> MetricFamily:
    return MetricFamily(name, doc, "counter", (Sample(f"{name}_total", {}, value),))
