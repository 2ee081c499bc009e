"""Two real meshes under one shared root, each on its own host (network namespaces,
:mod:`tests.netns`): examples/multi-cluster as written. East (``east.test``, host
198.18.0.1) and west (``west.test``, 198.18.0.2) each run their own ``meshtrust up``, CA
included, their CAs intermediates of one offline root (``meshtrust ca root init``, ``ca init
--root``). East's web calls west's api through the ServiceEntry of the seed's
multi-cluster-mtls.yaml (an upstream naming ``api.external.com:443``); west's
AuthorizationPolicy lets east's web in and refuses east's other, whose certificate is just
as good (same root). The other way, west's reports calls east's web through the ServiceEntry
of west-policies.yaml (``web.east.internal:16080``); east has no AuthorizationPolicy (STRICT
mTLS only).

Every probe runs inside a host (``ip netns exec``): each host's loopback is its own.

The calls cross trust domains: east's sidecar sends SNI ``east.test.peer.meshtrust`` and
validates west's api with ``ROOTCA:west.test`` (the shared root, no CRL of east's), and
west's sidecar takes east's callers on its peer chain (envoy/trust_domains.py). With one
``ROOTCA`` holding the mesh's own CRL (before), Envoy refused the other mesh's leaves
("unable to get certificate CRL": it wants a CRL from the leaf's issuer).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Network, network
from tests.processes import MESHTRUST
from tests.test_multihost import GET, run_py, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.netns]

REPO = Path(__file__).resolve().parent.parent
EAST_WEB = "spiffe://east.test/ns/default/sa/web"
WEST_REPORTS = "spiffe://west.test/ns/default/sa/reports"
WEB_APP, OTHER_APP = 18080, 18081  # east's apps (examples/multi-cluster/east.yaml)
REPORTS_APP = 18081  # west's reports (examples/multi-cluster/west.yaml)


@dataclass
class Meshes:
    net: Network
    directory: Path  # the copy of examples/multi-cluster

    def cli(self, host: str, *args: str, timeout: float = 180) -> tuple[int, str]:
        done = self.net[host].run(
            [*MESHTRUST, *args],
            timeout=timeout,
            cwd=self.directory,
            env={**os.environ, "MESHTRUST_HOME": str(self.directory / f"home-{host}")},
        )
        return done.returncode, (done.stdout + done.stderr).decode(errors="replace")

    def call(self, host: str, port: int, path: str) -> tuple[int | None, str]:
        """GET ``path`` from the app on ``host``'s loopback ``port``: (status, body)."""
        answer = json.loads(run_py(self.net[host], GET, "127.0.0.1", str(port), path))
        return answer["status"], answer["body"]

    def call_until(self, port: int, status: int, host: str = "east", upstream: str = "api") -> str:
        """The body of ``host``'s app at ``port`` calling ``upstream``, once it answers
        ``status``."""
        last: list[tuple[int | None, str]] = []

        def answered() -> bool:
            last[:] = [self.call(host, port, f"/call/{upstream}")]
            return last[0][0] == status

        try:
            wait_for(f"{status} from {upstream} through {host}'s {port}", answered, timeout=60)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: {last}\n{self.logs('east')}\n{self.logs('west')}"
            ) from None
        return last[0][1]

    def service(self, mesh: str, name: str) -> dict[str, Any]:
        """``name``'s entry in ``meshtrust status --json`` of ``mesh`` (serial, rotations...)."""
        code, out = self.cli(mesh, "status", f"{mesh}.yaml", "--host", mesh, "--json")
        assert code == 0, out
        (svc,) = [
            s for s in json.loads(out[: out.rindex("}") + 1])["services"] if s["name"] == name
        ]
        found: dict[str, Any] = svc
        return found

    def stats(self, mesh: str, service: str) -> str:
        """The non-zero TLS and RBAC stats of ``service``'s Envoy (its admin Unix socket is a
        file-system path, which the namespaces share)."""
        sock = self.directory / ".meshtrust" / mesh / mesh / service / "envoy" / "admin.sock"
        done = subprocess.run(
            ["curl", "-s", "--unix-socket", str(sock), "http://admin/stats?filter=ssl|rbac"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        lines = [line for line in done.stdout.splitlines() if not line.endswith(": 0")]
        return f"--- {mesh}/{service} Envoy stats\n" + "\n".join(lines)

    def logs(self, mesh: str) -> str:
        logs = self.directory / ".meshtrust" / mesh / mesh / "logs"
        out = []
        for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)


def copy_example(directory: Path) -> Path:
    """examples/multi-cluster beside a copy of the quickstart app (its commands name
    ../quickstart/app.py), so that workDir and ca.dir land in the test's directory."""
    mine = directory / "multi-cluster"
    shutil.copytree(REPO / "examples" / "multi-cluster", mine)
    (directory / "quickstart").mkdir()
    shutil.copy(REPO / "examples" / "quickstart" / "app.py", directory / "quickstart")
    return mine


@contextlib.contextmanager
def running_meshes(
    directory: Path, before_up: Callable[[Meshes], None] | None = None
) -> Iterator[Meshes]:
    """The example in ``directory`` (a :func:`copy_example`) up on hosts east and west: the
    offline root and one intermediate per mesh, as its README says (then ``before_up``, to
    change the CA directories), then one ``meshtrust up`` per host; both brought down at the
    end."""
    with network(["east", "west"]) as net:
        m = Meshes(net, directory)
        for args in (
            ("ca", "root", "init", "--dir", "ca/root", "--trust-domain", "mesh.test"),
            ("ca", "init", "--dir", "ca/east", "--root", "ca/root", "--trust-domain", "east.test"),
            ("ca", "init", "--dir", "ca/west", "--root", "ca/root", "--trust-domain", "west.test"),
        ):
            code, out = m.cli("east", *args)
            assert code == 0, out
        if before_up is not None:
            before_up(m)
        try:
            for mesh in ("west", "east"):
                code, out = m.cli(mesh, "up", f"{mesh}.yaml", "--host", mesh, "--detach")
                assert code == 0, f"{out}\n{m.logs(mesh)}"
            yield m
        finally:
            for mesh in ("east", "west"):
                with contextlib.suppress(Exception):
                    m.cli(mesh, "down", f"{mesh}.yaml", "--host", mesh, timeout=60)


@pytest.fixture(scope="module")
def meshes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meshes]:
    with running_meshes(copy_example(tmp_path_factory.mktemp("multicluster"))) as m:
        yield m


