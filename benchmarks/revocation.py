"""Time from ``meshtrust ca revoke`` to Envoy refusing the revoked certificate, and to Envoy
cutting a connection that was opened with it before.

Two set-ups, each measured over several runs, in one invocation:

1. **One sidecar** (tests/revocation_rig.py): a CA in this process (TLS, grpclib, SQLite
   ledger, revocations polled from the ledger every ``--poll`` s, the default being the CA's
   own), one workload's agent built as ``meshtrust agent --sidecar`` builds it (real CA
   client, real CRL stream) and its real Envoy sidecar in front of a small HTTP app.
2. **A mesh** of ``--services`` services (``meshtrust up``: the CA process, an agent and a
   real Envoy sidecar per service, STRICT mTLS, each service an upstream of the next and
   calling it every ``--call-every`` s through the sidecars; none of them is revoked, so
   every one of those calls should succeed while the sidecars drain, and the count of
   failed ones is printed).

Each run gets a fresh client certificate from the CA, checks that every sidecar accepts it,
keeps one idle kept-alive mTLS connection (one request answered) to every sidecar, runs
``meshtrust ca revoke --serial`` as a separate process against the ledger, and then, per
sidecar, opens a new mTLS connection every ``--probe`` s until Envoy refuses it, and watches
the kept connection until Envoy closes it (the drain a new CRL causes,
docs/revocation.md).

Printed per run and as median/max over the runs: from the start of the ``ca revoke`` process
(its Python start-up included) and from the revocation's time in the ledger (taken just
before its commit) to the first refused handshake at *every* sidecar and to the last kept
connection cut.

Run: ``.venv/bin/python benchmarks/revocation.py --runs 5 --mesh-runs 5``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshtrust.ca.ledger import SqlLedger

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0  # for one run, per sidecar


@dataclass
class Run:
    started: float  # `ca revoke` started (monotonic)
    committed: float  # the revocation's time in the ledger (on the monotonic clock)
    refused: list[float] = field(default_factory=list)  # per sidecar
    cut: list[float] = field(default_factory=list)  # per sidecar

    def line(self, n: int) -> str:
        return (
            f"run {n}: refused at every sidecar {max(self.refused) - self.started:.3f} s after "
            f"`ca revoke` started ({max(self.refused) - self.committed:.3f} s after the "
            f"commit); every kept connection cut {max(self.cut) - self.started:.3f} s "
            f"({max(self.cut) - self.committed:.3f} s)"
        )


def summary(title: str, runs: Sequence[Run]) -> str:
    def stats(values: list[float]) -> str:
        return f"median {statistics.median(values):.3f} s max {max(values):.3f} s"

    return "\n".join(
        [
            title,
            "  refused at every sidecar, from start:  "
            + stats([max(r.refused) - r.started for r in runs]),
            "  refused at every sidecar, from commit: "
            + stats([max(r.refused) - r.committed for r in runs]),
            "  kept connection cut, from start:       "
            + stats([max(r.cut) - r.started for r in runs]),
            "  kept connection cut, from commit:      "
            + stats([max(r.cut) - r.committed for r in runs]),
        ]
    )


def _connect(port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)


def accepted(port: int, context: ssl.SSLContext) -> bool:
    """A new mTLS connection and one request on it: True for 200."""
    conn = _connect(port, context)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except (ssl.SSLError, OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def kept(port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    conn = _connect(port, context)
    conn.request("GET", "/")
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status
    return conn


def watch(
    port: int,
    context: ssl.SSLContext,
    conn: http.client.HTTPSConnection,
    probe: float,
    out: dict[str, float],
) -> None:
    """Record when a new handshake is first refused and when ``conn`` is closed."""
    from tests.revocation_rig import closed_by_server

    deadline = time.monotonic() + TIMEOUT
    while ("refused" not in out or "cut" not in out) and time.monotonic() < deadline:
        if "cut" not in out and closed_by_server(conn):
            out["cut"] = time.monotonic()
        if "refused" not in out and not accepted(port, context):
            out["refused"] = time.monotonic()
        time.sleep(probe)
    conn.close()


async def revoke_and_watch(
    ledger: SqlLedger, serial: int, targets: Sequence[int], context: ssl.SSLContext, probe: float
) -> Run:
    """Keep a connection to every port, run ``ca revoke`` on the ledger, watch every port."""
    from meshtrust.pki import format_serial

    # The CA commits issued certificates in groups: `ca revoke` must find this one.
    deadline = time.monotonic() + TIMEOUT
    while ledger.certificate(format_serial(serial)) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"certificate {format_serial(serial)} not in the ledger")
        await asyncio.sleep(0.05)  # the CA (one sidecar: in this event loop) commits it
    conns = [await asyncio.to_thread(kept, port, context) for port in targets]
    results: list[dict[str, float]] = [{} for _ in targets]
    wall_minus_monotonic = time.time() - time.monotonic()
    started = time.monotonic()
    revoke = revoke_command(["--ledger", ledger.url], serial)
    proc = await asyncio.create_subprocess_exec(*revoke, stdout=asyncio.subprocess.DEVNULL)
    threads = [
        threading.Thread(target=watch, args=(port, context, conn, probe, out), daemon=True)
        for port, conn, out in zip(targets, conns, results, strict=True)
    ]
    for thread in threads:
        thread.start()
    assert await proc.wait() == 0, "ca revoke failed"
    for thread in threads:
        await asyncio.to_thread(thread.join)
    missing = [p for p, out in zip(targets, results, strict=True) if len(out) < 2]
    assert not missing, f"no refusal or no cut within {TIMEOUT:g} s at ports {missing}"
    at = ledger.revocations()[format_serial(serial)].revoked_at.timestamp()
    committed = at - wall_minus_monotonic
    return Run(started, committed, [o["refused"] for o in results], [o["cut"] for o in results])


def revoke_command(where: Sequence[str], serial: int) -> list[str]:
    from meshtrust.pki import format_serial
    from tests.processes import MESHTRUST

    return [
        *MESHTRUST,
        "ca",
        "revoke",
        *where,
        "--serial",
        format_serial(serial),
        "--reason",
        "keyCompromise",
    ]


async def one_sidecar(runs: int, poll: float, probe: float) -> list[Run]:
    from tests.revocation_rig import revocation_rig

    workdir = Path(tempfile.mkdtemp(prefix="revoke-bench-"))
    out: list[Run] = []
    try:
        async with revocation_rig(workdir, poll=poll, sidecar=True) as rig:
            for n in range(runs):
                client = await rig.client(f"w{n}")
                context = client.context(rig.root_pem)
                assert await asyncio.to_thread(accepted, rig.port, context), "fresh cert refused"
                run = await revoke_and_watch(rig.ledger, client.serial, [rig.port], context, probe)
                print(run.line(n + 1), flush=True)
                out.append(run)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""


def mesh_client(ca_dir: Path, address: str, service_account: str) -> tuple[ssl.SSLContext, int]:
    """A certificate from the mesh's CA for ``service_account``, as its agent would get one
    (token from the CA directory's issuer): a TLS client context presenting it, its serial."""
    from cryptography import x509

    from meshtrust.ca import load_token_signing_key, mint_token, token_issuer_for
    from meshtrust.caapi import CaClient
    from meshtrust.clock import SystemClock
    from meshtrust.pki import build_csr, generate_key, private_key_pem
    from meshtrust.spiffe import SpiffeId, TrustDomain

    td = TrustDomain("cluster.local")
    signing_key = load_token_signing_key(ca_dir)
    assert signing_key is not None
    now = SystemClock().now()
    token = mint_token(
        signing_key, token_issuer_for(td), "default", service_account, now, dt.timedelta(hours=1)
    )
    key = generate_key()
    root_pem = (ca_dir / "root-cert.pem").read_bytes()
    identity = SpiffeId.for_workload(td, "default", service_account)
    chain = asyncio.run(CaClient(address, root_pem).sign(build_csr(key, identity), token=token))
    directory = Path(tempfile.mkdtemp(dir=ca_dir.parent))
    (directory / "chain.pem").write_text("".join(chain[:-1]))
    (directory / "key.pem").write_bytes(private_key_pem(key))
    context = ssl.create_default_context(cadata=root_pem.decode())
    context.check_hostname = False  # an SVID names a SPIFFE ID, not a host
    context.load_cert_chain(directory / "chain.pem", directory / "key.pem")
    return context, x509.load_pem_x509_certificate(chain[0].encode()).serial_number


def app_calls(log: Path, skip: int) -> tuple[list[str], int]:
    """The app's call lines after the first ``skip`` lines of its log, and the line count."""
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines[skip:] if " -> " in line], len(lines)


