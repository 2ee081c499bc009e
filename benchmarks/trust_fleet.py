"""What the trust stream costs the CA: a simulated fleet of agents' WatchTrust streams.

The CA runs in this process (TLS, grpclib, SQLite ledger, the trust bundle and revocations
polled every second, ``TrustService/WatchTrust`` as ``ca serve`` has it). ``--procs`` client
processes open ``--streams`` streams between them, each on its own mTLS connection with its
own workload certificate (distinct identities), as an agent's is (meshtrust's
GrpcTrustSource), and each reports the version it serves after every update, as an agent
does. Measured: the CA's memory per open stream, its CPU while the fleet sits idle, and for
each of ``--changes`` bundle changes (a root added, then removed, ...) the time until every
stream has the new version, the time until the ledger records every stream serving it, the
CA CPU it took and the messages per second the CA handled meanwhile (one update sent and one
report received per stream). Each figure is printed per run and as the median of the runs;
a linear extrapolation to 10,000 agents follows.

Run: ``.venv/bin/python benchmarks/trust_fleet.py --streams 2000 --procs 4 --changes 5``
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, sys
from meshtrust.agent.trust import GrpcTrustSource
from meshtrust.errors import CAUnavailable
address, root, certdir = sys.argv[1], open(sys.argv[2], "rb").read(), sys.argv[3]
first, n = int(sys.argv[4]), int(sys.argv[5])
async def one(i, versions):
    cert = (open(f"{certdir}/{i}.chain", "rb").read(), open(f"{certdir}/{i}.key", "rb").read())
    source = GrpcTrustSource(address, lambda: root, lambda: cert)
    while True:
        try:
            async for update in source.watch(versions[i - first], ""):
                versions[i - first] = update.bundle_version
                await source.report(update.bundle_version)
        except CAUnavailable:
            await asyncio.sleep(1)
async def main():
    versions = [0] * n
    tasks = []
    for i in range(first, first + n):
        tasks.append(asyncio.create_task(one(i, versions)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    last = None
    while True:
        await asyncio.sleep(0.01)
        low = min(versions)
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


def _issue_certs(ca_dir: Path, out: Path, count: int) -> None:
    """``count`` workload certificates (chain + key PEM) signed by the CA directory's signer."""
    import datetime as dt

    from meshtrust.ca.cadir import load_ca_dir
    from meshtrust.clock import SystemClock
    from meshtrust.pki import KeyType, certs_pem, generate_key, issue_leaf, private_key_pem
    from meshtrust.spiffe import SpiffeId, TrustDomain

    now = SystemClock().now()
    material = load_ca_dir(ca_dir, now)
    td = TrustDomain("example.org")
    out.mkdir()
    for i in range(count):
        key = generate_key(KeyType.EC_P256)
        leaf = issue_leaf(
            material.signer,
            key.public_key(),
            SpiffeId.for_workload(td, "fleet", f"w{i}"),
            now,
            dt.timedelta(hours=2),
        )
        (out / f"{i}.chain").write_bytes(certs_pem([leaf, *material.intermediates]))
        (out / f"{i}.key").write_bytes(private_key_pem(key))


