"""CA metrics with Istio's ``citadel_server_*`` names.

The CA core reports :class:`CaEvent`s to a :class:`CaMetricsSink`; :class:`CaMetrics` counts
them and exposes the counts, through :mod:`meshtrust.metrics_text` as the agent's are, under
the exact names and types istiod uses: ``# TYPE citadel_server_csr_count counter`` and no
``_total`` suffix, so dashboards built for istiod work unchanged. A worker process forwards
its events to the supervisor, which owns the one registry that ``/metrics`` serves
(:mod:`meshtrust.ca.workers`).

The expiry of the CA's own certificates comes twice, as istiod exposes it: the Unix time
(``citadel_server_root_cert_expiry_timestamp``, ``..._cert_chain_expiry_timestamp``) and the
seconds left at the scrape (``citadel_server_root_cert_expiry_seconds``,
``..._cert_chain_expiry_seconds``; istio#54662), which alert rules compare with a threshold.
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Protocol

from meshtrust.clock import Clock, SystemClock
from meshtrust.metrics_text import MetricFamily, Sample, TextRegistry

__all__ = ["CaEvent", "CaMetrics", "CaMetricsSink"]


class CaEvent(enum.StrEnum):
    CSR = "csr"
    ISSUED = "issued"
    AUTHN_FAILURE = "authn_failure"
    CSR_PARSE_ERROR = "csr_parse_error"
    INVALID_TTL = "invalid_ttl"
    PERMISSION_DENIED = "permission_denied"
    LEDGER_ERROR = "ledger_error"
    BLOCKED = "blocked"  # the identity is blocked (``meshtrust ca revoke --spiffe-id``)


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
        frozenset(
            {CaEvent.INVALID_TTL, CaEvent.PERMISSION_DENIED, CaEvent.LEDGER_ERROR, CaEvent.BLOCKED}
        ),
    ),
    "citadel_server_id_mismatch_count": (
        "CSRs asking for an identity other than the authenticated caller's.",
        frozenset({CaEvent.PERMISSION_DENIED}),
    ),
}


class CaMetrics:
    """Counts CA events and exposes them in ``registry`` (a :class:`TextRegistry`)."""

    def __init__(self, registry: TextRegistry, clock: Clock | None = None) -> None:
        """``clock`` (default the system's) dates the ``*_expiry_seconds`` gauges."""
        self._clock = clock or SystemClock()
        self._counts: Counter[CaEvent] = Counter()
        self._lock = threading.Lock()
        self._root_expiry: float | None = None
        self._chain_expiry: float | None = None
        self._chain_source: Callable[[], tuple[dt.datetime, int] | None] | None = None
        registry.register(self)

    def observe(self, event: CaEvent, count: int = 1) -> None:
        with self._lock:
            self._counts[event] += count

    def count(self, event: CaEvent) -> int:
        return self._counts[event]

    def set_expiries(self, root_not_after: dt.datetime, chain_not_after: dt.datetime) -> None:
        """The NotAfter of the earliest-expiring trusted root and of the signing chain (the
        signing certificate and its intermediates); called again when they change."""
        with self._lock:
            self._root_expiry = root_not_after.timestamp()
            self._chain_expiry = chain_not_after.timestamp()

    def follow_signing_chain(self, read: Callable[[], tuple[dt.datetime, int] | None]) -> None:
        """Signing-CA rotation (:mod:`meshtrust.ca.signing`): at each scrape, ``read()``
        gives the active chain's expiry and its warning level (0 none, 1-3 as
        :func:`~meshtrust.ca.signing.chain_expiry_warning`), or None when it cannot tell."""
        self._chain_source = read

    def families(self) -> Iterator[MetricFamily]:
        chain_now = self._chain_source() if self._chain_source is not None else None
        with self._lock:
            if chain_now is not None:  # the active slot's chain, as the ledger says now
                self._chain_expiry = chain_now[0].timestamp()
            counts = dict(self._counts)
        for name, (doc, events) in _COUNTERS.items():
            value = float(sum(counts.get(e, 0) for e in events))
            # istiod's names: counters without the _total suffix.
            yield MetricFamily(name, doc, "counter", (Sample(name, {}, value),), total_suffix=False)
        yield MetricFamily(
            "meshtrust_ca_refusals",
            "Refused requests by reason.",
            "counter",
            tuple(
                Sample(
                    "meshtrust_ca_refusals_total", {"reason": ev.value}, float(counts.get(ev, 0))
                )
                for ev in CaEvent
                if ev not in (CaEvent.CSR, CaEvent.ISSUED)
            ),
        )
        with self._lock:
            root, chain = self._root_expiry, self._chain_expiry
        now = self._clock.now().timestamp()
        for what, doc, expiry in (
            ("root_cert", "the CA's root certificate", root),
            ("cert_chain", "the CA's signing certificate chain", chain),
        ):
            if expiry is None:
                continue
            name = f"citadel_server_{what}_expiry"
            yield MetricFamily(
                f"{name}_timestamp",
                f"Unix time when {doc} expires.",
                "gauge",
                (Sample(f"{name}_timestamp", {}, expiry),),
            )
            yield MetricFamily(
                f"{name}_seconds",
                f"Seconds until {doc} expires (negative: expired).",
                "gauge",
                (Sample(f"{name}_seconds", {}, expiry - now),),
            )
        if chain_now is not None:
            yield MetricFamily(
                "meshtrust_ca_chain_expiry_warning",
                "0, or how close a CA without the root key is to its chain's expiry: 1 past "
                "the point a rotating CA would prepare a successor, 2 past activation, 3 last day.",
                "gauge",
                (Sample("meshtrust_ca_chain_expiry_warning", {}, float(chain_now[1])),),
            )
