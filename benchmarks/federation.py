"""Federation benchmark: a change of west's bundle reaching east's sidecars, and the
latency of a cross-mesh call through the sidecars.

Two real CAs (``meshtrust ca serve`` processes, trust domains ``east.test`` and
``west.test`` with unrelated roots, on loopback) federate over ``https_spiffe`` bundle
endpoints with a refresh hint of ``--refresh-hint`` seconds (5 by default, the issue's
setting); each mesh has one real ``meshtrust agent --sidecar`` with its real Envoy (east's
``web`` with an upstream to west's ``api``; west's policy allows
``east.test/ns/default/sa/web``), and one small Python app serves both.

* **propagation**, ``--runs`` times: ``meshtrust ca bundle add-root`` adds a new root to
  west's versioned bundle (phase A+B of a root rotation); measured from the moment the
  command returns to the first TLS handshake east's sidecar accepts from a leaf signed by
  that root (probed every 20 ms, a new connection each time). The path: west's ledger ->
  west's bundle endpoint (its ledger poll, 1 s) -> east's poller (the refresh hint) ->
  east's ledger -> east's trust stream (its poll, 1 s) -> east's agent -> SDS -> Envoy.
  Each change comes at a random phase of east's poll cycle. Expect about half a hint plus
  a second or two on average, at most a hint plus that.
* **latency**: ``--requests`` sequential HTTP/1.1 requests on one kept-alive connection,
  *direct* to the app and *meshed* (east's outbound port -> mTLS -> west's sidecar -> app);
  p50/p99 and the difference, as ``benchmarks/multihost.py`` reports it (here on loopback
  with a Python client, so the absolute figures are mostly Python's).

Run: ``.venv/bin/python benchmarks/federation.py`` (``--help`` for the settings). Prints a
report; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import os
import random
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from meshtrust.ca import load_token_signing_key, mint_token, token_issuer_for
from meshtrust.ca.cadir import init_ca_dir
from meshtrust.ca.ledger import SqlLedger
from meshtrust.clock import SystemClock
from meshtrust.envoy.trust_domains import peer_sni
from meshtrust.pki import certs_pem, generate_key, make_root, private_key_pem
from meshtrust.pki.profile import LeafIssuer, Signer
from meshtrust.spiffe import SpiffeId, TrustDomain

EAST, WEST = TrustDomain.parse("east.test"), TrustDomain.parse("west.test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ca:
    def __init__(self, td: TrustDomain, directory: Path) -> None:
        self.td = td
        self.directory = directory
        self.ca_dir = directory / "ca"
        self.endpoint_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        init_ca_dir(self.ca_dir, td, SystemClock().now())
        SqlLedger(f"sqlite:///{self.ca_dir / 'ledger.db'}").close()

    def configure(self, other: Ca, hint: float) -> None:
        bootstrap = self.directory / f"{other.td}.pem"
        bootstrap.write_bytes((other.ca_dir / "root-cert.pem").read_bytes())
        self.listen = f"127.0.0.1:{free_port()}"
        (self.directory / "ca.yaml").write_text(
            f"listen: {self.listen}\nmetrics-listen: 127.0.0.1:{free_port()}\n"
            "workers: 1\nfederation:\n  bundleEndpoint:\n"
            f"    listen: 127.0.0.1:{self.endpoint_port}\n    refreshHint: {hint:g}s\n"
            "  federatesWith:\n"
            f"  - trustDomain: {other.td}\n"
            f"    bundleEndpointUrl: https://127.0.0.1:{other.endpoint_port}/\n"
            "    profile: https_spiffe\n"
            f"    endpointSpiffeId: spiffe://{other.td}/meshtrust/bundle-endpoint\n"
            f"    bootstrapBundle: {bootstrap}\n"
        )

    def start(self) -> None:
        log = (self.directory / "ca.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshtrust",
                "ca",
                "serve",
                "--config",
                str(self.directory / "ca.yaml"),
                "--ca-dir",
                str(self.ca_dir),
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


APP_SCRIPT = """\
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed ACK
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", %d), H).serve_forever()
"""

POLICY_STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: strict, namespace: default}\nspec: {mtls: {mode: STRICT}}\n"
)
POLICY_WEST = POLICY_STRICT + (
    "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: api, namespace: default}\nspec:\n  selector: {matchLabels: {app: api}}\n"
    "  action: ALLOW\n  rules:\n"
    '  - from: [{source: {principals: ["east.test/ns/default/sa/web"]}}]\n'
)


def start_agent(ca: Ca, service_account: str, sidecar: str, policy: str) -> subprocess.Popen[bytes]:
    d = ca.directory
    key = load_token_signing_key(ca.ca_dir)
    assert key is not None
    token = mint_token(
        key, token_issuer_for(ca.td), "default", service_account, SystemClock().now(),
        dt.timedelta(hours=2),
    )  # fmt: skip
    (d / "token").write_text(token)
    (d / "sidecar.yaml").write_text(sidecar)
    (d / "policy.yaml").write_text(policy)
    listen = ca.listen
    log = (d / "agent.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshtrust",
            "agent",
            "--ca-address",
            listen,
            "--ca-root",
            str(ca.ca_dir / "root-cert.pem"),
            "--token-file",
            str(d / "token"),
            "--sds-socket",
            str(d / "sds.sock"),
            "--sidecar",
            str(d / "sidecar.yaml"),
            "--policy",
            str(d / "policy.yaml"),
            "--envoy-workdir",
            str(d / "envoy"),
            "--status-listen",
            "off",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    return proc


def accepted(port: int, cert: Path, key: Path) -> bool:
    """One new mTLS connection to a sidecar's inbound port and one request: 200? It sends
    the SNI a sidecar of west.test sends (envoy/trust_domains.py), which picks the chain
    that validates west's callers by west's roots."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(cert, key)
    sni = peer_sni(TrustDomain.parse("west.test"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=sni) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                head = tls.recv(64)
        return head.startswith(b"HTTP/1.1 200")
    except (OSError, ssl.SSLError):
        return False


def latencies(port: int, count: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            out.append(time.perf_counter() - start)
    finally:
        conn.close()
    return out


def p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark: {what} not within {timeout:g} s")
        time.sleep(0.05)


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fedbench-") as tmp:
        east, west = Ca(EAST, Path(tmp) / "east"), Ca(WEST, Path(tmp) / "west")
        east.configure(west, args.refresh_hint)
        west.configure(east, args.refresh_hint)
        app_port, east_in, west_in, outbound = free_port(), free_port(), free_port(), free_port()
        (Path(tmp) / "app.py").write_text(APP_SCRIPT % app_port)
        app = [sys.executable, str(Path(tmp) / "app.py")]
        procs = [subprocess.Popen(app, stderr=subprocess.DEVNULL)]
        try:
            east.start()
            west.start()
            procs.append(
                start_agent(
                    west, "api", f"name: api\napp_port: {app_port}\ninbound_port: {west_in}\n",
                    POLICY_WEST,
                )
            )  # fmt: skip
            procs.append(
                start_agent(
                    east, "web",
                    f"name: web\napp_port: {app_port}\ninbound_port: {east_in}\nupstreams:\n"
                    f"- name: api\n  local_port: {outbound}\n  address: 127.0.0.1:{west_in}\n"
                    "  spiffe_id: spiffe://west.test/ns/default/sa/api\n",
                    POLICY_STRICT,
                )
            )  # fmt: skip
            wait_for(lambda: _ok(outbound), "east's web calling west's api (federated)")
            delays = []
            for index in range(args.runs):
                key = generate_key()
                root = make_root(key, "west.test", SystemClock().now(), dt.timedelta(days=30))
                leaf_key = generate_key()
                leaf = LeafIssuer(Signer(root, key)).issue(
                    leaf_key.public_key(),
                    SpiffeId.parse("spiffe://west.test/ns/default/sa/probe"),
                    SystemClock().now(),
                    dt.timedelta(hours=1),
                )
                cert, keyfile = Path(tmp) / f"probe{index}.pem", Path(tmp) / f"probe{index}.key"
                cert.write_bytes(certs_pem([leaf]))
                keyfile.write_bytes(private_key_pem(leaf_key))
                (Path(tmp) / "root.pem").write_bytes(certs_pem([root]))
                assert not accepted(east_in, cert, keyfile)
                # At a random phase of east's poll cycle: one run right after another would
                # always land at the same point of it.
                time.sleep(random.uniform(0, args.refresh_hint))
                subprocess.run(
                    [sys.executable, "-m", "meshtrust", "ca", "bundle", "add-root",
                     str(Path(tmp) / "root.pem"), "--ca-dir", str(west.ca_dir)],
                    check=True, capture_output=True, timeout=60,
                )  # fmt: skip
                changed = time.monotonic()
                while not accepted(east_in, cert, keyfile):
                    if time.monotonic() - changed > 120:
                        raise SystemExit("benchmark: the new root never reached east's sidecar")
                    time.sleep(0.02)
                delays.append(time.monotonic() - changed)
                print(f"run {index + 1}: {delays[-1]:.2f} s", flush=True)
            direct = latencies(app_port, args.requests)
            meshed = latencies(outbound, args.requests)
        finally:
            for proc in reversed(procs):
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
            east.stop()
            west.stop()
    print(
        f"propagation: west's new root -> accepted by east's sidecar (refresh hint "
        f"{args.refresh_hint:g} s, {args.runs} runs): median {statistics.median(delays):.2f} s, "
        f"min {min(delays):.2f} s, max {max(delays):.2f} s"
    )
    print(
        f"cross-mesh call, {args.requests} sequential requests, 1 kept-alive connection: direct "
        f"p50 {p(direct, 0.5):.3f} ms p99 {p(direct, 0.99):.3f} ms; through both sidecars "
        f"p50 {p(meshed, 0.5):.3f} ms p99 {p(meshed, 0.99):.3f} ms; added p50 "
        f"{p(meshed, 0.5) - p(direct, 0.5):.3f} ms, "
        f"added p99 {p(meshed, 0.99) - p(direct, 0.99):.3f} ms"
    )


def _ok(port: int) -> bool:
    try:
        return latencies(port, 1) != []
    except (OSError, AssertionError, http.client.HTTPException):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="bundle changes to time")
    parser.add_argument("--refresh-hint", type=float, default=5.0, help="seconds")
    parser.add_argument("--requests", type=int, default=2000, help="requests to time, each way")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
