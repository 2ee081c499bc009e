"""End-to-end throughput of the CA against its in-process limit.

Starts the real server (``meshtrust ca serve``: TLS, JWT authentication, SQLite ledger on
disk) as a subprocess on a free port, drives it with many concurrent ``CreateCertificate``
calls from grpcio.aio clients (C-core HTTP/2, in ``--clients`` separate processes) for a
fixed time, and prints certificates/s with p50/p99 latency. In the same run it measures the
in-process limit: CSR parse + signature verify + build and sign the leaf + PEM encode, one
core, same key type, no transport. The ratio of the two says what the transport, the
authentication and the ledger cost.

After each run every certificate a client received must be in the ledger (the CA answers only
after the record is committed), and the run must have no failures. Each run also says where
the CPU went (server main process, each worker, load clients, everything else) from /proc:
on a small machine the load generator shares the cores, and a worker that got none of the
connections shows up as ``+ 0.00``.

``--compare-grpcio`` also serves the same in-process CA handler (same authority, same
group-committed SQLite ledger) behind a minimal one-process grpcio.aio server, measured with
the same load. grpcio's Python server cannot ask for an *optional* client certificate, so
meshtrust serves with grpclib; this shows what that choice costs.

The server runs with ``ca serve``'s defaults (one worker per CPU) unless ``--workers`` is
given. Besides certificates/s, the summary prints the CA's CPU time per certificate (user+sys
of the CA's processes from /proc, divided by the certificates issued) next to the in-process
cost of one certificate, and their ratio: a figure that does not depend on how many cores the
load generator took.

Run: ``.venv/bin/python benchmarks/ca_throughput.py --duration 5 --runs 3``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TARGET_CERTS_PER_S = 2000.0
TARGET_RATIO = 0.5
TRUST_DOMAIN = "example.org"
NAMESPACE = "bench"
SERVER_READY_TIMEOUT = 30.0
CLIENT_READY_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
BUSY_OTHER_CORES = 0.15


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Workload:
    """One workload identity: its bearer token and a ready-made CSR (reused per request)."""

    token: str
    csr_pem: str


@dataclass(frozen=True)
class ClientSpec:
    """What one load-generator process does."""

    index: int
    target: str
    root_pem: bytes
    workloads: tuple[Workload, ...]
    concurrency: int
    channels: int


@dataclass
class ClientResult:
    """What one load-generator process measured. Times are ``time.time()`` seconds."""

    ok_in_window: int = 0
    failed_in_window: int = 0
    failed_total: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    leaf_pems: list[str] = field(default_factory=list)  # every success, warm-up included
    errors: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0  # this process's CPU time during the window
    fatal: str | None = None


@dataclass(frozen=True)
class RunResult:
    certs_per_s: float
    p50_ms: float
    p99_ms: float
    ok: int
    failures: int
    ledger_missing: int
    ledger_new_rows: int
    returned: int
    errors: dict[str, int]
    cpu: CpuShare


@dataclass(frozen=True)
class CpuShare:
    """Average cores used during the measured window."""

    workers: float = 0.0
    per_worker: tuple[float, ...] = ()  # busiest first: shows how connections spread
    supervisor: float = 0.0
    clients: float = 0.0
    machine: float = 0.0

    @property
    def other(self) -> float:
        """Kernel (loopback TCP) and processes that are not part of the benchmark."""
        return max(0.0, self.machine - self.workers - self.supervisor - self.clients)


# --------------------------------------------------------------------------- helpers


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100); nan if empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()  # fields from 3 (state) on


def tree_cpu_seconds(pid: int) -> tuple[float, dict[int, float]]:
    """CPU seconds of ``pid`` and of each of its live children (by pid), from /proc."""
    try:
        own = _stat_fields(pid)
    except OSError:
        return 0.0, {}
    children: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            f = _stat_fields(int(entry))
        except OSError:
            continue
        if f[1] == str(pid):
            children[int(entry)] = (int(f[11]) + int(f[12])) / _CLK_TCK
    return (int(own[11]) + int(own[12])) / _CLK_TCK, children


def servers_cpu_seconds(pids: Sequence[int]) -> tuple[float, dict[int, float]]:
    """:func:`tree_cpu_seconds` summed over several servers (CA replicas): their main
    processes' seconds, and every worker by pid."""
    total, workers = 0.0, {}
    for pid in pids:
        own, children = tree_cpu_seconds(pid)
        total += own
        workers.update(children)
    return total, workers


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
    return (sum(parts[:8]) - idle) / _CLK_TCK


