"""Federation benchmark: how long a change of west's bundle takes to reach east's CA.

Two real CAs (``meshtrust ca serve`` processes, trust domains ``east.test`` and
``west.test`` with unrelated roots, on loopback) federate over ``https_spiffe`` bundle
endpoints with a refresh hint of ``--refresh-hint`` seconds (5 by default, the issue's
setting). ``--runs`` times, west is restarted with one more root in its ``root-cert.pem``
(phase A+B of a root rotation). Measured: from the moment west's bundle endpoint first
serves the new bundle (this script polls it every 20 ms with the same fetcher the CA uses)
to the moment east's ledger holds it (polled every 20 ms) — the CA part of "a new root
reaches east's sidecars"; the CA-to-agent delivery is not built yet. Expect about half a
refresh hint on average and at most one hint plus a fetch. Also: the time of one fetch of a
bundle document over TLS (median of ``--fetches``).

Run: ``.venv/bin/python benchmarks/federation.py`` (``--help`` for the settings).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshtrust.ca.cadir import init_ca_dir, load_ca_dir
from meshtrust.ca.federation import FederationStore, fetch_bundle
from meshtrust.ca.ledger import SqlLedger
from meshtrust.clock import SystemClock
from meshtrust.config.federation import EndpointProfile, FederatedTrustDomain
from meshtrust.pki import certs_pem, generate_key, make_root
from meshtrust.spiffe import SpiffeId, TrustDomain
from meshtrust.spiffe.bundle import SpiffeBundle

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
        (self.directory / "ca.yaml").write_text(
            f"listen: 127.0.0.1:{free_port()}\nmetrics-listen: 127.0.0.1:{free_port()}\n"
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

    def peer(self) -> FederatedTrustDomain:
        return FederatedTrustDomain(
            self.td,
            f"https://127.0.0.1:{self.endpoint_port}/",
            EndpointProfile.HTTPS_SPIFFE,
            SpiffeId.parse(f"spiffe://{self.td}/meshtrust/bundle-endpoint"),
        )

    def bundle(self) -> SpiffeBundle:
        return SpiffeBundle(self.td, load_ca_dir(self.ca_dir, SystemClock().now()).roots)


async def served_sequence(ca: Ca, trusted: SpiffeBundle) -> int | None:
    try:
        return (await fetch_bundle(ca.peer(), trusted, timeout=2)).sequence
    except Exception:
        return None


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fedbench-") as tmp:
        east, west = Ca(EAST, Path(tmp) / "east"), Ca(WEST, Path(tmp) / "west")
        east.configure(west, args.refresh_hint)
        west.configure(east, args.refresh_hint)
        east.start()
        west.start()
        store = FederationStore(f"sqlite:///{east.ca_dir / 'ledger.db'}")
        try:
            trusted = west.bundle()
            deadline = time.monotonic() + 60
            while await served_sequence(west, trusted) is None:
                assert time.monotonic() < deadline, "west's endpoint did not come up"
                await asyncio.sleep(0.05)
            fetches = []
            for _ in range(args.fetches):
                start = time.perf_counter()
                await fetch_bundle(west.peer(), trusted)
                fetches.append(time.perf_counter() - start)
            delays = []
            for index in range(args.runs):
                west.stop()
                new_root = make_root(
                    generate_key(), "west.test", SystemClock().now(), dt.timedelta(days=30)
                )
                roots_file = west.ca_dir / "root-cert.pem"
                roots_file.write_bytes(roots_file.read_bytes() + certs_pem([new_root]))
                want = index + 2
                west.start()
                while await served_sequence(west, trusted) != want:
                    await asyncio.sleep(0.02)
                served_at = time.monotonic()
                while True:
                    stored = store.load(WEST)
                    if stored is not None and stored.bundle.sequence == want:
                        break
                    await asyncio.sleep(0.02)
                delays.append(time.monotonic() - served_at)
                trusted = west.bundle()
                print(f"run {index + 1}: {delays[-1]:.2f} s", flush=True)
        finally:
            store.close()
            east.stop()
            west.stop()
    print(
        f"propagation west bundle -> east's ledger (refresh hint {args.refresh_hint:g} s, "
        f"{args.runs} runs): median {statistics.median(delays):.2f} s, "
        f"min {min(delays):.2f} s, max {max(delays):.2f} s"
    )
    print(
        f"one bundle fetch over TLS (https_spiffe, loopback, {args.fetches} fetches): "
        f"median {statistics.median(fetches) * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="bundle changes to time")
    parser.add_argument("--refresh-hint", type=float, default=5.0, help="seconds")
    parser.add_argument("--fetches", type=int, default=50, help="fetches to time")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
