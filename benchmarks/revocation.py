"""Time from ``meshtrust ca revoke`` to Envoy refusing the revoked certificate.

One CA (in this process: TLS, grpclib, SQLite ledger, revocations polled from the ledger
every ``--poll`` s, the default being the CA's own), one workload's agent built as
``meshtrust agent`` builds it (real CA client, real CRL stream) and its real Envoy, whose
inbound mTLS listener validates clients with the agent's SDS ``ROOTCA``
(tests/revocation_rig.py). Each run gets a fresh client certificate from the CA, checks that
Envoy accepts it, runs ``meshtrust ca revoke --serial`` as a separate process against the
ledger, and then opens a new mTLS connection every ``--probe`` s until Envoy refuses it.

Printed per run and as median/max over ``--runs``: from the start of the ``ca revoke``
process (its Python start-up included) and from its exit (the revocation committed) to the
first refused handshake. Also whether a connection opened before the revocation is cut.

Run: ``.venv/bin/python benchmarks/revocation.py --runs 7``
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def measure(runs: int, poll: float, probe: float) -> None:
    from meshtrust.pki import format_serial
    from tests.processes import MESHTRUST
    from tests.revocation_rig import revocation_rig

    workdir = Path(tempfile.mkdtemp(prefix="revoke-bench-"))
    from_start: list[float] = []
    from_exit: list[float] = []
    try:
        async with revocation_rig(workdir, poll=poll) as rig:
            url = rig.ledger.url
            cut = None
            for run in range(runs):
                client = await rig.client(f"w{run}")
                assert await asyncio.to_thread(rig.accepted, client), "fresh cert refused"
                held = await asyncio.to_thread(rig.open, client)
                started = time.monotonic()
                proc = await asyncio.create_subprocess_exec(
                    *MESHTRUST,
                    "ca",
                    "revoke",
                    "--ledger",
                    url,
                    "--serial",
                    format_serial(client.serial),
                    "--reason",
                    "keyCompromise",
                    stdout=asyncio.subprocess.DEVNULL,
                )
                assert await proc.wait() == 0, "ca revoke failed"
                exited = time.monotonic()
                while await asyncio.to_thread(rig.accepted, client):
                    await asyncio.sleep(probe)
                refused = time.monotonic()
                from_start.append(refused - started)
                from_exit.append(refused - exited)
                print(
                    f"run {run + 1}: refused {refused - started:.3f} s after `ca revoke` "
                    f"started, {refused - exited:.3f} s after it exited (committed)"
                )
                if cut is None:
                    try:
                        held.request("GET", "/")
                        response = held.getresponse()
                        response.read()
                        cut = response.status != 200
                    except OSError:
                        cut = True
                held.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"revoke -> refusal over {runs} runs (poll {poll:g} s, probe every {probe:g} s): "
        f"from start median {statistics.median(from_start):.3f} s max {max(from_start):.3f} s; "
        f"from commit median {statistics.median(from_exit):.3f} s max {max(from_exit):.3f} s"
    )
    print(f"a connection opened before the revocation was {'cut' if cut else 'kept'}")


def main() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from meshtrust.ca.revocation import POLL_INTERVAL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--poll", type=float, default=POLL_INTERVAL, help="CA ledger poll (s)")
    parser.add_argument("--probe", type=float, default=0.02, help="handshake attempts (s)")
    args = parser.parse_args()
    asyncio.run(measure(args.runs, args.poll, args.probe))


if __name__ == "__main__":
    main()
