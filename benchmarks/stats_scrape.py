"""The agent's merged ``/stats/prometheus``: what a scrape costs, and the agent's memory with it.

``--runs`` times, a fresh two-service mesh (``meshtrust up``, real CA, agents and Envoys,
one-minute certificates) is started; agent ``a``'s status port is scraped at
``/stats/prometheus`` (the agent's metrics merged with its Envoy's, fetched from Envoy's admin
socket for each scrape) ``--scrapes`` times in a row, as fast as it answers, and once per
scrape at ``/metrics`` (the agent's own). Reported: body sizes, scrape latency percentiles,
and the agent process's ``VmRSS`` before the scrapes, after them and its peak (``VmHWM``),
each the median over the runs. The agent memory target is 45 MB.

Run: ``.venv/bin/python benchmarks/stats_scrape.py`` (``--help`` for the settings).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mesh_helpers import running_mesh, write_mesh  # noqa: E402

STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
)


def proc_status_kb(pid: int, field_name: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status``; -1 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


@dataclass
class Run:
    merged_bytes: int
    own_bytes: int
    envoy_series: int
    merged_ms: list[float]
    own_ms: list[float]
    rss_before_kb: int
    rss_after_kb: int
    hwm_kb: int


def _get(url: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read()
    return (time.perf_counter() - t0) * 1000.0, body


def one_run(work: Path, scrapes: int) -> Run:
    path = write_mesh(
        work, [{"name": "a", "upstreams": [{"service": "b"}]}, {"name": "b"}], STRICT, "1m"
    )
    with running_mesh(path) as state:
        svc = state.service("a")
        base = f"http://{svc.status}"
        time.sleep(2.0)  # let the agent settle after its start before the first figure
        before = proc_status_kb(svc.agent_pid, "VmRSS")
        merged_ms, own_ms = [], []
        merged = own = b""
        for _ in range(scrapes):
            ms, merged = _get(base + "/stats/prometheus")
            merged_ms.append(ms)
            ms, own = _get(base + "/metrics")
            own_ms.append(ms)
        after = proc_status_kb(svc.agent_pid, "VmRSS")
        hwm = proc_status_kb(svc.agent_pid, "VmHWM")
    envoy = [
        line
        for line in merged.decode().splitlines()
        if line.startswith("envoy_") and not line.startswith("#")
    ]
    return Run(len(merged), len(own), len(envoy), merged_ms, own_ms, before, after, hwm)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="fresh meshes (median over them)")
    p.add_argument("--scrapes", type=int, default=300, help="scrapes of each path per run")
    args = p.parse_args(argv)
    if args.runs < 1 or args.scrapes < 1:
        p.error("--runs and --scrapes must be at least 1")
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="stats-scrape-") as tmp:
            runs.append(one_run(Path(tmp), args.scrapes))
        print(f"run {i + 1}: agent VmRSS {runs[-1].rss_after_kb / 1024:.1f} MB", flush=True)

    def med(attr: str) -> float:
        return statistics.median(float(getattr(r, attr)) for r in runs)

    def med_pct(attr: str, q: float) -> float:
        return statistics.median(pct(getattr(r, attr), q) for r in runs)

    rss = med("rss_after_kb") / 1024
    print(f"agent /stats/prometheus: {args.runs} runs x {args.scrapes} scrapes (medians)")
    print(
        f"  body: merged {med('merged_bytes') / 1024:.1f} KiB ({med('envoy_series'):.0f} Envoy "
        f"series), agent's own /metrics {med('own_bytes') / 1024:.1f} KiB"
    )
    print(
        f"  latency ms: /stats/prometheus p50 {med_pct('merged_ms', 0.5):.2f} "
        f"p90 {med_pct('merged_ms', 0.9):.2f}; /metrics p50 {med_pct('own_ms', 0.5):.2f} "
        f"p90 {med_pct('own_ms', 0.9):.2f}"
    )
    print(
        f"  agent VmRSS: before the scrapes {med('rss_before_kb') / 1024:.1f} MB, after "
        f"{rss:.1f} MB, peak VmHWM {med('hwm_kb') / 1024:.1f} MB  (target <= 45 MB: "
        f"{'PASS' if rss <= 45 else 'MISS'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
