"""What the two-sidecar mTLS path adds to an HTTP request: latency (p50/p99) and requests/s.

Set-up (all on 127.0.0.1, all real processes):

* **upstream**: an Envoy whose only listener answers every request ``200`` with a small body
  (``direct_response``): a fast HTTP server that is not Python, so the figures are Envoy's;
* **server sidecar** and **client sidecar**: two Envoys configured exactly as meshtrust
  configures them (:func:`~meshtrust.envoy.sidecar.sidecar_bootstrap`,
  :func:`~meshtrust.envoy.sidecar.inbound_listeners` in STRICT mode without RBAC,
  :func:`~meshtrust.envoy.sidecar.write_lds_file`,
  :func:`~meshtrust.envoy.sidecar.sidecar_envoy_args`), each fed by its own in-process
  :class:`~meshtrust.agent.sds.SdsServer` over a :class:`~meshtrust.agent.cache.SecretCache`
  running on an event loop in a background thread. Certificates come from the test CA of
  ``tests/badcerts.py`` (a root and an intermediate, P-256). The server sidecar's
  ``app_port`` is the upstream's port.
  (The full ``start_mesh`` path builds the same two Envoys plus the CA and agent processes;
  this benchmark skips them because they play no part once the certificates are served.)

Two paths are measured with ``wrk`` (closed loop, HTTP/1.1 keep-alive, fixed connections):

* **direct**: wrk -> upstream;
* **meshed**: wrk -> client sidecar's outbound port -> mTLS -> server sidecar's inbound
  port -> upstream.

Each load level first warms both paths up (connection pools, TLS handshakes), then runs
``--runs`` rounds of direct and meshed, interleaved; the figures are medians over rounds.
Two load levels:

* **low load** (``--low-connections``, default 1): one request in flight, so the latency is
  what the proxies add per request, not time spent waiting for a CPU. **The target (added
  p50 < 0.5 ms) is judged on this figure.**
* **fixed concurrency** (``--connections``, default 16): wrk, the upstream and both
  sidecars share the host's cores; with 16 requests in flight on a 2-core host the p50 is
  queueing (Little's law: p50 ~ connections / throughput), so its "added p50" measures CPU
  per request rather than latency. Reported, with the CPU each process spent per request,
  but not the target.

Envoy settings (from ``src/meshtrust/envoy/sidecar.py``; the run prints the ones in effect)
----------------------------------------------------------------------------------------
* **Workers**: ``--concurrency 2`` per sidecar (``DEFAULT_CONCURRENCY``, Istio's sidecar
  default). Envoy's own default, one worker per CPU, is too many with a sidecar per service;
  each worker keeps its own connection pools.
* **TLS**: TLS 1.2 floor, 1.3 ceiling, ECDHE+AEAD suites for 1.2. Both ends are Envoy, so
  TLS 1.3 is what is negotiated (the run prints version, cipher, key exchange and signature
  from the client sidecar's stats); ``--tls13-only`` shows that pinning 1.3 changes nothing.
* **Connection reuse**: HTTP workloads go through an HTTP connection manager on both
  sidecars, so the client sidecar keeps a pool of mTLS connections to the peer (idle
  timeout 300 s, under the peer's 1 h) and an app that opens a connection per request does
  not pay a handshake per request (``--connection-close`` shows it: no handshakes during the
  runs). The server sidecar pools plain-text connections to the app. The HTTP version
  between the sidecars is the app's (HTTP/1.1 here: one request per connection at a time).

What the added latency is made of (``--sidecar-concurrency 1``, ``--tls13-only``,
``--plaintext-hop`` with no TLS between the sidecars, ``--protocol tcp`` with tcp_proxy
instead of the HTTP connection manager, ``--connection-close``): the run prints CPU
microseconds per request for every process, and the connection and TLS handshake counts of
the measured runs.

Needs ``wrk`` (Debian/Ubuntu: ``apt-get install -y wrk``; macOS: ``brew install wrk``).

Run: ``.venv/bin/python benchmarks/sidecar_latency.py`` (``--help`` for the settings).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import http.client
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from meshtrust.agent.sds import SdsServer
    from meshtrust.envoy import EnvoyProcess
    from meshtrust.envoy.sidecar import SidecarConfig
    from meshtrust.spiffe import SpiffeId
    from tests.badcerts import CaFixture

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

TARGET_ADDED_P50_MS = 0.5
TRUST_DOMAIN = "example.org"
SERVER_SA = "server"
CLIENT_SA = "client"
UPSTREAM_BODY = "hello from the upstream\n"
READY_TIMEOUT = 60.0
WRK_INSTALL_HINT = (
    "wrk is the load generator of this benchmark and was not found. Install it with\n"
    "  sudo apt-get update && sudo apt-get install -y wrk     (Debian/Ubuntu)\n"
    "  brew install wrk                                      (macOS)\n"
    "or pass --wrk /path/to/wrk."
)

_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _repo_on_path() -> None:
    """Make ``tests`` importable (the benchmark reuses the test CA and ``free_port``)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    """One wrk run, plus the CPU every process spent during it (seconds)."""

    p50_ms: float
    p99_ms: float
    rps: float
    requests: int
    errors: int  # socket errors (connect, read, write, timeout) + non-2xx/3xx responses
    cpu_s: Mapping[str, float] = field(default_factory=dict)

    def cpu_us_per_request(self, name: str) -> float:
        return self.cpu_s.get(name, 0.0) / max(self.requests, 1) * 1e6


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output (wrk 4.x). Raises :class:`ValueError` naming what is
    missing."""
    percentiles = {int(p): float(v) * _UNIT_MS[unit] for p, v, unit in _PERCENTILE.findall(text)}
    rps = _RPS.search(text)
    requests = _REQUESTS.search(text)
    missing = [
        what
        for what, found in (
            ("50% latency", 50 in percentiles),
            ("99% latency", 99 in percentiles),
            ("Requests/sec", rps is not None),
            ("request count", requests is not None),
        )
        if not found
    ]
    if missing or rps is None or requests is None:
        raise ValueError(f"wrk output without {', '.join(missing)}:\n{text}")
    errors = 0
    if socket_errors := _SOCKET_ERRORS.search(text):
        errors += sum(int(n) for n in socket_errors.groups())
    if non_2xx := _NON_2XX.search(text):
        errors += int(non_2xx.group(1))
    return WrkResult(
        p50_ms=percentiles[50],
        p99_ms=percentiles[99],
        rps=float(rps.group(1)),
        requests=int(requests.group(1)),
        errors=errors,
    )


def find_wrk(given: str | None) -> str | None:
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("wrk")


def wrk_version(wrk: str) -> str:
    # `wrk --version` prints "wrk <version> [<poller>] Copyright ..." before its usage.
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"


# --------------------------------------------------------------------------- CPU accounting


_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a running process (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK  # utime, stime


def host_cpu_s() -> tuple[float, float]:
    """(busy, irq + softirq) CPU seconds of all cores since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    guest = sum(fields[8:10])  # already counted in user/nice
    irq = fields[5] + fields[6]
    return (sum(fields) - idle - guest) / _CLOCK_TICK, irq / _CLOCK_TICK


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- event loop thread


