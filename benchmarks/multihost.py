"""A mesh across hosts, measured: cross-host latency through two sidecars, mTLS handshakes/s
(TLS 1.2 vs 1.3, with and without session resumption), join-to-ready time and memory per
service. Run by hand, as root (network namespaces): ``sudo .venv/bin/python
benchmarks/multihost.py``. Prints a report; asserts nothing.

Set-up: :func:`tests.netns.network` makes hosts h1 (the CA), h2 and h3 on one bridge, each
started by its own ``meshtrust up --host`` (h2/h3 with join files), as the multi-host tests do.

* **latency**: ``wrk`` on h2, HTTP/1.1 keep-alive, 1 and 16 connections, against the same
  app on h3 two ways: *direct* (h2 -> h3's address:app port; the benchmark's app binds every
  address, which a mesh app would not) and *meshed* (h2 -> client sidecar's outbound port ->
  mTLS -> h3's server sidecar -> app). The app is a small threaded Python server, so the
  absolute figures are mostly Python's; the difference is what the sidecars add.
* **handshakes/s**: one single-threaded Python client on h2 against the server sidecar's
  inbound port with the client service's own certificate chain and key (its agent's output
  files; ``openssl s_time`` cannot send the intermediate), a new connection and one request
  each, a full handshake or resuming the previous session, pinned to TLS 1.2 or TLS 1.3
  (``resumed`` counts the connections the server really resumed). The client is the
  bottleneck: the figure is a floor of what a sidecar accepts, the same for each variant.
* **join-to-ready / memory**: a mesh with N services on h2 (no apps, no upstreams): seconds
  from ``up --host h2 --join`` to its return (every sidecar has its certificate and is
  live), then VmRSS of each agent and its Envoy, averaged per service.

All on one machine: the hosts share its cores, so every figure includes contention with the
others (and with whatever else runs). Compare figures of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import Host, Network, network  # noqa: E402

APP = """
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else Nagle + delayed ACK add 40 ms to every answer
    def do_GET(self):  # one write: the whole answer in one segment
        self.wfile.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"""

APP_PORT, SERVER_INBOUND, CLIENT_INBOUND, LOCAL = 18080, 16080, 16081, 19001


def meshtrust(host: Host, home: Path, *args: str, timeout: float = 300) -> str:
    done = host.run(
        [sys.executable, "-m", "meshtrust", *args],
        timeout=timeout,
        env={**os.environ, "MESHTRUST_HOME": str(home)},
    )
    out = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"meshtrust {' '.join(args)} on {host.name} failed:\n{out}")
    return out


def write_mesh(directory: Path, net: Network, services: list[dict[str, Any]], ca_port: int) -> Path:
    mesh = {
        "certTTL": "1h",
        "workDir": str(directory / "work"),
        "hosts": [{"name": n, "address": net[n].address} for n in ("h1", "h2", "h3")],
        "ca": {"host": "h1", "listen": f"{net['h1'].address}:{ca_port}"},
        "services": services,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    return path


def start(net: Network, path: Path, hosts: list[str]) -> float:
    """Start the mesh of ``path`` on h1 and ``hosts``; seconds the last host's `up` took."""
    home = path.parent / "home"
    meshtrust(net["h1"], home, "up", str(path), "--host", "h1", "--detach")
    took = 0.0
    for name in hosts:
        join = path.parent / f"{name}.join"
        meshtrust(net["h1"], home, "join", "create", str(path), "--host", name, "-o", str(join))
        began = time.monotonic()
        meshtrust(net[name], home, "up", str(path), "--host", name, "--join", str(join), "-d")
        took = time.monotonic() - began
    return took


def stop(net: Network, path: Path, hosts: list[str]) -> None:
    for name in [*hosts, "h1"]:
        meshtrust(net[name], path.parent / "home", "down", str(path), "--host", name)