def _ok(call: str) -> bool:
    return ": 200 (" in call  # `s0 -> s1: 200 (s1 saw spiffe://...)`


def mesh(services: int, runs: int, probe: float, call_every: float) -> tuple[list[Run], list[str]]:
    """``runs`` revocations on a mesh of ``services`` (``probe`` s between attempts at each
    sidecar: ten sidecars probed every 0.02 s would load two cores with handshakes); also
    every call the services made to each other during the runs."""
    from meshtrust.ca.ledger import SqlLedger, default_ledger_url
    from tests.mesh_helpers import APP, running_mesh, write_mesh

    workdir = Path(tempfile.mkdtemp(prefix="rv-"))  # short: Unix socket paths live under it
    out: list[Run] = []
    calls: list[str] = []
    try:
        names = [f"s{i}" for i in range(services)]
        spec = [
            {
                "name": name,
                "command": ["python3", str(APP)],
                "env": {"CALL_EVERY": str(call_every)},
                "upstreams": [{"service": names[(i + 1) % services]}],
            }
            for i, name in enumerate(names)
        ]
        path = write_mesh(workdir, spec, STRICT, cert_ttl="1h")
        started = time.monotonic()
        with running_mesh(path) as state:
            assert state.ca is not None
            print(f"{services}-service mesh up in {time.monotonic() - started:.1f} s", flush=True)
            ca_dir = Path(state.ca.ca_dir)
            ledger = SqlLedger(default_ledger_url(ca_dir))
            ports = [state.service(name).inbound_port for name in names]
            logs = [Path(state.work_dir) / "logs" / f"{name}-app.log" for name in names]
            until(
                lambda: all(
                    _ok(app_calls(log, 0)[0][-1:][0] if app_calls(log, 0)[0] else "")
                    for log in logs
                ),
                "the services call each other",
            )
            skip = [app_calls(log, 0)[1] for log in logs]
            for n in range(runs):
                context, serial = mesh_client(ca_dir, state.ca.address, f"probe{n}")
                until(
                    lambda: all(accepted(port, context) for port in ports),  # noqa: B023
                    "every sidecar accepts the new certificate",
                )
                run = asyncio.run(revoke_and_watch(ledger, serial, ports, context, probe))
                print(run.line(n + 1), flush=True)
                out.append(run)
            for log, lines in zip(logs, skip, strict=True):
                calls += app_calls(log, lines)[0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out, calls


def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"not true within {timeout:g} s: {what}")
        time.sleep(0.2)


