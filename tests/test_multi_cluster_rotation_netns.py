"""Certificate rotation under load across two shared-root meshes, both directions.

examples/multi-cluster as written (tests/test_multi_cluster_netns.py), with one change: both
meshes' workload certificates last ``certTTL: 10s``, the shortest mesh.yaml allows, and the
agents renew them at the default ratio (0.5 of the lifetime left, ± 0.01): every workload
gets a new certificate about every 5 s. Two loads run at once, a new connection per request:

* on east, to web's sidecar port for ``api.external.com:443`` (an HTTPS port: the sidecar
  passes the bytes through, one mTLS connection per app connection), so every request is a
  new handshake: east's web presents its current certificate, west's api its own;
* on west, to reports' sidecar port for ``web.east.internal:16080`` (a TCP port): the same
  the other way, west's reports as the client and east's web as the server.

While they run, each side's workloads rotate several times (seen in both CAs' ledgers and in
``meshtrust status``), and not one request fails.

An intermediate rotation of one CA during such a load:
tests/test_multi_cluster_ca_rotation_netns.py.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshtrust.mesh.probes import serial_text
from tests.test_multi_cluster_netns import (
    EAST_WEB,
    REPORTS_APP,
    WEB_APP,
    WEST_REPORTS,
    Meshes,
    copy_example,
    running_meshes,
)

pytestmark = [pytest.mark.slow, pytest.mark.netns]

CERT_TTL = "10s"  # the shortest certTTL mesh.yaml accepts ("must be at least 10s")
LOAD_SECONDS = 40  # about 8 rotations of every workload
EAST_TO_API = 19001  # web's localPort for api.external.com (east.yaml)
WEST_TO_WEB = 19001  # reports' localPort for web.east.internal (west.yaml)
WEST_API = "spiffe://west.test/ns/default/sa/api"
EAST_OTHER = "spiffe://east.test/ns/default/sa/other"

# Requests for `seconds` through one sidecar port, a new connection to the sidecar each
# time, paced a little (the machine's two cores also run both meshes' CAs, agents and
# Envoys, whose renewals must not starve).
LOAD = """
import http.client, json, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
ok, failed, errors = 0, 0, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/")
        r = c.getresponse(); r.read(); c.close()
        if r.status == 200:
            ok += 1
            time.sleep(0.02)
            continue
        err = f"{time.time():.3f} HTTP {r.status}"
    except OSError as exc:
        err = f"{time.time():.3f} {type(exc).__name__}: {exc}"
    failed += 1
    errors.append(err)
    time.sleep(0.05)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:10]}))
"""


def short_lived(directory: Path) -> Path:
    for mesh in ("east", "west"):
        path = directory / f"{mesh}.yaml"
        text = path.read_text()
        line = f"trustDomain: {mesh}.test\n"
        assert line in text
        path.write_text(text.replace(line, f"{line}certTTL: {CERT_TTL}\n"))
    return directory


@pytest.fixture(scope="module")
def meshes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meshes]:
    directory = short_lived(copy_example(tmp_path_factory.mktemp("mcrot")))
    with running_meshes(directory) as m:
        yield m


def _ledger_serials(meshes: Meshes, mesh: str) -> dict[str, set[str]]:
    """Every certificate serial ``mesh``'s CA recorded, by SPIFFE ID (its ledger, read-only)."""
    db = meshes.directory / "ca" / mesh / "ledger.db"
    assert db.exists(), sorted(p.name for p in db.parent.iterdir())
    out: dict[str, set[str]] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for spiffe_id, serial in conn.execute("SELECT spiffe_id, serial FROM certificates"):
            out.setdefault(spiffe_id, set()).add(serial_text(serial) or "")
    return out


def start_load(
    meshes: Meshes, host: str, port: int, seconds: float = LOAD_SECONDS
) -> subprocess.Popen[bytes]:
    """:data:`LOAD` on ``host`` through its sidecar port ``port`` for ``seconds``."""
    return meshes.net[host].popen(
        [sys.executable, "-c", LOAD, str(port), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def load_result(proc: subprocess.Popen[bytes], seconds: float = LOAD_SECONDS) -> dict[str, object]:
    """What a :func:`start_load` counted: ok, failed, the first errors."""
    out, err = proc.communicate(timeout=seconds + 120)
    assert proc.returncode == 0, err.decode(errors="replace")
    result: dict[str, object] = json.loads(out)
    return result


def test_both_meshes_rotate_under_load_in_both_directions_and_no_request_fails(
    meshes: Meshes,
) -> None:
    # Both paths work before the load starts (the first handshakes, the policies).
    body = meshes.call_until(WEB_APP, 200)
    assert f"(api saw {EAST_WEB})" in body, body
    body = meshes.call_until(REPORTS_APP, 200, host="west", upstream="web")
    assert f"(web saw {WEST_REPORTS})" in body, body

    workloads = {("east", "web"), ("east", "other"), ("west", "api"), ("west", "reports")}
    status_before = {w: meshes.service(*w) for w in workloads}
    ledger_before = {mesh: _ledger_serials(meshes, mesh) for mesh in ("east", "west")}

    loads = {
        "east -> west": start_load(meshes, "east", EAST_TO_API),
        "west -> east": start_load(meshes, "west", WEST_TO_WEB),
    }
    results = {name: load_result(proc) for name, proc in loads.items()}

    status_after = {w: meshes.service(*w) for w in workloads}
    ledger_after = {mesh: _ledger_serials(meshes, mesh) for mesh in ("east", "west")}
    logs = f"{meshes.logs('east')}\n{meshes.logs('west')}"
    for name, result in results.items():
        assert result["failed"] == 0, (name, result, logs)
        assert isinstance(result["ok"], int) and result["ok"] > 200, (name, result)

    # Every workload on both sides of both calls rotated several times under the load: new
    # serials in its CA's ledger, and in what its agent serves (`meshtrust status`).
    for mesh, identity in (
        ("east", EAST_WEB),
        ("east", EAST_OTHER),
        ("west", WEST_API),
        ("west", WEST_REPORTS),
    ):
        known = ledger_before[mesh].get(identity, set())
        new = ledger_after[mesh].get(identity, set()) - known
        assert len(new) >= 3, (identity, len(known), sorted(new))
    for workload in workloads:
        before, after = status_before[workload], status_after[workload]
        assert after["serial"] != before["serial"], (workload, before, after)
        assert int(after["rotations"] or 0) - int(before["rotations"] or 0) >= 3, (
            workload,
            before["rotations"],
            after["rotations"],
        )
        # What the agent serves now is one of those its CA recorded for it.
        assert after["serial"] in ledger_after[workload[0]][_identity(workload)], workload

    # And the calls still carry the right identities after all those rotations.
    body = meshes.call_until(WEB_APP, 200)
    assert f"(api saw {EAST_WEB})" in body, body
    body = meshes.call_until(REPORTS_APP, 200, host="west", upstream="web")
    assert f"(web saw {WEST_REPORTS})" in body, body


def _identity(workload: tuple[str, str]) -> str:
    mesh, name = workload
    return f"spiffe://{mesh}.test/ns/default/sa/{name}"