def wrk(host: Host, url: str, connections: int, seconds: int) -> dict[str, float]:
    done = host.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        timeout=seconds + 60,
    )
    text = done.stdout.decode()
    out: dict[str, float] = {}
    for label in ("50%", "99%"):
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)$", text, re.M)
        if m:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
            out[f"p{label[:-1]}_ms"] = float(m.group(1)) * scale
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    out["rps"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = float(m.group(1)) if m else 0.0
    return out


HANDSHAKES = """
import socket, ssl, sys, time
host, port, chain, key, roots, version, reuse, seconds = sys.argv[1:9]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False  # a SPIFFE peer has no DNS name; the chain is still verified
ctx.load_verify_locations(roots)
ctx.load_cert_chain(chain, key)  # the whole chain: the sidecar needs the intermediate
pinned = ssl.TLSVersion.TLSv1_2 if version == "tls1_2" else ssl.TLSVersion.TLSv1_3
ctx.minimum_version = ctx.maximum_version = pinned
session, count, resumed = None, 0, 0
end = time.monotonic() + float(seconds)
while time.monotonic() < end:
    with socket.create_connection((host, int(port))) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stalls
        with ctx.wrap_socket(raw, session=session if reuse == "1" else None) as tls:
            tls.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            while tls.recv(4096):  # the answer (and, on TLS 1.3, the session ticket)
                pass
            resumed += tls.session_reused
            session = tls.session
    count += 1
print(count / float(seconds), resumed)
"""


def handshakes(
    host: Host, target: tuple[str, int], certs: Path, roots: Path, version: str, reuse: bool
) -> dict[str, float]:
    """New mTLS connections per second from one single-threaded client (an HTTP request on
    each, so the sidecar completes the handshake and answers)."""
    argv = [sys.executable, "-c", HANDSHAKES, target[0], str(target[1]),
            str(certs / "cert-chain.pem"), str(certs / "key.pem"), str(roots), version,
            "1" if reuse else "0", "5"]  # fmt: skip
    done = host.run(argv, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"the handshake client failed:\n{done.stderr.decode()}")
    rate, resumed = done.stdout.decode().split()
    return {"per_s": float(rate), "resumed": float(resumed)}


def latency_and_handshakes(net: Network, directory: Path, seconds: int) -> dict[str, Any]:
    app = [sys.executable, "-c", APP]
    services = [
        {"name": "server", "host": "h3", "port": APP_PORT, "inboundPort": SERVER_INBOUND,
         "command": app},
        {"name": "client", "host": "h2", "port": APP_PORT, "inboundPort": CLIENT_INBOUND,
         "upstreams": [{"service": "server", "localPort": LOCAL}]},
    ]  # fmt: skip
    path = write_mesh(directory, net, services, 15012)
    start(net, path, ["h3", "h2"])
    h2, h3 = net["h2"], net["h3"]
    report: dict[str, Any] = {"latency": {}, "handshakes_per_s": {}}
    try:
        direct = f"http://{h3.address}:{APP_PORT}/"
        meshed = f"http://127.0.0.1:{LOCAL}/"
        for conns in (1, 16):
            wrk(h2, direct, conns, 2)  # warm-up: pools, handshakes
            wrk(h2, meshed, conns, 2)
            report["latency"][conns] = {
                "direct": wrk(h2, direct, conns, seconds),
                "meshed": wrk(h2, meshed, conns, seconds),
            }
        certs = directory / "work" / "h2" / "client" / "certs"
        roots = directory / "work" / "h2" / "trust" / "root-cert.pem"
        target = (h3.address, SERVER_INBOUND)
        for version in ("tls1_2", "tls1_3"):
            for reuse in (False, True):
                key = f"{version} {'resumption' if reuse else 'full'}"
                report["handshakes_per_s"][key] = handshakes(
                    h2, target, certs, roots, version, reuse
                )
    finally:
        stop(net, path, ["h2", "h3"])
    return report


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def join_and_memory(net: Network, directory: Path, count: int) -> dict[str, float]:
    services = [
        {"name": f"s{i}", "host": "h2", "port": 20000 + i, "inboundPort": 21000 + i}
        for i in range(count)
    ]
    path = write_mesh(directory, net, services, 15013)
    took = start(net, path, ["h2"])
    try:
        state = json.loads((directory / "work" / "h2" / "state.json").read_text())
        agents = [_rss_kb(s["agent_pid"]) for s in state["services"]]
        envoys = [_rss_kb(s["envoy_pid"]) for s in state["services"] if s["envoy_pid"]]
    finally:
        stop(net, path, ["h2"])
    return {
        "join_to_ready_s": took,
        "agent_rss_mb": statistics.mean(agents) / 1024,
        "envoy_rss_mb": statistics.mean(envoys) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run")
    parser.add_argument("--services", default="1,10,20", help="mesh sizes on one host")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    with network(["h1", "h2", "h3"]) as net:
        with tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp:
            report.update(latency_and_handshakes(net, Path(tmp) / "lat", args.seconds))
        report["per_host"] = {}
        for count in (int(n) for n in args.services.split(",")):
            with tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp:
                report["per_host"][count] = join_and_memory(net, Path(tmp), count)
    print(json.dumps(report, indent=2))
    for conns, paths in report["latency"].items():
        d, m = paths["direct"], paths["meshed"]
        print(
            f"{conns:>2} conn: added p50 {m['p50_ms'] - d['p50_ms']:.3f} ms, added p99 "
            f"{m['p99_ms'] - d['p99_ms']:.3f} ms; rps direct {d['rps']:.0f}, meshed {m['rps']:.0f}"
        )


if __name__ == "__main__":
    main()
