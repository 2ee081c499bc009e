"""Duration of a full root rotation of a live 10-service mesh, and the requests served during it.

Starts one mesh with ``meshtrust up``'s machinery (the CA with its workers, an agent and a
real Envoy per service, STRICT mTLS): ``--services`` HTTP services in a ring, each calling
the next through its sidecar. A load thread calls every service's upstream in turn for the
whole run. Then ``meshtrust ca rotate-root`` (a generated root each time) is run ``--runs``
times one after another (each rotation's new root is the next one's old root), and for each
it reports the wall time of the command (phase 1 → done, every phase waiting for every
workload) and the requests made during it, which all must have succeeded. Prints the median
and the max.

Run: ``.venv/bin/python benchmarks/root_rotation.py --runs 3``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from tests.mesh_helpers import APP, http_get, running_mesh, upstream_port, write_mesh  # noqa: E402
from tests.waiting import until  # noqa: E402

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3, help="rotations measured, one mesh")
    p.add_argument("--services", type=int, default=10, help="services in the mesh")
    return p.parse_args(argv)


class Load(threading.Thread):
    """Calls each service's upstream (through the caller's sidecar) in turn, non-stop."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.ports = ports
        self.ok = 0
        self.failed = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for port in self.ports:
                try:
                    status, _ = http_get(port, timeout=10)
                except OSError as exc:
                    status = 0
                    self.failures.append(f"port {port}: {exc}")
                if status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.failures.append(f"port {port}: HTTP {status}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rootrot-bench-") as tmp:
        base = Path(tmp)
        names = [f"s{i}" for i in range(args.services)]
        services = [
            {
                "name": name,
                "command": ["python3", str(APP)],
                "env": {"CALL_EVERY": "0"},
                "upstreams": [{"service": names[(i + 1) % len(names)]}],
            }
            for i, name in enumerate(names)
        ]
        path = write_mesh(base, services, STRICT, cert_ttl="10m")
        ca_dir, home = base / "work" / "ca", base / "home"
        with running_mesh(path) as mesh:
            ports = [
                upstream_port(mesh, n, names[(i + 1) % len(names)]) for i, n in enumerate(names)
            ]
            for port in ports:
                until(lambda p=port: http_get(p)[0] == 200, timeout=120, what="mesh up")  # type: ignore[misc]
            load = Load(ports)
            load.start()
            durations: list[float] = []
            served: list[int] = []
            try:
                for run in range(args.runs):
                    ok0, failed0 = load.ok, load.failed
                    start = time.monotonic()
                    done = subprocess.run(
                        [sys.executable, "-m", "meshtrust", "ca", "rotate-root",
                         "--ca-dir", str(ca_dir), "--timeout", "300"],
                        capture_output=True, text=True, check=False,
                        env={**os.environ, "MESHTRUST_HOME": str(home)},
                    )  # fmt: skip
                    took = time.monotonic() - start
                    if done.returncode != 0:
                        print(done.stdout, done.stderr, file=sys.stderr)
                        return 1
                    ok, failed = load.ok - ok0, load.failed - failed0
                    durations.append(took)
                    served.append(ok)
                    print(
                        f"run {run + 1}: rotation {took:.1f} s, {ok} requests served during it,"
                        f" {failed} failed"
                    )
            finally:
                load.stop.set()
                load.join(timeout=30)
    print(
        f"{args.services}-service mesh, {args.runs} rotations: duration median "
        f"{statistics.median(durations):.1f} s (max {max(durations):.1f} s); requests during a "
        f"rotation median {statistics.median(served):.0f}; failed requests in all: {load.failed}"
    )
    if load.failures:
        print("failures:", *load.failures[:10], sep="\n  ")
    return 0 if load.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