def meshtrust_command() -> list[str]:
    script = Path(sys.executable).parent / "meshtrust"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from meshtrust.cli import main; main()"]


def make_workloads(
    ca_dir: Path,
    key_type: str,
    count: int,
    *,
    namespace: str = NAMESPACE,
    sa_format: str = "bench-{:02d}",
    first: int = 0,
) -> tuple[Workload, ...]:
    """``count`` identities ``spiffe://TD/ns/bench/sa/bench-NN``, each a token and a CSR
    (``namespace``, ``sa_format`` and ``first``: other names, numbered from ``first``)."""
    from meshtrust.ca import load_token_signing_key, mint_token, token_issuer_for
    from meshtrust.pki import KeyType, build_csr, generate_key
    from meshtrust.spiffe import SpiffeId, TrustDomain

    td = TrustDomain.parse(TRUST_DOMAIN)
    signing_key = load_token_signing_key(ca_dir)
    if signing_key is None:
        raise SystemExit(f"{ca_dir} has no token-key.pem")
    now = dt.datetime.now(dt.UTC)
    out = []
    for i in range(first, first + count):
        sa = sa_format.format(i)
        token = mint_token(
            signing_key, token_issuer_for(td), namespace, sa, now, dt.timedelta(hours=2)
        )
        key = generate_key(KeyType.parse(key_type))
        out.append(Workload(token, build_csr(key, SpiffeId.for_workload(td, namespace, sa))))
    return tuple(out)


def leaf_serial_hex(leaf_pem: str) -> str:
    from cryptography import x509

    from meshtrust.pki import format_serial

    return format_serial(x509.load_pem_x509_certificate(leaf_pem.encode()).serial_number)


# --------------------------------------------------------------------------- in-process limit


def in_process_limit(ca_dir: Path, workloads: Sequence[Workload], seconds: float) -> float:
    """Certificates/s on one core: parse_csr (incl. signature verify) + issuing the leaf (the
    CA's own LeafIssuer) + PEM."""
    from cryptography.hazmat.primitives import serialization

    from meshtrust.ca import load_ca_dir
    from meshtrust.pki import parse_csr
    from meshtrust.pki.profile import LeafIssuer
    from meshtrust.spiffe import SpiffeId, TrustDomain

    now = dt.datetime.now(dt.UTC)
    issuer = LeafIssuer(load_ca_dir(ca_dir, now).signer)
    td = TrustDomain.parse(TRUST_DOMAIN)
    ids = [SpiffeId.for_workload(td, NAMESPACE, f"bench-{i:02d}") for i in range(len(workloads))]
    ttl = dt.timedelta(hours=24)
    pem = serialization.Encoding.PEM
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for w, spiffe_id in zip(workloads, ids, strict=True):
            csr = parse_csr(w.csr_pem)
            leaf = issuer.issue(csr.public_key, spiffe_id, now, ttl)
            leaf.public_bytes(pem).decode()
        n += len(workloads)
        now_s = time.perf_counter()
        if now_s >= deadline:
            return n / (now_s - start)


class _NullLedger:
    async def record(self, rec: object) -> None:
        return None


class _NullMetrics:
    def observe(self, event: object) -> None:
        return None


