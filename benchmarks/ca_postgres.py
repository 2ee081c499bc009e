"""CA throughput on a PostgreSQL ledger: one replica and three, against SQLite, in one run.

Starts a throwaway PostgreSQL server (tests/postgres.py: ``initdb``/``pg_ctl`` of the
installed PostgreSQL, a temp dir, a free loopback port), then, with the same load generator
as ``benchmarks/ca_throughput.py`` (grpcio.aio clients in their own processes, many channels,
``--clients`` spread over the replicas), measures:

1. ``ca serve`` on its SQLite ledger (the baseline);
2. one ``ca serve`` on the PostgreSQL ledger;
3. ``--replicas`` (default 3) ``ca serve`` processes sharing the one CA directory and the one
   PostgreSQL ledger, each on its own port.

Each line gives certificates/s (median of ``--runs``), p50/p99 latency and the CA's CPU time
per certificate (user+sys of every CA process, PostgreSQL's own processes not included),
and after every run each certificate a client received must be in the ledger, once. On this
2-core machine the replicas, their workers, PostgreSQL and the load generator all share two
cores: more replicas cannot add CPU, they show what sharing one ledger costs.

Run: ``.venv/bin/python benchmarks/ca_postgres.py --duration 5 --runs 3``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import ca_throughput as bench  # noqa: E402

from tests.postgres import postgres_server  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured load before each run")
    p.add_argument("--runs", type=int, default=3, help="runs per setting; the median is shown")
    p.add_argument("--replicas", type=int, default=3, help="CA replicas in the last setting")
    p.add_argument(
        "--workers", type=int, default=None, help="workers per replica [ca serve's default]"
    )
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight in total")
    p.add_argument("--clients", type=int, default=3, help="load-generator processes")
    p.add_argument("--channels", type=int, default=32, help="gRPC connections per client")
    p.add_argument("--identities", type=int, default=16, help="distinct workload identities")
    args = p.parse_args(argv)
    if min(args.runs, args.replicas, args.concurrency, args.clients) < 1:
        p.error("--runs, --replicas, --concurrency and --clients must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from meshtrust.ca import default_ledger_url

    tmp = Path(tempfile.mkdtemp(prefix="mtb-pg-"))
    servers: list[bench.ServerProcess] = []
    results: list[tuple[str, bench.RunResult]] = []
    with bench.stopping(servers), postgres_server() as pg:
        ca_dir = tmp / "ca"
        subprocess.run(
            [
                *bench.meshtrust_command(),
                "ca",
                "init",
                "--dir",
                str(ca_dir),
                "--trust-domain",
                bench.TRUST_DOMAIN,
            ],  # fmt: skip
            check=True,
            stdout=subprocess.DEVNULL,
        )
        root_pem = (ca_dir / "root-cert.pem").read_bytes()
        workloads = bench.make_workloads(ca_dir, "ec-p256", args.identities)
        print(
            f"machine: {os.cpu_count()} cores; PostgreSQL {pg.psql('SHOW server_version').strip()}"
            f" on 127.0.0.1:{pg.port}; clients {args.clients}, concurrency {args.concurrency}, "
            f"{args.runs} x {args.duration:g} s",
            flush=True,
        )
        settings = [
            ("SQLite, 1 replica", default_ledger_url(ca_dir), 1),
            ("PostgreSQL, 1 replica", pg.create_database("one"), 1),
            (f"PostgreSQL, {args.replicas} replicas", pg.create_database("many"), args.replicas),
        ]
        for name, url, count in settings:
            group = []
            for i in range(count):
                ledger = None if url.startswith("sqlite") else url
                server, target = bench.start_meshtrust_server(
                    ca_dir, args.workers, tmp / f"{name[:4]}-{i}.log", ledger
                )
                servers.append(server)
                group.append((server, target))
            med, _best = bench.run_series(
                name,
                [t for _, t in group],
                root_pem,
                workloads,
                url,
                args,
                [s for s, _ in group],
            )
            results.append((name, med))
            for server, _ in group:
                server.stop()
                servers.remove(server)
    print("\nsummary (medians)")
    for name, r in results:
        c = r.cpu
        per_cert = (c.workers + c.supervisor) / r.certs_per_s * 1000.0 if r.certs_per_s else 0.0
        complete = "complete" if r.ledger_missing == 0 else f"MISSING {r.ledger_missing}"
        print(
            f"  {name:<26} {r.certs_per_s:7.0f} certs/s  p50 {r.p50_ms:6.1f} ms  "
            f"p99 {r.p99_ms:6.1f} ms  CA CPU {per_cert:.2f} ms/cert  failures {r.failures}  "
            f"ledger {complete}"
        )
    return 0 if all(r.ledger_missing == 0 and r.failures == 0 for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