async def measure(streams: int, procs: int, idle: float, changes: int) -> None:
    from meshtrust.ca import init_ca_dir
    from meshtrust.ca.assembly import build_authority, prepare_ca, start_revocations
    from meshtrust.ca.config import CaServeConfig
    from meshtrust.ca.ledger import GroupCommitLedger, SqlLedger
    from meshtrust.ca.metrics import CaMetrics
    from meshtrust.ca.server import CaGrpcService, GrpcServer, bind_listener
    from meshtrust.ca.trust import TrustLedger, add_root, fingerprint, remove_root
    from meshtrust.clock import SystemClock
    from meshtrust.metrics_text import TextRegistry
    from meshtrust.pki import KeyType, load_certs_pem
    from meshtrust.spiffe import TrustDomain

    workdir = Path(tempfile.mkdtemp(prefix="trust-fleet-"))
    clock = SystemClock()
    ca_dir, other = workdir / "ca", workdir / "ca-b"
    init_ca_dir(ca_dir, TrustDomain("example.org"), clock.now(), KeyType.EC_P256)
    init_ca_dir(other, TrustDomain("example.org"), clock.now(), KeyType.EC_P256)
    root_b = load_certs_pem((other / "root-cert.pem").read_bytes())[0]
    _issue_certs(ca_dir, workdir / "certs", streams)
    prepared = prepare_ca(
        CaServeConfig(ca_dir=ca_dir, listen="127.0.0.1:0", metrics_listen=None), clock
    )
    sql = SqlLedger(prepared.ledger_url)
    ledger = GroupCommitLedger(sql)
    revs = start_revocations(prepared, sql, clock)
    trust = TrustLedger(sql.engine)
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
        for p in range(procs):
            argv = [str(ca_dir / "root-cert.pem"), str(workdir / "certs"), str(p * per), str(per)]
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, address, *argv], stdout=subprocess.PIPE, text=True
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

        async def recorded(version: int) -> None:
            while True:
                served = await asyncio.to_thread(trust.served)
                if len(served) >= per * procs and all(s.version >= version for s in served):
                    return
                await asyncio.sleep(0.05)

        async with asyncio.timeout(600):
            await all_at(1)  # every stream has version 1
            await recorded(1)
        await asyncio.sleep(2)
        rss_after = _rss_kb()
        cpu0, t0 = _cpu(), time.monotonic()
        await asyncio.sleep(idle)
        idle_cpu = (_cpu() - cpu0) / (time.monotonic() - t0)
        n = per * procs
        print(
            f"{n} streams open: CA RSS +{(rss_after - rss_before) / 1024:.0f} MiB "
            f"({(rss_after - rss_before) / n:.1f} KiB/stream); idle CA CPU "
            f"{idle_cpu * 100:.2f}% of a core"
        )
        delivered, written, cpus, rates = [], [], [], []
        for i in range(changes):
            current = trust.current()
            assert current is not None
            if i % 2 == 0:
                roots = add_root(current.roots, root_b)
            else:
                roots, _ = remove_root(current.roots, fingerprint(root_b), ())
            cpu0, t0 = _cpu(), time.monotonic()
            made = trust.set_roots(
                roots, clock.now(), actor="bench", why="", expect_version=current.version
            )
            async with asyncio.timeout(300):
                await all_at(made.version)
                took = time.monotonic() - t0
                await recorded(made.version)
            took_ledger, cpu = time.monotonic() - t0, _cpu() - cpu0
            delivered.append(took)
            written.append(took_ledger)
            cpus.append(cpu)
            rates.append(2 * n / took_ledger)
            print(
                f"change {i + 1} (version {made.version}): every stream had it after "
                f"{took:.2f} s, every report in the ledger after {took_ledger:.2f} s "
                f"(both include the CA's ledger poll, up to 1 s); CA CPU {cpu:.2f} s = "
                f"{cpu / n * 1e6:.0f} us per agent; {2 * n / took_ledger:.0f} messages/s"
            )
            await asyncio.sleep(1)
        med = statistics.median
        print(
            f"median of {changes}: delivered {med(delivered):.2f} s, recorded "
            f"{med(written):.2f} s, CA CPU {med(cpus):.2f} s per change, "
            f"{med(rates):.0f} messages/s"
        )
        factor = 10_000 / n
        print(
            f"linear extrapolation to 10,000 agents: CA RSS "
            f"+{(rss_after - rss_before) * factor / 1024:.0f} MiB, idle CPU "
            f"{idle_cpu * 100:.2f}% of a core (it does not grow with idle streams), CPU per "
            f"bundle change {med(cpus) * factor:.1f} s (spread over the CA's workers)"
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
    parser.add_argument("--changes", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(measure(args.streams, args.procs, args.idle, args.changes))


if __name__ == "__main__":
    main()