def in_process_handler(ca_dir: Path, workloads: Sequence[Workload], seconds: float) -> float:
    """Certificates/s of the server's own handler (``CertificateAuthority.create_certificate``:
    JWT authn (cached) + CSR checks + sign + record building), one core, no transport and a
    ledger that does nothing: the upper bound one worker could reach."""
    from meshtrust.ca import CaServeConfig, Credentials, prepare_ca
    from meshtrust.ca.assembly import build_authority
    from meshtrust.clock import SystemClock
    from meshtrust.spiffe import TrustDomain

    clock = SystemClock()
    config = CaServeConfig(
        ca_dir=ca_dir, metrics_listen=None, trust_domain=TrustDomain.parse(TRUST_DOMAIN)
    )
    authority = build_authority(prepare_ca(config, clock), clock, _NullLedger(), _NullMetrics())
    creds = [Credentials(bearer_token=w.token, peer_cert_der=None) for w in workloads]

    async def loop() -> float:
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for w, c in zip(workloads, creds, strict=True):
                await authority.create_certificate(w.csr_pem, 0, c)
            n += len(workloads)
            now = time.perf_counter()
            if now >= deadline:
                return n / (now - start)

    return asyncio.run(loop())


# --------------------------------------------------------------------------- load generator


async def _load(spec: ClientSpec, conn: mpc.Connection) -> ClientResult:
    import grpc
    import grpc.aio

    from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc

    result = ClientResult()
    creds = grpc.ssl_channel_credentials(root_certificates=spec.root_pem)
    channels = [
        grpc.aio.secure_channel(
            spec.target,
            creds,
            # A connection of its own per channel, so connections spread over the workers.
            options=[("grpc.use_local_subchannel_pool", 1), ("meshtrust.bench.channel", i)],
        )
        for i in range(spec.channels)
    ]
    stubs = [ca_pb2_grpc.IstioCertificateServiceStub(ch) for ch in channels]  # type: ignore[no-untyped-call]
    requests = [
        (ca_pb2.IstioCertificateRequest(csr=w.csr_pem), (("authorization", f"Bearer {w.token}"),))
        for w in spec.workloads
    ]
    window = [float("inf"), float("inf")]  # [start, end], set by the parent
    stop = asyncio.Event()

    async def worker(slot: int) -> None:
        stub = stubs[slot % len(stubs)]
        k = slot
        while not stop.is_set():
            request, metadata = requests[k % len(requests)]
            k += 1
            t0 = time.time()
            try:
                resp = await stub.CreateCertificate(
                    request, metadata=metadata, timeout=REQUEST_TIMEOUT
                )
                ok, error = True, ""
            except grpc.aio.AioRpcError as exc:
                ok, error = False, f"{exc.code().name}: {(exc.details() or '')[:120]}"
            t1 = time.time()
            in_window = window[0] <= t1 <= window[1]
            if ok:
                result.leaf_pems.append(resp.cert_chain[0])
                if in_window:
                    result.ok_in_window += 1
                    result.latencies_ms.append((t1 - t0) * 1000.0)
            else:
                result.failed_total += 1
                result.failed_in_window += int(in_window)
                result.errors[error] = result.errors.get(error, 0) + 1
            if t1 > window[1]:
                return

    try:
        await asyncio.wait_for(
            asyncio.gather(*(ch.channel_ready() for ch in channels)), CLIENT_READY_TIMEOUT
        )
        for stub, (request, metadata) in zip(stubs, requests, strict=False):
            resp = await stub.CreateCertificate(request, metadata=metadata, timeout=REQUEST_TIMEOUT)
            result.leaf_pems.append(resp.cert_chain[0])
    except (grpc.aio.AioRpcError, TimeoutError) as exc:
        result.fatal = f"client {spec.index}: cannot reach the CA: {exc!r}"[:500]
        conn.send(("ready", None))
        conn.recv()
        return result
    conn.send(("ready", None))
    # The parent answers with (start, end) once every client is connected and warm.
    start, end = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    window[0], window[1] = start, end
    tasks = [asyncio.create_task(worker(i)) for i in range(spec.concurrency)]
    await asyncio.sleep(max(0.0, start - time.time()))
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, end - time.time()))
    result.cpu_s = time.process_time() - cpu0
    stop.set()
    await asyncio.gather(*tasks)
    for ch in channels:
        await ch.close()
    return result