def main() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from meshtrust.ca.revocation import POLL_INTERVAL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs with one sidecar (0: skip)")
    parser.add_argument("--mesh-runs", type=int, default=5, help="runs on the mesh (0: skip)")
    parser.add_argument("--services", type=int, default=10, help="services in the mesh")
    parser.add_argument("--poll", type=float, default=POLL_INTERVAL, help="CA ledger poll (s)")
    parser.add_argument("--probe", type=float, default=0.02, help="handshake attempts (s)")
    parser.add_argument(
        "--mesh-probe", type=float, default=0.1, help="handshake attempts per sidecar (s)"
    )
    parser.add_argument(
        "--call-every", type=float, default=0.1, help="each service calls the next (s)"
    )
    args = parser.parse_args()
    reports = []
    if args.runs:
        single = asyncio.run(one_sidecar(args.runs, args.poll, args.probe))
        reports.append(summary(f"one sidecar, {args.runs} runs (CA poll {args.poll:g} s):", single))
    if args.mesh_runs:
        runs, calls = mesh(args.services, args.mesh_runs, args.mesh_probe, args.call_every)
        failed = [call for call in calls if not _ok(call)]
        reports.append(
            summary(
                f"{args.services}-service mesh (`meshtrust up`), {args.mesh_runs} runs, "
                f"every sidecar:",
                runs,
            )
            + f"\n  calls between the services meanwhile (none revoked): {len(calls)}, "
            f"failed: {len(failed)}" + "".join(f"\n    {call}" for call in failed[:10])
        )
    print(f"probe every {args.probe:g} s (one sidecar), {args.mesh_probe:g} s (mesh)")
    print("\n".join(reports))


if __name__ == "__main__":
    main()