def test_easts_web_calls_wests_api_through_the_service_entry(meshes: Meshes) -> None:
    # east's web app -> its sidecar's port for api.external.com -> mTLS across the bridge to
    # 198.18.0.2:443 (west's api sidecar, which checks east's web against west's policy).
    body = meshes.call_until(WEB_APP, 200)
    assert f"web -> api: 200 (api saw {EAST_WEB})" in body, body


def test_wests_reports_calls_easts_web_the_other_way(meshes: Meshes) -> None:
    # west's reports app -> its sidecar's port for web.east.internal -> mTLS to 198.18.0.1:16080
    # (east's web sidecar, which takes it on its peer chain by SNI west.test.peer.meshtrust).
    body = meshes.call_until(REPORTS_APP, 200, host="west", upstream="web")
    assert f"reports -> web: 200 (web saw {WEST_REPORTS})" in body, body


def test_wests_policy_refuses_another_identity_of_east(meshes: Meshes) -> None:
    meshes.call_until(WEB_APP, 200)  # the path works: what follows is west's policy
    status, body = meshes.call("east", OTHER_APP, "/call/api")
    assert status == 403, body
    assert "other -> api: 403" in body and "RBAC: access denied" in body, body


def test_each_mesh_runs_its_own_ca_under_the_shared_root(meshes: Meshes) -> None:
    east_root = (meshes.directory / "ca" / "east" / "root-cert.pem").read_bytes()
    west_root = (meshes.directory / "ca" / "west" / "root-cert.pem").read_bytes()
    assert (
        east_root == west_root == (meshes.directory / "ca" / "root" / "root-cert.pem").read_bytes()
    )
    assert (meshes.directory / "ca" / "east" / "ca-cert.pem").read_bytes() != (
        meshes.directory / "ca" / "west" / "ca-cert.pem"
    ).read_bytes()
