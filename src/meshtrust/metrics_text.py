"""Prometheus metrics as plain text, without prometheus_client.

The agent's and the CA's metrics: a handful of counters and gauges each, for which
prometheus_client would cost the long-lived per-workload agent more memory than its metrics
are worth. A collector here is any object with ``families()``; :class:`TextRegistry` renders
them in the Prometheus text format (version 0.0.4), line for line as ``prometheus_client``'s
``generate_latest`` renders the same metrics. One thing prometheus_client cannot do and istiod
does: a counter named without ``_total`` (``citadel_server_csr_count``), announced as
``# TYPE citadel_server_csr_count counter`` (``MetricFamily(total_suffix=False)``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "CONTENT_TYPE",
    "MetricFamily",
    "Sample",
    "TextCollector",
    "TextRegistry",
    "format_value",
    "render",
]

#: The Content-Type of :func:`render`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MetricType = Literal["counter", "gauge", "unknown"]


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """One metric: its name (without ``_total`` for a counter, as in OpenMetrics), help text,
    type and samples (each with its full name, ``_total`` included for a counter).

    ``total_suffix=False`` is for counters whose exposed name has no ``_total`` (istiod's
    ``citadel_server_*``): the family is announced under ``name`` itself.
    """

    name: str
    documentation: str
    type: MetricType
    samples: tuple[Sample, ...] = field(default=())
    total_suffix: bool = True


class TextCollector(Protocol):
    def families(self) -> Iterable[MetricFamily]: ...


class TextRegistry:
    """The collectors one ``/metrics`` endpoint serves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collectors: list[TextCollector] = []

    def register(self, collector: TextCollector) -> None:
        with self._lock:
            if collector in self._collectors:
                raise ValueError(f"collector already registered: {collector!r}")
            self._collectors.append(collector)

    def collect(self) -> list[MetricFamily]:
        with self._lock:
            collectors = list(self._collectors)
        return [family for collector in collectors for family in collector.families()]

    def exposition(self) -> bytes:
        """Every collector's metrics in the text format (:data:`CONTENT_TYPE`)."""
        return render(self.collect())


def format_value(value: float) -> str:
    """A sample value as Prometheus (Go) writes it: ``1.0``, ``+Inf``, ``1.5e+07``."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample_line(sample: Sample) -> str:
    labels = ""
    if sample.labels:
        pairs = ",".join(
            f'{name}="{_escape_label_value(value)}"'
            for name, value in sorted(sample.labels.items())
        )
        labels = "{" + pairs + "}"
    return f"{sample.name}{labels} {format_value(sample.value)}\n"


_TYPE_NAMES: dict[str, str] = {"counter": "counter", "gauge": "gauge", "unknown": "untyped"}


def render(families: Iterable[MetricFamily]) -> bytes:
    """The Prometheus text format (0.0.4) of ``families``."""
    out: list[str] = []
    for family in families:
        suffixed = family.type == "counter" and family.total_suffix
        name = family.name + "_total" if suffixed else family.name
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n")
        out.append(f"# TYPE {name} {_TYPE_NAMES[family.type]}\n")
        out.extend(_sample_line(sample) for sample in family.samples)
    return "".join(out).encode()