def client_process(spec: ClientSpec, conn: mpc.Connection) -> None:
    """Entry point of one load-generator process (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    try:
        result = asyncio.run(_load(spec, conn))
    except Exception as exc:  # report, never hang the parent
        result = ClientResult(fatal=f"client {spec.index}: {exc!r}"[:500])
    # A plain dict: this module is __mp_main__ here, so its classes would not unpickle.
    with contextlib.suppress(OSError):  # the parent is gone (interrupted): nothing to report
        conn.send(("result", dataclasses.asdict(result)))
        conn.close()


def _poll(conn: mpc.Connection, timeout: float, server_pid: int) -> bool:
    """``conn.poll(timeout)``, giving up early (False) when the server process is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.poll(1.0):
            return True
        try:
            if _stat_fields(server_pid)[0] == "Z":
                return False
        except OSError:
            return False
    return False


def run_load(
    targets: Sequence[str],
    root_pem: bytes,
    workloads: tuple[Workload, ...],
    *,
    clients: int,
    concurrency: int,
    channels: int,
    warmup: float,
    duration: float,
    server_pids: Sequence[int],
) -> tuple[list[ClientResult], CpuShare]:
    """Run ``clients`` load processes for ``duration`` s after ``warmup`` s, client ``i``
    loading ``targets[i % len(targets)]`` (one target per CA replica); returns their results
    and the CPU the servers (``server_pids`` and their workers), the clients and the machine
    used in the window."""
    ctx = mp.get_context("spawn")
    procs: list[tuple[mp.process.BaseProcess, mpc.Connection]] = []
    try:
        for i in range(clients):
            share = concurrency // clients + (1 if i < concurrency % clients else 0)
            spec = ClientSpec(
                index=i,
                target=targets[i % len(targets)],
                root_pem=root_pem,
                workloads=workloads,
                concurrency=max(1, share),
                channels=max(1, min(channels, share)),
            )
            parent_end, child_end = ctx.Pipe()
            child = ctx.Process(target=client_process, args=(spec, child_end), daemon=True)
            child.start()
            child_end.close()
            procs.append((child, parent_end))
        for proc, conn in procs:
            if not _poll(conn, CLIENT_READY_TIMEOUT, server_pids[0]):
                raise RuntimeError(f"load client {proc.pid} did not get ready")
            kind, _ = conn.recv()
            assert kind == "ready"
        start = time.time() + warmup  # clients load the CA from now; measure after warm-up
        end = start + duration
        for _, conn in procs:
            conn.send((start, end))
        time.sleep(max(0.0, start - time.time()))
        sup0, work0 = servers_cpu_seconds(server_pids)
        busy0 = machine_busy_seconds()
        time.sleep(max(0.0, end - time.time()))
        sup1, work1 = servers_cpu_seconds(server_pids)
        busy1 = machine_busy_seconds()
        results = []
        for proc, conn in procs:
            if not _poll(conn, warmup + duration + REQUEST_TIMEOUT + 30, server_pids[0]):
                raise RuntimeError(f"load client {proc.pid} did not report")
            kind, res = conn.recv()
            assert kind == "result" and isinstance(res, dict)
            results.append(ClientResult(**res))
        per_worker = sorted(
            ((t - work0.get(pid, 0.0)) / duration for pid, t in work1.items()), reverse=True
        )
        cpu = CpuShare(
            workers=sum(per_worker),
            per_worker=tuple(per_worker),
            supervisor=(sup1 - sup0) / duration,
            clients=sum(r.cpu_s for r in results) / duration,
            machine=(busy1 - busy0) / duration,
        )
        return results, cpu
    finally:
        for proc, conn in procs:
            conn.close()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


# --------------------------------------------------------------------------- servers