class LoopThread:
    """An asyncio event loop in a daemon thread: the SDS servers live there, so the main
    thread can block in ``subprocess.run(wrk)`` while Envoy streams its secrets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="sds-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = READY_TIMEOUT) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            self.run(cancel_the_rest(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


# --------------------------------------------------------------------------- the processes


def upstream_bootstrap(port: int, admin_socket: Path) -> dict[str, Any]:
    """An Envoy answering every request on 127.0.0.1:``port`` with 200 and a small body."""
    from meshtrust.envoy import admin, node

    manager = {
        "@type": "type.googleapis.com/" + _HCM,
        "stat_prefix": "upstream",
        "codec_type": "AUTO",
        "route_config": {
            "name": "direct",
            "virtual_hosts": [
                {
                    "name": "direct",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": UPSTREAM_BODY},
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/" + _ROUTER},
            }
        ],
    }
    listener = {
        "name": "upstream",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }
    return {
        "node": node("upstream", "upstream"),
        "admin": admin(admin_socket),
        "static_resources": {"listeners": [listener]},
    }


def tls13_only(config: Any) -> Any:
    """A copy of ``config`` (bootstrap or listeners) with every ``tls_params`` raised to a
    TLS 1.3 minimum (experiment only; meshtrust's own floor is TLS 1.2)."""
    config = copy.deepcopy(config)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            params = node.get("tls_params")
            if isinstance(params, dict):
                params["tls_minimum_protocol_version"] = "TLSv1_3"
                params["tls_maximum_protocol_version"] = "TLSv1_3"
                params.pop("cipher_suites", None)  # TLS 1.2 only; 1.3 suites are fixed
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return config


def plaintext_outbound(bootstrap: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a client sidecar bootstrap whose outbound clusters speak plain text
    (diagnostic only: this is not a mesh, it separates TLS cost from proxying cost)."""
    config = copy.deepcopy(dict(bootstrap))
    for cluster in config["static_resources"]["clusters"]:
        if str(cluster.get("name", "")).startswith("outbound|"):
            cluster.pop("transport_socket", None)
    return config


@dataclass
class Sidecar:
    config: SidecarConfig
    envoy: EnvoyProcess
    bootstrap: dict[str, Any]
    listeners: list[dict[str, Any]]
    sds: SdsServer

    def stats(self) -> dict[str, int]:
        """The admin counters and gauges (histograms left out)."""
        out: dict[str, int] = {}
        for line in self.envoy.admin_get("/stats").splitlines():
            key, _, value = line.partition(": ")
            if value.isdigit():
                out[key] = int(value)
        return out


@dataclass
class Rig:
    """Everything running: the upstream Envoy and the two sidecars."""

    upstream: EnvoyProcess
    upstream_port: int
    server: Sidecar
    client: Sidecar
    outbound_port: int
    sidecar_args: tuple[str, ...]
    upstream_concurrency: int

    @property
    def envoys(self) -> dict[str, EnvoyProcess]:
        return {
            "upstream": self.upstream,
            "client sidecar": self.client.envoy,
            "server sidecar": self.server.envoy,
        }


def _spiffe_id(sa: str) -> SpiffeId:
    from meshtrust.spiffe import SpiffeId

    return SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}")


def start_sidecar(
    stack: contextlib.ExitStack,
    loop: LoopThread,
    work: Path,
    ca: CaFixture,
    config: SidecarConfig,
    identity: SpiffeId,
    args: argparse.Namespace,
) -> Sidecar:
    """Start ``config``'s sidecar with its own SDS server serving ``identity``; the caller's
    ``stack`` stops both."""
    from meshtrust.agent.cache import SecretCache, WorkloadSecret
    from meshtrust.agent.sds import SdsServer
    from meshtrust.envoy import EnvoyProcess
    from meshtrust.envoy.sidecar import (
        inbound_listeners,
        sidecar_bootstrap,
        sidecar_envoy_args,
        write_lds_file,
    )
    from meshtrust.policy.model import InboundPolicy, MtlsMode
    from tests.badcerts import svid_leaf

    directory = work / config.name
    (directory / "lds").mkdir(parents=True)
    now = dt.datetime.now(dt.UTC)  # Envoy checks validity against the real clock
    leaf = svid_leaf(ca.signer, identity, now=now, ttl=dt.timedelta(hours=2))

    async def serve() -> SdsServer:
        cache = SecretCache()
        await cache.publish(WorkloadSecret(identity, leaf.key, tuple(leaf.chain), (ca.root,), now))
        server = SdsServer(cache, directory / "sds.sock")
        await server.start()
        return server

    sds = loop.run(serve())
    stack.callback(lambda: loop.run(sds.stop(), timeout=10))

    mode = MtlsMode.DISABLE if args.plaintext_hop else MtlsMode.STRICT
    listeners = inbound_listeners(config, InboundPolicy(mode))
    lds_path = directory / "lds" / "listeners.json"
    bootstrap = sidecar_bootstrap(
        config,
        sds_socket=sds.socket_path,
        lds_path=lds_path,
        node_id=f"sidecar~127.0.0.1~{config.name}.{config.namespace}~local",
        admin_socket=directory / "admin.sock",
    )
    if args.tls13_only:
        listeners, bootstrap = tls13_only(listeners), tls13_only(bootstrap)
    if args.plaintext_hop:
        bootstrap = plaintext_outbound(bootstrap)
    write_lds_file(lds_path, listeners, "1")
    extra = sidecar_envoy_args(concurrency=args.sidecar_concurrency)
    envoy = EnvoyProcess(bootstrap, directory, name=config.name, extra_args=extra)
    envoy.start()
    stack.callback(envoy.stop)
    envoy.wait_ready(READY_TIMEOUT)
    return Sidecar(config, envoy, bootstrap, listeners, sds)


def start_rig(
    stack: contextlib.ExitStack, loop: LoopThread, work: Path, args: argparse.Namespace
) -> Rig:
    from meshtrust.envoy import EnvoyProcess
    from meshtrust.envoy.sidecar import SidecarConfig, Upstream, sidecar_envoy_args
    from meshtrust.policy.model import Protocol
    from tests.badcerts import make_ca
    from tests.processes import free_port

    upstream_port = free_port()
    upstream = EnvoyProcess(
        upstream_bootstrap(upstream_port, work / "upstream-admin.sock"),
        work,
        name="upstream",
        extra_args=("--concurrency", str(args.upstream_concurrency)),
    )
    upstream.start()
    stack.callback(upstream.stop)
    upstream.wait_ready(READY_TIMEOUT)

    ca = make_ca(TRUST_DOMAIN, now=dt.datetime.now(dt.UTC))
    server_id, client_id = _spiffe_id(SERVER_SA), _spiffe_id(CLIENT_SA)
    protocol = Protocol(args.protocol)
    server_config = SidecarConfig(
        name="server", app_port=upstream_port, inbound_port=free_port(), protocol=protocol
    )
    server = start_sidecar(stack, loop, work, ca, server_config, server_id, args)
    outbound_port = free_port()
    client_config = SidecarConfig(
        name="client",
        app_port=free_port(),  # the client app listens nowhere: it only calls out
        inbound_port=free_port(),
        upstreams=(
            Upstream(
                "server",
                outbound_port,
                f"127.0.0.1:{server_config.inbound_port}",
                server_id,
                protocol=protocol,
            ),
        ),
    )
    client = start_sidecar(stack, loop, work, ca, client_config, client_id, args)
    return Rig(
        upstream,
        upstream_port,
        server,
        client,
        outbound_port,
        sidecar_envoy_args(concurrency=args.sidecar_concurrency),
        args.upstream_concurrency,
    )


def check_path(port: int) -> None:
    """One request must come back 200 with the upstream's body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
    finally:
        conn.close()
    if response.status != 200 or body != UPSTREAM_BODY:
        raise RuntimeError(f"127.0.0.1:{port} answered {response.status} {body[:200]!r}")


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Load:
    name: str
    threads: int
    connections: int
    duration_s: int  # wrk takes whole seconds


def run_wrk(
    wrk: str, port: int, load: Load, rig: Rig, args: argparse.Namespace, duration_s: int
) -> WrkResult:
    command = [
        wrk,
        f"-t{load.threads}",
        f"-c{load.connections}",
        f"-d{duration_s}s",
        "--timeout",
        "10s",
        "--latency",
    ]
    if args.connection_close:
        command += ["-H", "Connection: close"]
    command.append(f"http://127.0.0.1:{port}/")
    pids = {name: envoy.pid for name, envoy in rig.envoys.items()}
    before = {name: process_cpu_s(pid) for name, pid in pids.items() if pid is not None}
    wrk_before, (busy_before, irq_before) = children_cpu_s(), host_cpu_s()
    self_before = process_cpu_s(os.getpid())
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    cpu = {"wrk": children_cpu_s() - wrk_before}
    for name, pid in pids.items():
        if pid is not None:
            cpu[name] = process_cpu_s(pid) - before[name]
    cpu["this script"] = process_cpu_s(os.getpid()) - self_before
    busy, irq = host_cpu_s()
    cpu["kernel irq"] = irq - irq_before
    # Everything else on the host (other people's processes): a sanity check.
    cpu["other"] = max(0.0, busy - busy_before - sum(cpu.values()))
    if out.returncode != 0:
        output = (out.stderr.strip() or out.stdout.strip())[:2000]
        raise RuntimeError(f"{' '.join(command)} exited with {out.returncode}:\n{output}")
    result = parse_wrk(out.stdout)
    return WrkResult(result.p50_ms, result.p99_ms, result.rps, result.requests, result.errors, cpu)


@dataclass
class PathFigures:
    runs: list[WrkResult] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(float(getattr(r, attr)) for r in self.runs)

    def cpu_us(self, name: str) -> float:
        return statistics.median(r.cpu_us_per_request(name) for r in self.runs)

    def other_cores(self, duration_s: int) -> float:
        """CPU used by processes outside the benchmark, in cores (max over runs)."""
        return max(r.cpu_s.get("other", 0.0) for r in self.runs) / duration_s

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)


@dataclass
class LoadResult:
    load: Load
    direct: PathFigures
    meshed: PathFigures
    reuse: dict[str, int]

    @property
    def added_p50_ms(self) -> float:
        return self.meshed.median("p50_ms") - self.direct.median("p50_ms")


_REUSE_STATS = {
    "app connections": "listener.outbound_server.downstream_cx_total",
    "sidecar-to-sidecar connections": "cluster.outbound|server.upstream_cx_total",
    "sidecar-to-sidecar TLS handshakes": "cluster.outbound|server.ssl.handshake",
}


def reuse_counters(rig: Rig) -> dict[str, int]:
    stats = rig.client.stats()
    server = rig.server.stats()
    out = {label: stats.get(name, 0) for label, name in _REUSE_STATS.items()}
    app = f"cluster.inbound|{rig.upstream_port}.upstream_cx_total"
    out["server sidecar-to-upstream connections"] = server.get(app, 0)
    return out


def measure(wrk: str, rig: Rig, load: Load, args: argparse.Namespace, say: Say) -> LoadResult:
    paths = {"direct": rig.upstream_port, "meshed": rig.outbound_port}
    if args.warmup > 0:
        for port in paths.values():
            run_wrk(wrk, port, load, rig, args, args.warmup)
    figures = {name: PathFigures() for name in paths}
    before = reuse_counters(rig)
    for i in range(args.runs):
        # Interleaved, alternating which path goes first: drift hits both alike.
        order = list(paths) if i % 2 == 0 else list(reversed(paths))
        line = []
        for name in order:
            result = run_wrk(wrk, paths[name], load, rig, args, load.duration_s)
            figures[name].runs.append(result)
            line.append(
                f"{name} p50 {result.p50_ms:.3f} p99 {result.p99_ms:.3f} ms "
                f"{result.rps:8.0f} req/s" + (f" ({result.errors} errors)" if result.errors else "")
            )
        say(f"    run {i + 1}: " + " | ".join(sorted(line)))
    after = reuse_counters(rig)
    reuse = {label: after[label] - before[label] for label in after}
    return LoadResult(load, figures["direct"], figures["meshed"], reuse)


# --------------------------------------------------------------------------- reporting


class Say:
    def __call__(self, text: str = "") -> None:
        print(text, flush=True)


def _dig(node: Any, *keys: str | int) -> Any:
    for key in keys:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _describe_tls(tls_params: Any) -> str:
    if not isinstance(tls_params, dict):
        return "Envoy defaults (TLS 1.2 - 1.3)"
    low = tls_params.get("tls_minimum_protocol_version", "default")
    high = tls_params.get("tls_maximum_protocol_version", "default")
    suites = tls_params.get("cipher_suites")
    text = f"{low} .. {high}"
    if suites:
        text += f", {len(suites)} TLS 1.2 suites (ECDHE + AEAD); TLS 1.3 suites fixed by BoringSSL"
    return text


def _cluster(bootstrap: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The first static cluster whose name starts with ``prefix`` ({} if none)."""
    for cluster in _dig(bootstrap, "static_resources", "clusters") or []:
        if isinstance(cluster, dict) and str(cluster.get("name", "")).startswith(prefix):
            return cluster
    return {}


def describe_settings(rig: Rig, args: argparse.Namespace) -> list[str]:
    """The Envoy settings in effect and why meshtrust chose them, read from the configs this
    run generated (so the lines follow src/meshtrust/envoy/sidecar.py)."""
    outbound = _cluster(rig.client.bootstrap, "outbound|")
    app = _cluster(rig.server.bootstrap, "inbound|")
    out_tls = _dig(outbound, "transport_socket", "typed_config", "common_tls_context")
    chain = _dig(rig.server.listeners, 0, "filter_chains", 0) or {}
    in_tls = _dig(chain, "transport_socket", "typed_config", "common_tls_context")
    options = _dig(outbound, "typed_extension_protocol_options", _HTTP_OPTIONS) or {}
    app_options = _dig(app, "typed_extension_protocol_options", _HTTP_OPTIONS) or {}
    default_idle = "none set (Envoy default: 1h)"
    idle = _dig(options, "common_http_protocol_options", "idle_timeout") or default_idle
    app_idle = _dig(app_options, "common_http_protocol_options", "idle_timeout") or default_idle
    protocol = (
        "the app's own HTTP version (use_downstream_protocol_config)"
        if "use_downstream_protocol_config" in options
        else "HTTP/1.1 (Envoy default)"
    )
    keepalive = _dig(outbound, "upstream_connection_options", "tcp_keepalive")
    breakers = _dig(outbound, "circuit_breakers", "thresholds", 0, "max_requests")
    alpn = _dig(in_tls, "alpn_protocols") or "none offered (HTTP/1.1 over TLS for HTTP/1.1 apps)"
    manager = _dig(chain, "filters", 0, "typed_config") or {}
    if out_tls is None:
        out_text = "NONE: --plaintext-hop diagnostic, not a mesh"
    else:
        out_text = _describe_tls(_dig(out_tls, "tls_params")) + ", peer URI SAN pinned"
    if in_tls is None:
        in_text = "NONE: DISABLE listener, --plaintext-hop diagnostic"
    else:
        in_text = _describe_tls(_dig(in_tls, "tls_params")) + ", client certificate required"
    http_lines = [
        f"connection reuse: the client sidecar keeps a pool of mTLS connections to the peer "
        f"(HTTP connection manager, not tcp_proxy), so an app opening a connection per request "
        f"pays no handshake per request; protocol to the peer: {protocol}; pooled connections "
        f"closed after {idle} idle (below the peer's 1h HCM idle timeout, so a reused "
        f"connection is never one the peer is closing); TCP keepalive "
        f"{json.dumps(keepalive) if keepalive else 'off'} (dead peers, NAT state)",
        f"server sidecar -> upstream 127.0.0.1:{rig.upstream_port}: plain HTTP, pooled, idle "
        f"timeout {app_idle}",
        f"circuit breakers: max_requests {breakers} (lifted: the sidecar must not turn a burst "
        f"into 503s); inbound HCM codec {manager.get('codec_type', '?')}, xfcc "
        f"{manager.get('forward_client_cert_details')}, route timeout 0s, safe retries only",
    ]
    tcp_lines = [
        "EXPERIMENT --protocol tcp: tcp_proxy on both sidecars, one mTLS connection per app "
        "connection (no pooling, no HTTP parsing); TCP keepalive "
        f"{json.dumps(keepalive) if keepalive else 'off'}",
    ]
    lines = [
        f"command line: {' '.join(rig.sidecar_args)} (sidecar_envoy_args)",
        f"workers: --concurrency {args.sidecar_concurrency} per sidecar -- Envoy's default is "
        "one per CPU, too many with a sidecar per service (Istio uses 2); each worker has its "
        "own connection pools",
        f"outbound TLS (client sidecar): {out_text}",
        f"inbound TLS (server sidecar): {in_text}; ALPN {alpn}",
        "  why: both ends are Envoy, so TLS 1.3 is negotiated; the 1.2 floor only admits "
        "non-Envoy peers (RFC 8996 retired 1.0/1.1)",
        *(http_lines if args.protocol == "http" else tcp_lines),
        f"upstream Envoy (the benchmark's app): direct_response 200, {len(UPSTREAM_BODY)} byte "
        f"body, --concurrency {rig.upstream_concurrency}",
    ]
    if args.tls13_only:
        lines.append("EXPERIMENT --tls13-only: every tls_params set to TLSv1_3 .. TLSv1_3")
    if args.connection_close:
        lines.append(
            "EXPERIMENT --connection-close: wrk sends 'Connection: close' (a new app "
            "connection per request, on both paths)"
        )
    return lines


def negotiated(rig: Rig) -> str:
    stats = rig.client.stats()
    prefix = "cluster.outbound|server.ssl."
    seen = []
    for kind in ("versions", "ciphers", "curves", "sigalgs"):
        values = [
            name.removeprefix(f"{prefix}{kind}.")
            for name, count in stats.items()
            if name.startswith(f"{prefix}{kind}.") and count > 0
        ]
        if values:
            seen.append(f"{kind} {', '.join(sorted(values))}")
    return "; ".join(seen) or "no TLS (plain text)"


def report_load(say: Say, result: LoadResult) -> None:
    d, m = result.direct, result.meshed
    load = result.load
    say(
        f"  {load.name}: wrk -t{load.threads} -c{load.connections} -d{load.duration_s}s, "
        f"median of {len(d.runs)} runs"
    )
    say(f"    {'':26}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>11}")
    for name, fig in (("direct (wrk -> upstream)", d), ("meshed (two sidecars)", m)):
        say(
            f"    {name:26}{fig.median('p50_ms'):10.3f}{fig.median('p99_ms'):10.3f}"
            f"{fig.median('rps'):11.0f}"
        )
    added_p99 = m.median("p99_ms") - d.median("p99_ms")
    say(f"    {'added by the sidecars':26}{result.added_p50_ms:+10.3f}{added_p99:+10.3f}")
    say(
        f"    {'ratio meshed / direct':26}"
        f"{m.median('p50_ms') / d.median('p50_ms'):9.2f}x"
        f"{m.median('p99_ms') / d.median('p99_ms'):9.2f}x"
        f"{m.median('rps') / d.median('rps'):10.2f}x"
    )
    names = ["wrk", "upstream", "client sidecar", "server sidecar", "kernel irq", "this script"]
    for label, fig in (("direct", d), ("meshed", m)):
        parts = [f"{n} {fig.cpu_us(n):.1f}" for n in names if fig.cpu_us(n) > 0.05]
        total = sum(fig.cpu_us(n) for n in names)
        say(f"    CPU us/request {label}: " + ", ".join(parts) + f" (total {total:.1f})")
    r = result.reuse
    say(
        f"    connection reuse (meshed runs): {sum(x.requests for x in m.runs)} requests on "
        f"{r['app connections']} app connections; {r['sidecar-to-sidecar connections']} new "
        f"sidecar-to-sidecar connections ({r['sidecar-to-sidecar TLS handshakes']} TLS "
        f"handshakes); {r['server sidecar-to-upstream connections']} new connections "
        "server sidecar -> upstream"
    )
    other = max(d.other_cores(load.duration_s), m.other_cores(load.duration_s))
    if other > 0.1:
        say(
            f"    WARNING: other processes used up to {other:.2f} cores during these runs; "
            "the figures are disturbed (run again on a quiet host)"
        )
    if d.errors or m.errors:
        say(f"    ERRORS: direct {d.errors}, meshed {m.errors} (socket errors + non-2xx)")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from meshtrust.envoy.sidecar import DEFAULT_CONCURRENCY

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    p.add_argument(
        "--connections", type=int, default=16, help="wrk connections (-c) at fixed concurrency"
    )
    p.add_argument(
        "--low-connections",
        type=int,
        default=1,
        help="wrk connections for the low-load figure the target is judged on (0 = skip)",
    )
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (-d)")
    p.add_argument("--runs", type=int, default=3, help="runs per path and load (median)")
    p.add_argument(
        "--warmup", type=int, default=1, help="seconds of warm-up per path and load (0 = none)"
    )
    p.add_argument(
        "--sidecar-concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"Envoy workers per sidecar (meshtrust's default: {DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--upstream-concurrency", type=int, default=1, help="workers of the upstream Envoy"
    )
    p.add_argument(
        "--tls13-only",
        action="store_true",
        help="experiment: TLS 1.3 as minimum and maximum on both sidecars",
    )
    p.add_argument(
        "--connection-close",
        action="store_true",
        help="experiment: wrk sends 'Connection: close' (no app-side connection reuse)",
    )
    p.add_argument(
        "--plaintext-hop",
        action="store_true",
        help="diagnostic: no TLS between the sidecars (not a mesh; isolates the TLS cost)",
    )
    p.add_argument(
        "--protocol",
        choices=("http", "tcp"),
        default="http",
        help="experiment: the sidecars' protocol; tcp = tcp_proxy, one mTLS connection per "
        "app connection (default http: HTTP connection manager with pooled mTLS connections)",
    )
    p.add_argument("--wrk", help="path to wrk (default: wrk on PATH)")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (Envoy logs)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--runs must be >= 1, --duration > 0 and --warmup >= 0")
    if args.threads < 1 or args.connections < args.threads or args.low_connections < 0:
        p.error("need --threads >= 1, --connections >= --threads, --low-connections >= 0")
    if args.sidecar_concurrency < 1 or args.upstream_concurrency < 1:
        p.error("Envoy concurrency must be >= 1")
    return args


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM: unwind like Ctrl-C, so every clean-up runs (wrk is killed by
    ``subprocess.run``, the Envoys by the exit stack)."""
    raise KeyboardInterrupt


def envoy_version() -> str:
    from meshtrust.envoy import envoy_binary

    try:
        out = subprocess.run(
            [str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    for word in out.split():
        if word.count("/") >= 2 and word[0].isalnum():
            return word.split("/")[1]
    return out.strip() or "unknown"


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    # Short: the SDS sockets live here and a Unix socket path holds at most 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mtsl-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def run(args: argparse.Namespace, wrk: str, say: Say) -> list[LoadResult]:
    loads = []
    if args.low_connections:
        low = Load(
            "low load", min(args.threads, args.low_connections), args.low_connections, args.duration
        )
        loads.append(low)
    loads.append(Load("fixed concurrency", args.threads, args.connections, args.duration))
    results = []
    with workdir(args.keep) as work, contextlib.ExitStack() as stack:
        loop = LoopThread()
        stack.callback(loop.close)  # runs last: the SDS servers stop before their loop
        rig = start_rig(stack, loop, work, args)
        check_path(rig.upstream_port)
        check_path(rig.outbound_port)
        say("Envoy settings in effect")
        for line in describe_settings(rig, args):
            say("  " + line)
        say(f"  negotiated between the sidecars: {negotiated(rig)}")
        say()
        for load in loads:
            results.append(measure(wrk, rig, load, args, say))
            report_load(say, results[-1])
            say()
        for name, envoy in rig.envoys.items():
            if not envoy.running:
                raise RuntimeError(f"{name} exited during the benchmark:\n{envoy.log_tail()}")
    return results


def summary(say: Say, results: Sequence[LoadResult], args: argparse.Namespace) -> None:
    low = next((r for r in results if r.load.name == "low load"), None)
    loaded = next(r for r in results if r.load.name == "fixed concurrency")
    say("summary")
    if low is not None:
        ok = low.added_p50_ms < TARGET_ADDED_P50_MS and not (low.direct.errors + low.meshed.errors)
        say(
            f"  {'PASS' if ok else 'MISS'}  p50 added by the sidecar pair at low load "
            f"(-c{low.load.connections}): {low.added_p50_ms * 1000:.0f} us "
            f"(target < {TARGET_ADDED_P50_MS * 1000:.0f} us)"
        )
    c = loaded.load.connections
    say(
        f"  info  p50 added at -c{c}: {loaded.added_p50_ms * 1000:.0f} us; throughput "
        f"{loaded.meshed.median('rps'):.0f} vs {loaded.direct.median('rps'):.0f} req/s "
        f"({loaded.meshed.median('rps') / loaded.direct.median('rps'):.2f}x)"
    )
    cores = len(os.sched_getaffinity(0))
    mine = ("wrk", "upstream", "client sidecar", "server sidecar", "kernel irq", "this script")
    total = sum(loaded.meshed.cpu_us(n) for n in mine)
    sidecars = loaded.meshed.cpu_us("client sidecar") + loaded.meshed.cpu_us("server sidecar")
    if total > 0:
        say(
            f"  info  at -c{c} a meshed request costs {total:.0f} us of CPU, {sidecars:.0f} us "
            f"({sidecars / total:.0%}) of it in the two sidecars; {cores} cores / {total:.0f} us "
            f"= {cores / total * 1e6:.0f} req/s at most, measured {loaded.meshed.median('rps'):.0f}"
        )
    say(
        f"  The target is judged at low load: with {c} requests in flight on {cores} cores "
        "shared by wrk and three Envoys, each request mostly waits for a CPU, and the p50 "
        f"follows Little's law (p50 ~ {c} / req/s), so the -c{c} 'added p50' is the sidecars' "
        "CPU per request times the queue length, not the latency a request gains by crossing "
        "them."
    )


def main(argv: Sequence[str] | None = None) -> int:
    _repo_on_path()
    args = parse_args(argv)
    wrk = find_wrk(args.wrk)
    if wrk is None:
        print(WRK_INSTALL_HINT, file=sys.stderr)
        return 2
    say = Say()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
        say(
            f"meshtrust sidecar latency benchmark: {os.cpu_count()} cores "
            f"({len(os.sched_getaffinity(0))} usable), load average {load_avg} at start, "
            f"Envoy {envoy_version()}, {wrk_version(wrk)}"
        )
        settings = {k: v for k, v in vars(args).items() if k not in ("wrk", "keep")}
        say("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        say()
        t0 = time.monotonic()
        results = run(args, wrk, say)
        summary(say, results, args)
        say(f"  (took {time.monotonic() - t0:.0f} s)")
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
