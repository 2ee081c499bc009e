"""CA metrics with Istio's ``citadel_server_*`` names.

The CA core reports :class:`CaEvent`s to a :class:`CaMetricsSink`; :class:`PrometheusCaMetrics`
counts them and exposes the counts under the exact names Istio uses (no ``_total`` suffix,
so dashboards built for istiod work unchanged). A worker process forwards its events to the
supervisor, which owns the one registry that ``/metrics`` serves (:mod:`meshtrust.ca.workers`).
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

__all__ = ["CaEvent", "CaMetricsSink", "PrometheusCaMetrics"]


class CaEvent(enum.StrEnum):
    CSR = "csr"
    ISSUED = "issued"
    AUTHN_FAILURE = "authn_failure"
    CSR_PARSE_ERROR = "csr_parse_error"
    INVALID_TTL = "invalid_ttl"
    PERMISSION_DENIED = "permission_denied"
    LEDGER_ERROR = "ledger_error"


class CaMetricsSink(Protocol):
    def observe(self, event: CaEvent) -> None: ...


# metric name -> (help, events counted)
_COUNTERS: dict[str, tuple[str, frozenset[CaEvent]]] = {
    "citadel_server_csr_count": ("CSRs received by the CA.", frozenset({CaEvent.CSR})),
    "citadel_server_success_cert_issuance_count": (
        "Certificates issued successfully.",
        frozenset({CaEvent.ISSUED}),
    ),
    "citadel_server_authentication_failure_count": (
        "Requests whose caller could not be authenticated.",
        frozenset({CaEvent.AUTHN_FAILURE}),
    ),
    "citadel_server_csr_parsing_err_count": (
        "CSRs that could not be parsed or whose signature does not verify.",
        frozenset({CaEvent.CSR_PARSE_ERROR}),
    ),
    "citadel_server_csr_sign_err_count": (
        "Requests refused or failed at signing: bad TTL, identity mismatch, ledger failure.",
        frozenset({CaEvent.INVALID_TTL, CaEvent.PERMISSION_DENIED, CaEvent.LEDGER_ERROR}),
    ),
    "citadel_server_id_mismatch_count": (
        "CSRs asking for an identity other than the authenticated caller's.",
        frozenset({CaEvent.PERMISSION_DENIED}),
    ),
}


class PrometheusCaMetrics:
    """Counts CA events and exposes them through a prometheus_client registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts: Counter[CaEvent] = Counter()
        self._lock = threading.Lock()
        self._root_expiry: float | None = None
        self._chain_expiry: float | None = None
        registry.register(self)

    def observe(self, event: CaEvent, count: int = 1) -> None:
        with self._lock:
            self._counts[event] += count

    def count(self, event: CaEvent) -> int:
        return self._counts[event]

    def set_expiries(self, root_not_after: dt.datetime, chain_not_after: dt.datetime) -> None:
        self._root_expiry = root_not_after.timestamp()
        self._chain_expiry = chain_not_after.timestamp()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = dict(self._counts)
        for name, (doc, events) in _COUNTERS.items():
            # "unknown" (untyped) keeps the exact Istio names: prometheus_client would
            # otherwise announce a counter family as <name>_total.
            m = Metric(name, doc, "unknown")
            m.add_sample(name, {}, float(sum(counts.get(e, 0) for e in events)))
            yield m
        refusals = Metric("meshtrust_ca_refusals", "Refused requests by reason.", "counter")
        for ev in CaEvent:
            if ev not in (CaEvent.CSR, CaEvent.ISSUED):
                refusals.add_sample(
                    "meshtrust_ca_refusals_total", {"reason": ev.value}, float(counts.get(ev, 0))
                )
        yield refusals
        for name, doc, value in (
            (
                "citadel_server_root_cert_expiry_timestamp",
                "Unix time when the CA's root certificate expires.",
                self._root_expiry,
            ),
            (
                "citadel_server_cert_chain_expiry_timestamp",
                "Unix time when the CA's signing certificate chain expires.",
                self._chain_expiry,
            ),
        ):
            if value is not None:
                g = Metric(name, doc, "gauge")
                g.add_sample(name, {}, value)
                yield g