class ServerProcess:
    """A CA server subprocess (its own process group is not needed: the CA's supervisor
    stops its workers on SIGTERM); ``stop()`` sends SIGTERM and waits (SIGKILL after 20 s)."""

    def __init__(self, argv: list[str], log_path: Path, name: str) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the server's log, without the per-certificate ones."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        kept = [line for line in text.splitlines() if " issued serial=" not in line]
        return "\n".join(kept[-lines:])

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with code {code}:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def wait_http_ready(server: ServerProcess, url: str) -> None:
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready after {SERVER_READY_TIMEOUT:.0f}s")


def wait_log_line(server: ServerProcess, marker: str) -> None:
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        if marker in server.log_path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready after {SERVER_READY_TIMEOUT:.0f}s")


def start_meshtrust_server(
    ca_dir: Path, workers: int | None, log_path: Path, ledger: str | None = None
) -> tuple[ServerProcess, str]:
    port, mport = free_port(), free_port()
    argv = [
        *meshtrust_command(),
        "ca",
        "serve",
        "--ca-dir",
        str(ca_dir),
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{mport}",
        *(["--workers", str(workers)] if workers is not None else []),
        *(["--ledger", ledger] if ledger is not None else []),
    ]
    name = "meshtrust ca serve" + (f" --workers {workers}" if workers is not None else "")
    server = ServerProcess(argv, log_path, name)
    try:
        wait_http_ready(server, f"http://127.0.0.1:{mport}/ready")
    except BaseException:
        server.stop()
        raise
    return server, f"127.0.0.1:{port}"


GRPCIO_READY = "grpcio-ca-ready"


def grpcio_server_main(ca_dir: Path, port: int, ledger_url: str) -> None:
    """The same in-process CA handler behind a minimal grpcio.aio server (one process,
    TLS without client certificates, group-committed SQLite ledger)."""
    import grpc
    import grpc.aio

    from meshtrust.ca import (
        CaServeConfig,
        Credentials,
        GroupCommitLedger,
        SqlLedger,
        prepare_ca,
    )
    from meshtrust.ca.assembly import build_authority
    from meshtrust.ca.server import status_for
    from meshtrust.caapi.istio import ca_pb2, ca_pb2_grpc
    from meshtrust.clock import SystemClock
    from meshtrust.errors import MeshTrustError
    from meshtrust.pki import certs_pem, private_key_pem
    from meshtrust.spiffe import TrustDomain

    async def serve() -> None:
        clock = SystemClock()
        config = CaServeConfig(
            ca_dir=ca_dir,
            listen=f"127.0.0.1:{port}",
            metrics_listen=None,
            trust_domain=TrustDomain.parse(TRUST_DOMAIN),
            ledger=ledger_url,
        )
        prepared = prepare_ca(config, clock)
        sql = SqlLedger(ledger_url)
        ledger = GroupCommitLedger(sql)
        authority = build_authority(prepared, clock, ledger, _NullMetrics())

        class Servicer(ca_pb2_grpc.IstioCertificateServiceServicer):
            async def CreateCertificate(  # noqa: N802
                self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
            ) -> ca_pb2.IstioCertificateResponse:
                token = None
                for key, value in context.invocation_metadata() or ():
                    if key == "authorization" and isinstance(value, str):
                        token = value.partition(" ")[2].strip()
                try:
                    chain = await authority.create_certificate(
                        request.csr, request.validity_duration, Credentials(token, None)
                    )
                except MeshTrustError as exc:
                    code = getattr(grpc.StatusCode, status_for(exc).name)
                    await context.abort(code, str(exc))
                return ca_pb2.IstioCertificateResponse(cert_chain=chain)

        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(Servicer(), server)  # type: ignore[no-untyped-call]
        server_creds = grpc.ssl_server_credentials(
            [(private_key_pem(prepared.serving_key), certs_pem(prepared.serving_chain))]
        )
        server.add_secure_port(f"127.0.0.1:{port}", server_creds)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(GRPCIO_READY, flush=True)
        await stop.wait()
        await server.stop(5)
        await ledger.aclose()
        sql.close()

    asyncio.run(serve())


