"""The child of ``benchmarks/agent.py``'s memory phase: one agent on a fake clock.

Run by that benchmark, never by hand: ``agent_rss_child.py DIR --rss-step S --rss-cert-ttl T``.
It builds an :class:`~meshtrust.agent.Agent` (SDS, Workload API, output files and the status
port all on) whose certificates come from an in-process CA signing on the same
:class:`~meshtrust.clock.FakeClock`, then obeys one command per stdin line — ``step``
(advance the clock ``S`` seconds and let the agent rotate) or ``report`` — answering each
with one JSON line that carries its own ``VmRSS``.

This file is deliberately small and imports only what a ``meshtrust agent`` process imports
(the CLI and the agent) plus the fake CA and clock: the benchmark harness (1,000 lines,
``argparse``, ``statistics``, ``subprocess``, the report code) used to be this child too,
and its code and imports, about 2.7 MB, were counted as the agent's memory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRUST_DOMAIN = "example.org"
NAMESPACE = "default"
SERVICE_ACCOUNT = "bench"
SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def proc_status_kb(field_name: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``, ...) of this process's status; -1 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


def smaps_pss_kb() -> int:
    """Proportional set size (shared pages split between the processes mapping them)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _emit(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    """Commands: ``step`` (advance the clock ``step`` seconds), ``report``."""
    directory, step, cert_ttl = Path(argv[0]), float(argv[2]), float(argv[4])
    if argv[1] != "--rss-step" or argv[3] != "--rss-cert-ttl":
        raise SystemExit("usage: agent_rss_child.py DIR --rss-step S --rss-cert-ttl T")
    entry_kb = proc_status_kb("VmRSS")  # the interpreter and its start-up stdlib
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # tests.fake_ca, tests.badcerts
    # The modules a `meshtrust agent` process loads: the CLI (its command groups) and, once
    # the command runs, the agent.
    import meshtrust.agent
    import meshtrust.cli.main  # noqa: F401

    imports_kb = proc_status_kb("VmRSS")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(_run(directory, step, cert_ttl, entry_kb, imports_kb))


async def _run(
    directory: Path, step: float, cert_ttl: float, entry_kb: int, imports_kb: int
) -> int:
    import socket

    from meshtrust.agent import AgentConfig, build_agent
    from meshtrust.clock import FakeClock
    from meshtrust.spiffe import SpiffeId
    from tests.badcerts import cert_pem, make_ca
    from tests.fake_ca import FakeClockCa

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        status_port = int(probe.getsockname()[1])

    clock = FakeClock(T0)
    clock_start = clock.monotonic()
    ca = make_ca(TRUST_DOMAIN, now=T0, lifetime=dt.timedelta(days=3650))
    root = directory / "root-cert.pem"
    root.write_bytes(cert_pem(ca.root))
    config = AgentConfig(
        ca_root=root,
        namespace=NAMESPACE,
        service_account=SERVICE_ACCOUNT,
        cert_ttl=dt.timedelta(seconds=cert_ttl),
        sds_socket=directory / "sds.sock",
        workload_socket=directory / "workload.sock",
        output_dir=directory / "certs",
        status_listen=f"127.0.0.1:{status_port}",
    )
    source = FakeClockCa(clock, ca, SpiffeId.parse(SPIFFE_ID))
    agent = build_agent(config, clock=clock, source=source, rng=random.Random(1))

    def state() -> dict[str, object]:
        current = agent.cache.current
        assert current is not None
        return {
            "sim_s": clock.monotonic() - clock_start,
            "generation": current.generation,
            "serial": current.leaf.serial_number,
            "issued": agent.metrics.rotations_ok,
            "failed": agent.metrics.rotations_failed,
            "ca_calls": source.calls,
            "rss_kb": proc_status_kb("VmRSS"),
        }

    await agent.start()
    try:
        await agent.cache.wait_newer(0)
        await clock.wait_for_sleepers(1)
        _emit(
            {
                "event": "ready",
                "sds": str(config.sds_socket),
                "workload": str(config.workload_socket),
                "files": str(config.output_dir),
                **state(),
            }
        )
        while True:
            command = (await asyncio.to_thread(sys.stdin.readline)).strip()
            if command == "step":
                await clock.advance(step)
                await clock.wait_for_sleepers(1)
                _emit({"event": "step", **state()})
            else:  # "report", or the parent went away
                _emit(
                    {
                        "event": "report",
                        "entry_kb": entry_kb,
                        "imports_kb": imports_kb,
                        "hwm_kb": proc_status_kb("VmHWM"),
                        "anon_kb": proc_status_kb("RssAnon"),
                        "file_kb": proc_status_kb("RssFile"),
                        "pss_kb": smaps_pss_kb(),
                        "threads": proc_status_kb("Threads"),
                        **state(),
                    }
                )
                return 0
    finally:
        await agent.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
