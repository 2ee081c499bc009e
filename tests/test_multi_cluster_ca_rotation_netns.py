"""An intermediate rotation of one shared-root mesh's CA while both meshes call each other.

examples/multi-cluster with 10 s workload certificates (as
tests/test_multi_cluster_rotation_netns.py), and east's CA made able to rotate: its
intermediate lasts 90 s (prepared at 45 s, active at 75 s, as tests/test_ca_slots_mesh.py)
and its directory holds the shared root's key, which ``ca serve`` signs successors with.
(``ca init --root`` never copies the root key into a mesh's directory, so a shared-root CA
does not rotate on its own: docs/federation.md "Not yet". This test is what would happen if
it did: the data plane across the meshes is what it checks.)

A load runs each way, a new mTLS handshake per request, from before the successor is
prepared until after the old intermediate has expired. East's workloads move to leaves of
the new intermediate (a fresh key), which west's sidecars accept on their peer chain (the
shared root, no CRL of east's: envoy/trust_domains.py) and east's on their mesh chain (the
CA publishes a CRL per live slot, tests/test_ca_slots_mesh.py). No request fails.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from cryptography import x509

from meshtrust.ca import SqlLedger
from meshtrust.ca.shared_root import load_root_dir
from meshtrust.ca.signing import SlotLedger
from meshtrust.clock import SystemClock
from meshtrust.fileio import PUBLIC_FILE_MODE, write_file_atomic, write_private_file
from meshtrust.pki import certs_pem, generate_key, make_intermediate, private_key_pem
from tests.test_multi_cluster_netns import Meshes, copy_example, running_meshes
from tests.test_multi_cluster_rotation_netns import (
    EAST_TO_API,
    WEST_TO_WEB,
    load_result,
    short_lived,
    start_load,
)
from tests.test_multihost import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.netns]

INTERMEDIATE_TTL = dt.timedelta(seconds=90)


def _rotating_east_ca(meshes: Meshes) -> None:
    """East's CA directory with a 90 s intermediate under the shared root, and the root's
    key beside it (what lets ``ca serve`` prepare and activate successors)."""
    ca, root_dir = meshes.directory / "ca" / "east", meshes.directory / "ca" / "root"
    root = load_root_dir(root_dir, SystemClock().now())
    key = generate_key()
    cert = make_intermediate(
        key, root, "east.test", SystemClock().now(), INTERMEDIATE_TTL, locality="east"
    )
    write_private_file(ca / "ca-key.pem", private_key_pem(key))
    write_file_atomic(ca / "ca-cert.pem", certs_pem([cert]), PUBLIC_FILE_MODE)
    write_file_atomic(ca / "cert-chain.pem", certs_pem([cert, root.cert]), PUBLIC_FILE_MODE)
    shutil.copy(root_dir / "root-key.pem", ca / "root-key.pem")
    (ca / "root-key.pem").chmod(0o600)


@pytest.fixture(scope="module")
def meshes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meshes]:
    directory = short_lived(copy_example(tmp_path_factory.mktemp("mcca")))
    with running_meshes(directory, before_up=_rotating_east_ca) as m:
        yield m


def _served_chain(meshes: Meshes, mesh: str, service: str) -> list[x509.Certificate]:
    """The chain ``service``'s Envoy presents (SDS ``default``), from its config dump."""
    sock = meshes.directory / ".meshtrust" / mesh / mesh / service / "envoy" / "admin.sock"
    done = subprocess.run(
        ["curl", "-s", "--unix-socket", str(sock),
         "http://admin/config_dump?resource=dynamic_active_secrets"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    for secret in json.loads(done.stdout)["configs"]:
        if secret.get("name") == "default":
            chain = secret["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"]
            return x509.load_pem_x509_certificates(base64.b64decode(chain))
    return []


def test_an_intermediate_rotation_of_easts_ca_under_load_fails_no_request(
    meshes: Meshes,
) -> None:
    meshes.call_until(18080, 200)  # east's web -> west's api
    meshes.call_until(18081, 200, host="west", upstream="web")  # west's reports -> east's web
    sql = SqlLedger(f"sqlite:///{meshes.directory / 'ca' / 'east' / 'ledger.db'}")
    try:
        slots = SlotLedger(sql.engine)
        first = slots.slots().active
        assert first is not None and first.generation == 1
        # Load from now until a little past the old intermediate's NotAfter: the successor is
        # prepared, activated, and the old one expires while the calls go on.
        seconds = (first.not_after - SystemClock().now()).total_seconds() + 15
        loads = {
            "east -> west": start_load(meshes, "east", EAST_TO_API, seconds),
            "west -> east": start_load(meshes, "west", WEST_TO_WEB, seconds),
        }
        try:
            wait_for(
                "east's CA activated generation 2",
                lambda: (act := slots.slots().active) is not None and act.generation >= 2,
                timeout=seconds + 30,
            )
            new = slots.slots().active
            assert new is not None and new.cert.public_key() != first.cert.public_key()
            for service in ("web", "other"):
                wait_for(
                    f"east's {service} presents a chain through generation 2",
                    lambda s=service: new.cert in _served_chain(meshes, "east", s),
                    timeout=45,
                )
        finally:
            results = {name: load_result(proc, seconds) for name, proc in loads.items()}
    finally:
        with contextlib.suppress(Exception):
            sql.close()
    assert SystemClock().now() > first.not_after  # the load outlived the old intermediate
    logs = f"{meshes.logs('east')}\n{meshes.logs('west')}"
    for name, result in results.items():
        assert result["failed"] == 0, (name, result, logs)
        assert isinstance(result["ok"], int) and result["ok"] > 200, (name, result)
    # The calls still carry the right identities, through the new chain.
    body = meshes.call_until(18080, 200)
    assert "(api saw spiffe://east.test/ns/default/sa/web)" in body, body
    body = meshes.call_until(18081, 200, host="west", upstream="web")
    assert "(web saw spiffe://west.test/ns/default/sa/reports)" in body, body