def start_grpcio_server(ca_dir: Path, ledger_url: str, log_path: Path) -> tuple[ServerProcess, str]:
    port = free_port()
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-grpcio",
        str(ca_dir),
        str(port),
        ledger_url,
    ]
    server = ServerProcess(argv, log_path, "grpcio.aio comparison server")
    try:
        wait_log_line(server, GRPCIO_READY)
    except BaseException:
        server.stop()
        raise
    return server, f"127.0.0.1:{port}"


# --------------------------------------------------------------------------- one run


def measure(
    targets: Sequence[str],
    root_pem: bytes,
    workloads: tuple[Workload, ...],
    ledger_url: str,
    args: argparse.Namespace,
    server_pids: Sequence[int],
) -> RunResult:
    from meshtrust.ca import SqlLedger

    sql = SqlLedger(ledger_url)
    try:
        rows_before = len(sql.serials())
        results, cpu = run_load(
            targets,
            root_pem,
            workloads,
            clients=args.clients,
            concurrency=args.concurrency,
            channels=args.channels,
            warmup=args.warmup,
            duration=args.duration,
            server_pids=server_pids,
        )
        fatal = [r.fatal for r in results if r.fatal]
        if fatal:
            raise RuntimeError("; ".join(fatal))
        in_ledger = sql.serials()
    finally:
        sql.close()
    returned = [leaf_serial_hex(pem) for r in results for pem in r.leaf_pems]
    missing = len(set(returned) - in_ledger)
    duplicates = len(returned) - len(set(returned))
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    if duplicates:
        errors["duplicate serials returned"] = duplicates
    latencies = sorted(x for r in results for x in r.latencies_ms)
    ok = sum(r.ok_in_window for r in results)
    return RunResult(
        certs_per_s=ok / args.duration,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        ok=ok,
        failures=sum(r.failed_total for r in results),
        ledger_missing=missing,
        ledger_new_rows=len(in_ledger) - rows_before,
        returned=len(returned),
        errors=errors,
        cpu=cpu,
    )


def print_run(label: str, r: RunResult) -> None:
    ledger = "ok" if r.ledger_missing == 0 else f"MISSING {r.ledger_missing}"
    print(
        f"  {label:<8} {r.certs_per_s:8.0f} certs/s  p50 {r.p50_ms:7.1f} ms  "
        f"p99 {r.p99_ms:7.1f} ms  failures {r.failures}  "
        f"ledger {ledger} ({r.returned} returned, {r.ledger_new_rows} new rows)",
    )
    c = r.cpu
    split = " = " + " + ".join(f"{w:.2f}" for w in c.per_worker) if len(c.per_worker) > 1 else ""
    per_cert = (c.workers + c.supervisor) / r.certs_per_s * 1000.0 if r.certs_per_s else 0.0
    print(
        f"           cores used: server {c.workers + c.supervisor:.2f} (main process "
        f"{c.supervisor:.2f}, workers {c.workers:.2f}{split}), load clients {c.clients:.2f}, "
        f"other {c.other:.2f} "
        f"(kernel, other processes), machine {c.machine:.2f}/{os.cpu_count()}; "
        f"server CPU {per_cert:.2f} ms/cert",
        flush=True,
    )
    for err, n in sorted(r.errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"           {n} x {err}")


