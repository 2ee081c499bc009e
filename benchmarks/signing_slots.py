"""What following the signing slots costs a CA process, and how soon replicas follow.

For the SQLite ledger and a throwaway PostgreSQL server (tests/postgres.py), prints:

1. the cost of one idle poll of the slots (:meth:`SigningWatch.poll_once` with nothing due:
   the revision ``SELECT``), median over ``--polls``; every CA process (each replica, each
   worker) makes one a second;
2. activation -> every replica signing with the new intermediate: ``--replicas`` watches,
   each on its own engine (as separate CA processes), polling every second as ``ca serve``
   does; an activation is written (``switch_to_root``, the same ledger step an automatic
   activation is) and the time until the last replica follows is measured, median and max
   of ``--runs``.

Run: ``.venv/bin/python benchmarks/signing_slots.py --runs 5``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from meshtrust.ca import SqlLedger, init_ca_dir, load_ca_dir  # noqa: E402
from meshtrust.ca.cadir import load_root_signer  # noqa: E402
from meshtrust.ca.signing import SigningWatch, SlotLedger, switch_to_root  # noqa: E402
from meshtrust.clock import SystemClock  # noqa: E402
from meshtrust.spiffe import TrustDomain  # noqa: E402
from tests.postgres import postgres_server  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=5, help="activations measured per ledger")
    p.add_argument("--replicas", type=int, default=3, help="watches following the ledger")
    p.add_argument("--polls", type=int, default=300, help="idle polls timed per ledger")
    p.add_argument("--no-postgres", action="store_true", help="SQLite only")
    return p.parse_args(argv)


async def measure(url: str, ca_dir: Path, args: argparse.Namespace) -> str:
    clock = SystemClock()
    material = load_ca_dir(ca_dir, clock.now())
    root = load_root_signer(ca_dir, material.roots)
    assert root is not None
    ledgers = [SqlLedger(url) for _ in range(args.replicas)]
    watches = [
        SigningWatch(SlotLedger(lg.engine), ca_dir, clock, trust_domain="example.org", root=root)
        for lg in ledgers
    ]
    for w in watches:
        w.load(material)
    try:
        timings, cpu = [], []
        for _ in range(args.polls):
            start, start_cpu = time.perf_counter(), time.process_time()
            await watches[0].poll_once()
            timings.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        idle, idle_cpu = statistics.median(timings), statistics.mean(cpu)
        tasks = [asyncio.create_task(w.run()) for w in watches]
        follow = []
        for _ in range(args.runs):
            await asyncio.sleep(random.uniform(0.0, 1.0))  # a random phase of their polls
            before = watches[0].current().generation
            start = time.perf_counter()
            await switch_to_root(
                SlotLedger(ledgers[0].engine),
                ca_dir,
                clock.now(),
                trust_domain="example.org",
                root=root,
            )
            while any(w.current().generation == before for w in watches):
                await asyncio.sleep(0.005)
            follow.append(time.perf_counter() - start)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for lg in ledgers:
            lg.close()
    return (
        f"idle poll median {idle * 1e6:.0f} us wall, {idle_cpu * 1e6:.0f} us CPU (one a "
        f"second per CA process: {idle_cpu * 100:.3f} % of a core); activation -> all "
        f"{args.replicas} replicas signing "
        f"with it over {args.runs} runs: median {statistics.median(follow):.3f} s "
        f"max {max(follow):.3f} s (poll 1 s)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ca_dir = Path(tmp) / "ca"
        init_ca_dir(ca_dir, TrustDomain.parse("example.org"), SystemClock().now())
        url = f"sqlite:///{Path(tmp) / 'ledger.db'}"
        print(f"sqlite:     {asyncio.run(measure(url, ca_dir, args))}", flush=True)
        if args.no_postgres:
            return
        with postgres_server() as pg:
            pg_dir = Path(tmp) / "ca-pg"
            init_ca_dir(pg_dir, TrustDomain.parse("example.org"), SystemClock().now())
            url = pg.create_database(f"b{uuid.uuid4().hex[:12]}")
            print(f"postgresql: {asyncio.run(measure(url, pg_dir, args))}", flush=True)


if __name__ == "__main__":
    main()
