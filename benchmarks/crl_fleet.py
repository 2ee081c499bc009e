"""What CRL distribution costs the CA: a simulated fleet of agents' CRL streams.

The CA runs in this process (TLS, grpclib, SQLite ledger, revocations polled every second,
``CrlService/WatchCrl``). ``--procs`` client processes open ``--streams`` streams between
them, each on its own TLS connection as an agent's is (meshtrust's GrpcCrlSource). Measured:
the CA process's memory per open stream (RSS before and after), its CPU while the fleet sits
idle for ``--idle`` s, and for each of ``--revocations`` revocations the time until every
stream has the new CRL and the CA CPU it took. Extrapolate to 10,000 agents linearly (printed).

Run: ``.venv/bin/python benchmarks/crl_fleet.py --streams 2000 --procs 4``
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, sys
from meshtrust.agent.crl import GrpcCrlSource
address, root, n = sys.argv[1], open(sys.argv[2], "rb").read(), int(sys.argv[3])
async def one(source, counts, i):
    async for _ in source.watch(""):
        counts[i] += 1
async def main():
    counts = [0] * n
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(GrpcCrlSource(address, root), counts, i)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    last = None
    while True:
        await asyncio.sleep(0.01)
        low = min(counts)
        if low != last:
            last = low
            print(low, flush=True)
asyncio.run(main())
"""


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(streams: int, procs: int, idle: float, revocations: int) -> None:
    import datetime as dt

    from cryptography import x509

    from meshtrust.ca import IssuedRecord, init_ca_dir
    from meshtrust.ca.assembly import build_authority, prepare_ca, start_revocations
    from meshtrust.ca.config import CaServeConfig
    from meshtrust.ca.ledger import GroupCommitLedger, SqlLedger
    from meshtrust.ca.metrics import CaMetrics
    from meshtrust.ca.server import CaGrpcService, GrpcServer, bind_listener
    from meshtrust.clock import SystemClock
    from meshtrust.metrics_text import TextRegistry
    from meshtrust.pki import KeyType
    from meshtrust.spiffe import TrustDomain

    workdir = Path(tempfile.mkdtemp(prefix="crl-fleet-"))
    clock = SystemClock()
    ca_dir = workdir / "ca"
    init_ca_dir(ca_dir, TrustDomain("example.org"), clock.now(), KeyType.EC_P256)
    prepared = prepare_ca(
        CaServeConfig(ca_dir=ca_dir, listen="127.0.0.1:0", metrics_listen=None), clock
    )
    sql = SqlLedger(prepared.ledger_url)
    ledger = GroupCommitLedger(sql)
    revs = start_revocations(prepared, sql, clock)
    service = CaGrpcService(
        build_authority(prepared, clock, ledger, CaMetrics(TextRegistry()), revs.watch)
    )
    sock = bind_listener("127.0.0.1", 0, what="bench")
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    server = GrpcServer([service, revs.service])
    await server.start(sock=sock, ssl=prepared.ssl_context())
    children: list[subprocess.Popen[str]] = []
    try:
        rss_before = _rss_kb()
        per = streams // procs
        for _ in range(procs):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, address, str(ca_dir / "root-cert.pem"), str(per)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        readers = [asyncio.StreamReader() for _ in children]
        loop = asyncio.get_running_loop()
        for child, reader in zip(children, readers, strict=True):
            protocol = asyncio.StreamReaderProtocol(reader)
            assert child.stdout is not None
            await loop.connect_read_pipe(lambda p=protocol: p, child.stdout)  # type: ignore[misc]

        async def all_at(level: int) -> None:
            for reader in readers:
                while int((await reader.readline()) or b"-1") < level:
                    pass

        async with asyncio.timeout(300):
            await all_at(1)  # every stream has the first CRL
        await asyncio.sleep(2)
        rss_after = _rss_kb()
        cpu0, t0 = _cpu(), time.monotonic()
        await asyncio.sleep(idle)
        idle_cpu = (_cpu() - cpu0) / (time.monotonic() - t0)
        print(
            f"{streams} streams open: CA RSS +{(rss_after - rss_before) / 1024:.0f} MiB "
            f"({(rss_after - rss_before) / streams:.1f} KiB/stream); idle CA CPU "
            f"{idle_cpu * 100:.2f}% of a core"
        )
        now = clock.now()
        for i in range(revocations):
            serial = format(0x100 + i, "032x")
            sql.record_batch(
                [
                    IssuedRecord(
                        serial,
                        "spiffe://example.org/ns/default/sa/x",
                        now,
                        now + dt.timedelta(hours=1),
                        "ec-p256",
                        "bench",
                        "jwt",
                        now,
                        "-",
                    )
                ]
            )
            cpu0, t0 = _cpu(), time.monotonic()
            sql.revoke_serial(serial, x509.ReasonFlags.key_compromise, "bench", "", now)
            async with asyncio.timeout(120):
                await all_at(2 + i)
            took, cpu = time.monotonic() - t0, _cpu() - cpu0
            print(
                f"revocation {i + 1}: every stream had the new CRL after {took:.2f} s "
                f"(includes the CA's ledger poll, up to 1 s); CA CPU {cpu:.2f} s "
                f"= {cpu / streams * 1e6:.0f} us per stream"
            )
            await asyncio.sleep(1)
        factor = 10_000 / streams
        print(
            f"linear extrapolation to 10,000 agents: CA RSS "
            f"+{(rss_after - rss_before) * factor / 1024:.0f} MiB, CPU per revocation "
            f"{cpu * factor:.1f} s (spread over the CA's workers)"
        )
    finally:
        for child in children:
            child.kill()
            child.wait()
        await server.shutdown()
        await revs.aclose()
        await ledger.aclose()
        sql.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--revocations", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.streams, args.procs, args.idle, args.revocations))


if __name__ == "__main__":
    main()