def median_of(runs: Sequence[RunResult]) -> RunResult:
    mid = sorted(runs, key=lambda r: r.certs_per_s)[len(runs) // 2]  # the median run itself
    return RunResult(
        certs_per_s=statistics.median(r.certs_per_s for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        ok=mid.ok,
        failures=sum(r.failures for r in runs),
        ledger_missing=sum(r.ledger_missing for r in runs),
        ledger_new_rows=sum(r.ledger_new_rows for r in runs),
        returned=sum(r.returned for r in runs),
        errors={},
        cpu=CpuShare(
            workers=statistics.median(r.cpu.workers for r in runs),
            supervisor=statistics.median(r.cpu.supervisor for r in runs),
            clients=statistics.median(r.cpu.clients for r in runs),
            machine=statistics.median(r.cpu.machine for r in runs),
        ),
    )


def _state(server: ServerProcess) -> str:
    code = server.proc.poll()
    return "running" if code is None else f"exited with code {code}"


def run_series(
    name: str,
    targets: Sequence[str],
    root_pem: bytes,
    workloads: tuple[Workload, ...],
    ledger_url: str,
    args: argparse.Namespace,
    servers: Sequence[ServerProcess],
) -> tuple[RunResult, float]:
    """``args.runs`` measured runs against ``targets`` (one per server in ``servers``)."""
    print(f"{name}:", flush=True)
    runs = []
    pids = [server.proc.pid for server in servers]
    for i in range(args.runs):
        for server in servers:
            server.check_alive()
        try:
            r = measure(targets, root_pem, workloads, ledger_url, args, pids)
        except RuntimeError as exc:
            logs = "".join(
                f"\nserver {_state(server)}; log ({server.log_path}):\n{server.log_tail()}"
                for server in servers
            )
            raise RuntimeError(f"{exc}{logs}") from exc
        print_run(f"run {i + 1}", r)
        for server in servers:
            if server.proc.poll() is not None:
                print(
                    f"           a server exited during this run (code {server.proc.returncode});"
                    f" signalled from outside the benchmark? log:\n{server.log_tail(5)}"
                )
        runs.append(r)
    med = median_of(runs)
    print_run("median", med)
    return med, max(r.certs_per_s for r in runs)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def stopping(servers: list[ServerProcess]) -> Iterator[None]:
    """Stop every server on exit (errors and Ctrl-C included); SIGTERM is turned into
    KeyboardInterrupt so the same clean-up runs."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        for s in servers:
            s.stop()
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured load before each run")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight in total")
    p.add_argument(
        "--workers", type=int, default=None, help="server worker processes [ca serve's default]"
    )
    p.add_argument("--clients", type=int, default=1, help="load-generator processes")
    p.add_argument(
        "--channels",
        type=int,
        default=32,
        help="gRPC connections per client (few connections may all land on one worker)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs; the median is reported")
    p.add_argument("--key-type", default="ec-p256", help="CA and CSR key type (ec-p256, ...)")
    p.add_argument("--identities", type=int, default=16, help="distinct workload identities")
    p.add_argument("--limit-seconds", type=float, default=3.0, help="in-process limit time")
    p.add_argument(
        "--compare-grpcio",
        action="store_true",
        help="also measure the in-process CA handler behind a one-process grpcio.aio server",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp directory (server logs)")
    args = p.parse_args(argv)
    workers_ok = args.workers is None or args.workers >= 1
    if args.runs < 1 or args.concurrency < 1 or args.clients < 1 or not workers_ok:
        p.error("--runs, --concurrency, --clients and --workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from meshtrust.ca import default_ledger_url
    from meshtrust.pki import KeyType

    key_type = KeyType.parse(args.key_type).value
    tmp = Path(tempfile.mkdtemp(prefix="meshtrust-bench-"))
    servers: list[ServerProcess] = []
    try:
        with stopping(servers):
            ca_dir = tmp / "ca"
            subprocess.run(
                [
                    *meshtrust_command(),
                    "ca",
                    "init",
                    "--dir",
                    str(ca_dir),
                    "--trust-domain",
                    TRUST_DOMAIN,
                    "--key-type",
                    key_type,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            root_pem = (ca_dir / "root-cert.pem").read_bytes()
            workloads = make_workloads(ca_dir, key_type, args.identities)
            print(
                f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
                f"Python {sys.version.split()[0]}"
            )
            print(
                f"settings: key {key_type}, "
                f"workers {args.workers or 'default (ca serve: one per CPU, at most 8)'}, "
                f"clients {args.clients}, "
                f"concurrency {args.concurrency}, channels/client {args.channels}, "
                f"identities {args.identities}, {args.runs} x {args.duration:g} s "
                f"(+{args.warmup:g} s warm-up)",
                flush=True,
            )

            limit = in_process_limit(ca_dir, workloads, args.limit_seconds)
            handler = in_process_handler(ca_dir, workloads, args.limit_seconds)
            print(f"in-process limit (parse+verify+sign+PEM, 1 core): {limit:8.0f} certs/s")
            print(f"in-process CA handler (authn cached, no I/O, 1 core): {handler:5.0f} certs/s")

            server, target = start_meshtrust_server(ca_dir, args.workers, tmp / "server.log")
            servers.append(server)
            med, best = run_series(
                f"meshtrust ca serve (grpclib, TLS, JWT, SQLite ledger) on {target}",
                [target],
                root_pem,
                workloads,
                default_ledger_url(ca_dir),
                args,
                [server],
            )
            code = server.stop()
            if code != 0:
                print(f"server exited with code {code}:\n{server.log_tail()}")

            grpcio_med: RunResult | None = None
            if args.compare_grpcio:
                url = f"sqlite:///{tmp / 'grpcio-ledger.db'}"
                gserver, gtarget = start_grpcio_server(ca_dir, url, tmp / "grpcio.log")
                servers.append(gserver)
                grpcio_med, _ = run_series(
                    "comparison: same handler behind grpcio.aio (1 process, TLS, JWT, ledger)",
                    [gtarget],
                    root_pem,
                    workloads,
                    url,
                    args,
                    [gserver],
                )
                gserver.stop()

            ratio = med.certs_per_s / limit
            clean = med.failures == 0 and med.ledger_missing == 0
            met_abs = med.certs_per_s >= TARGET_CERTS_PER_S and clean
            met_ratio = ratio >= TARGET_RATIO and clean
            print()
            print("summary")
            print(
                f"  end to end (median): {med.certs_per_s:.0f} certs/s, p50 {med.p50_ms:.1f} ms, "
                f"p99 {med.p99_ms:.1f} ms, failures {med.failures}, "
                f"ledger {'complete' if med.ledger_missing == 0 else 'INCOMPLETE'}"
            )
            print(f"  best run:            {best:.0f} certs/s")
            print(f"  in-process limit:    {limit:.0f} certs/s (1 core)")
            server_cpu = med.cpu.workers + med.cpu.supervisor
            cpu_ms = server_cpu / med.certs_per_s * 1000.0 if med.certs_per_s else math.inf
            limit_ms = 1000.0 / limit
            print(
                f"  CA CPU per certificate: {cpu_ms:.3f} ms (user+sys of the CA processes / "
                f"certificates) vs in-process parse+verify+sign {limit_ms:.3f} ms: "
                f"ratio {cpu_ms / limit_ms:.1f}x"
            )
            print(f"  ratio end to end / in-process: {ratio:.2f} (target >= {TARGET_RATIO})")
            if med.cpu.other > BUSY_OTHER_CORES:
                print(
                    f"  WARNING: {med.cpu.other:.2f} cores went to other processes/the kernel "
                    "during the runs; the machine was not quiet and the figures are low"
                )
            if grpcio_med is not None:
                print(
                    f"  grpcio.aio 1 process: {grpcio_med.certs_per_s:.0f} certs/s, "
                    f"p50 {grpcio_med.p50_ms:.1f} ms, p99 {grpcio_med.p99_ms:.1f} ms "
                    f"(grpclib / grpcio = {med.certs_per_s / grpcio_med.certs_per_s:.2f})"
                )
            print(
                f"  target {TARGET_CERTS_PER_S:.0f} certs/s, 0 failures, ledger complete: "
                f"{'MET' if met_abs else 'NOT MET'}"
            )
            print(
                f"  target ratio >= {TARGET_RATIO} of this machine's in-process limit "
                f"(>= {TARGET_RATIO * limit:.0f} certs/s): {'MET' if met_ratio else 'NOT MET'}"
            )
            return 0 if clean else 1
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
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-grpcio":
        grpcio_server_main(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(main())
