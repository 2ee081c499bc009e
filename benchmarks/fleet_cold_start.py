"""Cold start of a fleet: how long until 10,000 new workloads all hold a certificate.

A fleet simulator: ``--workloads`` (default 10,000) distinct identities
``spiffe://example.org/ns/fleet/sa/wNNNNN``, each with its own P-256 key and CSR and its own
service-account token (minted with the CA's token key, as ``ca_throughput.make_workloads``
does). They are generated afresh for every run, before the clock starts, inside
``--fleet-procs`` load processes (grpcio.aio, C-core HTTP/2), each owning a slice of the
fleet and ``--channels`` gRPC connections to every replica. Nothing is reused across runs:
new keys, new tokens, new connections (made after the clock starts, as a starting fleet
would), freshly started CA processes and a fresh, empty ledger database.

At the start every workload asks once, at the same moment (a cold start: nobody holds a
certificate yet). Each has a replica list starting at a different replica (workload ``i``
starts at replica ``i % replicas``) and retries like an agent: on UNAVAILABLE (the replica
is down, or the connection was lost) it moves to the next replica after a short backoff
(exponential from 50 ms, jittered); any other status is an error, counted by code, and that
workload gets no certificate. Settings measured in one run:

1. ``ca serve`` with its defaults (SQLite ledger, one replica);
2. one ``ca serve`` on a PostgreSQL ledger (a throwaway server from tests/postgres.py);
3. ``--replicas`` (default 3) ``ca serve`` processes sharing the CA directory and the
   PostgreSQL ledger;
4. the same, with one replica (its supervisor and workers) SIGKILLed the moment half the
   fleet holds certificates.

For each: the time until every workload holds a certificate (median of ``--runs``), p50/p99
of the per-workload time to certificate (from the common start), errors by code, retries
(with the reasons the CA or gRPC gave), and the ledger check: every certificate a workload
received is in the ledger, and no serial was handed out twice (the serial is the ledger's
primary key, so no row is there twice). Ledger rows nobody received are counted too (with a
replica killed, a certificate may be committed while its answer is lost; the workload
retried elsewhere).

CPU is accounted from /proc over the run: the CA processes (supervisors and workers), the
PostgreSQL server (postmaster and backends), the fleet processes, and "other" (the kernel's
loopback TCP and whatever else runs on the machine); the second before each run, with none
of the benchmark's processes running, says how busy the machine was without it. On a 2-core
machine the fleet shares the cores with the CA, so its CPU is part of the picture. The goal
(issue 11) is 0 errors and at most 10 s until all hold a certificate; the summary says PASS
or MISS per setting.

Run: ``.venv/bin/python benchmarks/fleet_cold_start.py`` (``--workloads 2000 --runs 1`` for
a quick look)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import ca_throughput as bench  # noqa: E402

from tests.postgres import PostgresServer, postgres_server  # noqa: E402

TARGET_SECONDS = 10.0
NAMESPACE = "fleet"
SA_FORMAT = "w{:05d}"
KEY_TYPE = "ec-p256"
REQUEST_TIMEOUT = 60.0  # per attempt; a cold start queues thousands of calls at the CA
FLEET_TIMEOUT = 180.0  # a workload stops retrying this long after the start
BACKOFF_BASE = 0.05
BACKOFF_CAP = 1.0
PREPARE_TIMEOUT = 300.0  # generating keys, CSRs and tokens before the clock
START_DELAY = 0.3  # the common start is this far after every fleet process is ready


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class FleetSpec:
    """What one fleet process simulates: workloads ``first`` .. ``first + count - 1``."""

    index: int
    ca_dir: str
    targets: tuple[str, ...]  # one per replica
    root_pem: bytes
    first: int
    count: int
    channels: int  # per replica


@dataclass
class FleetResult:
    """What one fleet process saw. Times are seconds from the common start."""

    times_s: list[float] = field(default_factory=list)  # per workload that got a certificate
    serials: list[str] = field(default_factory=list)  # of every certificate received
    errors: dict[str, int] = field(default_factory=dict)  # by status code
    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)  # the status details
    cpu_s: float = 0.0  # this process's CPU from the start until its last workload was done
    fatal: str | None = None


@dataclass(frozen=True)
class Cpu:
    """Average cores used from the start until the last workload was done."""

    ca: float = 0.0
    postgres: float = 0.0
    fleet: float = 0.0
    machine: float = 0.0

    @property
    def other(self) -> float:
        """Kernel (loopback TCP) and processes that are not part of the benchmark."""
        return max(0.0, self.machine - self.ca - self.postgres - self.fleet)


@dataclass(frozen=True)
class ColdStart:
    """One cold start of the whole fleet."""

    workloads: int
    holding: int  # workloads that ended with a certificate
    all_hold_s: float  # until the last one got its certificate (inf: some never did)
    p50_s: float
    p99_s: float
    errors: dict[str, int]
    retries: int
    retry_reasons: dict[str, int]
    ledger_missing: int  # received but not in the ledger
    duplicates: int  # serials received more than once
    unreceived_rows: int  # in the ledger, received by nobody
    killed_at_s: float | None  # when a replica was SIGKILLed
    cpu: Cpu
    busy_before: float = 0.0  # cores busy in the second before the run, none of them ours

    @property
    def clean(self) -> bool:
        return (
            self.holding == self.workloads
            and not self.errors
            and self.ledger_missing == 0
            and self.duplicates == 0
        )


# --------------------------------------------------------------------------- the fleet


def retry_reason(details: str) -> str:
    """A retry's status details without the replica's address, so that reasons add up."""
    return re.sub(r"ipv4:127\.0\.0\.1:\d+: ?", "", details)[:110]


def retry_delay(attempt: int, rand: float) -> float:
    """Backoff before retry ``attempt`` (0 first) on another replica: 50 ms doubling up to
    1 s, spread by ±50 % (``rand`` in [-1, 1]) so a crowd that lost a replica together does
    not arrive at the next one together."""
    from meshtrust.agent import backoff_delay

    return backoff_delay(attempt, BACKOFF_BASE, BACKOFF_CAP, jitter=0.5, rand=rand)


async def _fleet(spec: FleetSpec, conn: mpc.Connection, holding: Synchronized[int]) -> FleetResult:
    import grpc
    import grpc.aio

    from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc

    workloads = bench.make_workloads(
        Path(spec.ca_dir),
        KEY_TYPE,
        spec.count,
        namespace=NAMESPACE,
        sa_format=SA_FORMAT,
        first=spec.first,
    )
    creds = grpc.ssl_channel_credentials(root_certificates=spec.root_pem)
    # Channels are made now but connect on their first call, after the start.
    channels = [
        [
            grpc.aio.secure_channel(
                target,
                creds,
                options=[("grpc.use_local_subchannel_pool", 1), ("meshtrust.fleet", c)],
            )
            for c in range(spec.channels)
        ]
        for target in spec.targets
    ]
    stubs = [
        [ca_pb2_grpc.IstioCertificateServiceStub(ch) for ch in row]  # type: ignore[no-untyped-call]
        for row in channels
    ]
    result = FleetResult()
    leaves: list[str] = []
    rng = random.Random(spec.index)
    conn.send(("ready", None))
    start = await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    async def workload(i: int) -> None:
        global_index = spec.first + i
        request = ca_pb2.IstioCertificateRequest(csr=workloads[i].csr_pem)
        metadata = (("authorization", f"Bearer {workloads[i].token}"),)
        replicas = len(spec.targets)
        attempt = 0
        while True:
            stub = stubs[(global_index + attempt) % replicas][global_index % spec.channels]
            try:
                resp = await stub.CreateCertificate(
                    request, metadata=metadata, timeout=REQUEST_TIMEOUT
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                late = time.time() - start > FLEET_TIMEOUT
                if code != grpc.StatusCode.UNAVAILABLE or late:
                    name = code.name + (" (gave up after retries)" if late else "")
                    result.errors[name] = result.errors.get(name, 0) + 1
                    return
                result.retries += 1
                reason = retry_reason(exc.details() or "")
                result.retry_reasons[reason] = result.retry_reasons.get(reason, 0) + 1
                await asyncio.sleep(retry_delay(attempt, rng.uniform(-1.0, 1.0)))
                attempt += 1
                continue
            result.times_s.append(time.time() - start)
            leaves.append(resp.cert_chain[0])
            with holding.get_lock():
                holding.value += 1
            return

    await asyncio.sleep(max(0.0, start - time.time()))
    cpu0 = time.process_time()
    await asyncio.gather(*(workload(i) for i in range(len(workloads))))
    result.cpu_s = time.process_time() - cpu0
    conn.send(("done", None))
    result.serials = [bench.leaf_serial_hex(pem) for pem in leaves]
    for row in channels:
        for ch in row:
            await ch.close()
    return result


def fleet_process(spec: FleetSpec, conn: mpc.Connection, holding: Synchronized[int]) -> None:
    """Entry point of one fleet process (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    try:
        result = asyncio.run(_fleet(spec, conn, holding))
    except Exception as exc:  # report, never hang the parent
        result = FleetResult(fatal=f"fleet process {spec.index}: {exc!r}"[:500])
    with contextlib.suppress(OSError):  # the parent is gone (interrupted): nothing to report
        conn.send(("result", dataclasses.asdict(result)))
        conn.close()


# --------------------------------------------------------------------------- CPU from /proc


def postgres_cpu_seconds(pg: PostgresServer) -> float:
    """CPU seconds of the PostgreSQL server: the postmaster, its live backends, and the
    backends it has already reaped (its cutime/cstime)."""
    try:
        pid = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        fields = bench._stat_fields(pid)
    except (OSError, ValueError, IndexError):
        return 0.0
    reaped = (int(fields[13]) + int(fields[14])) / bench._CLK_TCK
    own, children = bench.tree_cpu_seconds(pid)
    return own + reaped + sum(children.values())


def ca_cpu_seconds(server: bench.ServerProcess) -> float:
    """CPU seconds of one CA replica: its supervisor and its live workers."""
    own, workers = bench.tree_cpu_seconds(server.proc.pid)
    return own + sum(workers.values())


def machine_busy_over(seconds: float) -> float:
    """Average cores busy over the next ``seconds``: how loaded the machine is without us."""
    busy0 = bench.machine_busy_seconds()
    time.sleep(seconds)
    return (bench.machine_busy_seconds() - busy0) / seconds


def kill_replica(server: bench.ServerProcess) -> None:
    """SIGKILL a replica's supervisor and its workers at once (a node lost, not a shutdown)."""
    _, workers = bench.tree_cpu_seconds(server.proc.pid)
    for pid in [server.proc.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.proc.wait()


# --------------------------------------------------------------------------- one cold start


@contextlib.contextmanager
def fleet_processes(
    specs: Sequence[FleetSpec], holding: Synchronized[int]
) -> Iterator[list[tuple[mp.process.BaseProcess, mpc.Connection]]]:
    """The fleet processes, started; joined (killed if need be) on exit, errors included."""
    ctx = mp.get_context("spawn")
    procs: list[tuple[mp.process.BaseProcess, mpc.Connection]] = []
    try:
        for spec in specs:
            parent_end, child_end = ctx.Pipe()
            child = ctx.Process(target=fleet_process, args=(spec, child_end, holding), daemon=True)
            child.start()
            child_end.close()
            procs.append((child, parent_end))
        yield procs
    finally:
        for proc, conn in procs:
            conn.close()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _expect(conn: mpc.Connection, kind: str, timeout: float) -> object:
    if not conn.poll(timeout):
        raise RuntimeError(f"a fleet process sent no {kind!r} within {timeout:.0f} s")
    try:
        got, payload = conn.recv()
    except EOFError:
        raise RuntimeError(f"a fleet process died before sending {kind!r}") from None
    if got == "result" and kind != "result":  # it failed early: say why
        raise RuntimeError(str(payload.get("fatal") if isinstance(payload, dict) else payload))
    if got != kind:
        raise RuntimeError(f"a fleet process sent {got!r}, expected {kind!r}")
    return payload


def watch_fleet(
    conns: Sequence[mpc.Connection],
    holding: Synchronized[int],
    start: float,
    kill_at: int | None,
    victim: bench.ServerProcess,
) -> tuple[float | None, float | None]:
    """Wait until every fleet process says it is done; SIGKILL ``victim`` once ``holding``
    reaches ``kill_at``. Returns when that was (seconds from ``start``) and the victim's CPU
    seconds just before (None, None: no kill)."""
    killed_at: float | None = None
    victim_cpu: float | None = None
    pending = set(conns)
    deadline = time.monotonic() + FLEET_TIMEOUT + REQUEST_TIMEOUT + 30
    while pending:
        if kill_at is not None and killed_at is None and holding.value >= kill_at:
            victim_cpu = ca_cpu_seconds(victim)
            kill_replica(victim)
            killed_at = time.time() - start
        for ready in mpc.wait(list(pending), timeout=0.002):
            assert isinstance(ready, mpc.Connection)
            _expect(ready, "done", 0)
            pending.discard(ready)
        if time.monotonic() > deadline:
            raise RuntimeError("the fleet did not finish (a fleet process hung?)")
    return killed_at, victim_cpu


def cold_start(
    servers: Sequence[bench.ServerProcess],
    targets: Sequence[str],
    root_pem: bytes,
    ca_dir: Path,
    ledger_url: str,
    args: argparse.Namespace,
    pg: PostgresServer | None,
    kill_at_half: bool,
) -> ColdStart:
    """One cold start of ``args.workloads`` workloads against ``targets``; with
    ``kill_at_half``, ``servers[0]`` is SIGKILLed once half the fleet holds certificates."""
    n, procs_n = args.workloads, min(args.fleet_procs, args.workloads)
    specs = [
        FleetSpec(
            index=i,
            ca_dir=str(ca_dir),
            targets=tuple(targets),
            root_pem=root_pem,
            first=i * n // procs_n,
            count=(i + 1) * n // procs_n - i * n // procs_n,
            channels=args.channels,
        )
        for i in range(procs_n)
    ]
    holding: Synchronized[int] = mp.get_context("spawn").Value("i", 0)
    with fleet_processes(specs, holding) as procs:
        for _, conn in procs:
            _expect(conn, "ready", PREPARE_TIMEOUT)
        start = time.time() + START_DELAY
        for _, conn in procs:
            conn.send(start)
        time.sleep(max(0.0, start - time.time()))
        ca0 = [ca_cpu_seconds(s) for s in servers]
        pg0 = postgres_cpu_seconds(pg) if pg is not None else 0.0
        busy0 = bench.machine_busy_seconds()
        conns = [conn for _, conn in procs]
        kill_at = n // 2 if kill_at_half else None
        killed_at, victim_cpu = watch_fleet(conns, holding, start, kill_at, servers[0])
        elapsed = time.time() - start
        ca1 = [ca_cpu_seconds(s) for s in servers]
        if victim_cpu is not None:
            ca1[0] = victim_cpu
        pg1 = postgres_cpu_seconds(pg) if pg is not None else 0.0
        busy1 = bench.machine_busy_seconds()
        results = []
        for _, conn in procs:
            payload = _expect(conn, "result", 120)
            assert isinstance(payload, dict)
            results.append(FleetResult(**payload))
    fatal = [r.fatal for r in results if r.fatal]
    if fatal:
        raise RuntimeError("; ".join(fatal))
    cpu = Cpu(
        ca=(sum(ca1) - sum(ca0)) / elapsed,
        postgres=(pg1 - pg0) / elapsed,
        fleet=sum(r.cpu_s for r in results) / elapsed,
        machine=(busy1 - busy0) / elapsed,
    )
    return judge(results, ledger_serials(ledger_url), n, killed_at, cpu)


def ledger_serials(url: str) -> set[str]:
    from meshtrust.ca import SqlLedger

    sql = SqlLedger(url)
    try:
        return sql.serials()
    finally:
        sql.close()


def judge(
    results: Sequence[FleetResult],
    in_ledger: set[str],
    workloads: int,
    killed_at: float | None,
    cpu: Cpu,
) -> ColdStart:
    """What the fleet received, set against what the ledger holds."""
    times = sorted(t for r in results for t in r.times_s)
    received = [s for r in results for s in r.serials]
    errors: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in results:
        for code, count in r.errors.items():
            errors[code] = errors.get(code, 0) + count
        for reason, count in r.retry_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
    return ColdStart(
        workloads=workloads,
        holding=len(times),
        all_hold_s=times[-1] if len(times) == workloads else float("inf"),
        p50_s=bench.percentile(times, 50),
        p99_s=bench.percentile(times, 99),
        errors=errors,
        retries=sum(r.retries for r in results),
        retry_reasons=reasons,
        ledger_missing=len(set(received) - in_ledger),
        duplicates=len(received) - len(set(received)),
        unreceived_rows=len(in_ledger - set(received)),
        killed_at_s=killed_at,
        cpu=cpu,
    )


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    name: str
    postgres: bool
    replicas: int
    kill_at_half: bool


def settings_for(replicas: int) -> list[Setting]:
    return [
        Setting("SQLite, 1 replica", False, 1, False),
        Setting("PostgreSQL, 1 replica", True, 1, False),
        Setting(f"PostgreSQL, {replicas} replicas", True, replicas, False),
        Setting(f"PostgreSQL, {replicas} replicas, 1 killed", True, replicas, True),
    ]


def fresh_ledger(setting: Setting, key: str, ca_dir: Path, pg: PostgresServer) -> str:
    """An empty ledger for one run: a new PostgreSQL database, or no ``ledger.db`` in the
    CA directory (``ca serve``'s default ledger, created on start)."""
    from meshtrust.ca import default_ledger_url

    if setting.postgres:
        return pg.create_database(key)
    for suffix in ("", "-wal", "-shm", "-journal"):
        (ca_dir / f"ledger.db{suffix}").unlink(missing_ok=True)
    return default_ledger_url(ca_dir)


def run_setting(
    index: int,
    setting: Setting,
    ca_dir: Path,
    root_pem: bytes,
    pg: PostgresServer,
    args: argparse.Namespace,
    tmp: Path,
    servers: list[bench.ServerProcess],
) -> list[ColdStart]:
    """``args.runs`` cold starts, each on freshly started replicas and an empty ledger."""
    print(f"{setting.name}:", flush=True)
    runs = []
    for k in range(args.runs):
        url = fresh_ledger(setting, f"fleet_{index}_{k}", ca_dir, pg)
        busy_before = machine_busy_over(1.0)
        group = []
        for i in range(setting.replicas):
            server, target = bench.start_meshtrust_server(
                ca_dir,
                None,
                tmp / f"setting{index}-run{k}-replica{i}.log",
                url if setting.postgres else None,
            )
            servers.append(server)
            group.append((server, target))
        try:
            r = cold_start(
                [s for s, _ in group],
                [t for _, t in group],
                root_pem,
                ca_dir,
                url,
                args,
                pg if setting.postgres else None,
                setting.kill_at_half,
            )
        except RuntimeError as exc:
            logs = "".join(f"\nlog ({s.log_path}):\n{s.log_tail()}" for s, _ in group)
            raise RuntimeError(f"{exc}{logs}") from exc
        finally:
            for server, _ in group:
                server.stop()
                servers.remove(server)
        r = dataclasses.replace(r, busy_before=busy_before)
        print_run(f"run {k + 1}", r)
        runs.append(r)
    return runs


# --------------------------------------------------------------------------- report


def _secs(x: float) -> str:
    return "never" if x == float("inf") else f"{x:.2f} s"


def print_run(label: str, r: ColdStart) -> None:
    ledger = (
        "ok"
        if r.ledger_missing == 0 and r.duplicates == 0
        else (f"MISSING {r.ledger_missing}, DUPLICATE {r.duplicates}")
    )
    kill = f", replica killed at {r.killed_at_s:.2f} s" if r.killed_at_s is not None else ""
    print(
        f"  {label:<7} {r.holding}/{r.workloads} hold a certificate, all after "
        f"{_secs(r.all_hold_s)}; per workload p50 {r.p50_s:.2f} s, p99 {r.p99_s:.2f} s; "
        f"errors {sum(r.errors.values())}; retries {r.retries}{kill}"
    )
    c = r.cpu
    print(
        f"          ledger {ledger} ({r.unreceived_rows} rows nobody received); cores: "
        f"CA {c.ca:.2f}, PostgreSQL {c.postgres:.2f}, fleet {c.fleet:.2f}, other {c.other:.2f}"
        f" (kernel, other processes), machine {c.machine:.2f}/{os.cpu_count()}; "
        f"{r.busy_before:.2f} busy just before",
        flush=True,
    )
    for code, n in sorted(r.errors.items(), key=lambda kv: -kv[1]):
        print(f"          error: {n} x {code}")
    for reason, n in sorted(r.retry_reasons.items(), key=lambda kv: -kv[1])[:3]:
        print(f"          retried: {n} x UNAVAILABLE: {reason}")


def median(runs: Sequence[ColdStart], key: Callable[[ColdStart], float]) -> float:
    return statistics.median(key(r) for r in runs)


def print_summary(results: Sequence[tuple[Setting, list[ColdStart]]], runs: int) -> bool:
    """The comparison with the goal; True when every setting met it."""
    print(f"\nsummary (median of {runs} run{'s' if runs > 1 else ''} per setting)")
    every = True
    for setting, rs in results:
        all_hold = median(rs, lambda r: r.all_hold_s)
        errors: dict[str, int] = {}
        for r in rs:
            for code, n in r.errors.items():
                errors[code] = errors.get(code, 0) + n
        clean = all(r.clean for r in rs)
        met = clean and all_hold <= TARGET_SECONDS
        every = every and met
        ledger = (
            "complete"
            if all(r.ledger_missing == 0 and r.duplicates == 0 for r in rs)
            else "INCOMPLETE"
        )
        err = ", ".join(f"{n} {c}" for c, n in errors.items()) or "0"
        print(
            f"  {setting.name:<33} all hold after {_secs(all_hold):>8}  "
            f"p50 {median(rs, lambda r: r.p50_s):5.2f} s  "
            f"p99 {median(rs, lambda r: r.p99_s):5.2f} s"
            f"  errors {err}  retries {median(rs, lambda r: r.retries):.0f}  ledger {ledger}  "
            f"{'PASS' if met else 'MISS'}"
        )
        print(
            f"  {'':<33} cores: CA {median(rs, lambda r: r.cpu.ca):.2f}, PostgreSQL "
            f"{median(rs, lambda r: r.cpu.postgres):.2f}, fleet "
            f"{median(rs, lambda r: r.cpu.fleet):.2f}, "
            f"other {median(rs, lambda r: r.cpu.other):.2f}; "
            f"{median(rs, lambda r: r.busy_before):.2f} busy before the runs (none of it ours)"
        )
    print(
        f"  goal: every workload holds a certificate within {TARGET_SECONDS:.0f} s, 0 errors, "
        f"ledger complete: {'PASS' if every else 'MISS'}"
    )
    return every


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=(
            "Each setting starts its CA replicas afresh for every run, on an empty ledger, and "
            "a new fleet (keys, CSRs, tokens) is made before each run's clock starts. "
            "PostgreSQL must be installed (scripts/system-packages). "
            "Quick look: --workloads 2000 --runs 1."
        ),
    )
    p.add_argument("--workloads", type=int, default=10_000, help="workloads in the fleet [10000]")
    p.add_argument(
        "--runs", type=int, default=3, help="cold starts per setting; the median is shown [3]"
    )
    p.add_argument(
        "--replicas", type=int, default=3, help="CA replicas in the last two settings [3]"
    )
    p.add_argument("--fleet-procs", type=int, default=4, help="processes simulating the fleet [4]")
    p.add_argument(
        "--channels",
        type=int,
        default=16,
        help="gRPC connections per fleet process and replica [16]",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temp directory (the CA replicas' logs)"
    )
    args = p.parse_args(argv)
    if min(args.workloads, args.runs, args.fleet_procs, args.channels) < 1 or args.replicas < 2:
        p.error("--workloads, --runs, --fleet-procs, --channels must be >= 1, --replicas >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mtb-fleet-"))
    servers: list[bench.ServerProcess] = []
    results: list[tuple[Setting, list[ColdStart]]] = []
    try:
        with bench.stopping(servers), postgres_server() as pg:
            ca_dir = tmp / "ca"
            subprocess.run(
                [*bench.meshtrust_command(), "ca", "init", "--dir", str(ca_dir),
                 "--trust-domain", bench.TRUST_DOMAIN, "--key-type", KEY_TYPE],
                check=True,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            root_pem = (ca_dir / "root-cert.pem").read_bytes()
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            print(
                f"machine: {os.cpu_count()} cores, load average {load}; PostgreSQL "
                f"{pg.psql('SHOW server_version').strip()}; fleet: {args.workloads} workloads "
                f"in {args.fleet_procs} processes x {args.channels} connections per replica; "
                f"{args.runs} run(s) per setting",
                flush=True,
            )
            for i, setting in enumerate(settings_for(args.replicas)):
                rs = run_setting(i, setting, ca_dir, root_pem, pg, args, tmp, servers)
                results.append((setting, rs))
            met = print_summary(results, args.runs)
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"  load average at the end: {load}")
            return 0 if met else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
