"""One mesh across three hosts (network namespaces on a bridge, :mod:`tests.netns`): the CA
on h1, ``web`` on h2, ``api`` and ``db`` on h3, every host started by its own ``meshtrust up
--host`` (h2 and h3 with join files made on h1), each with its own directory under workDir.

Every probe runs inside a host (``ip netns exec``): a host's loopback is its own, so the
test process itself reaches only what is on the bridge.

Timing. The certificates are short (30 s; db 1 m) so rotations and outages fit in a test;
the outages are placed relative to a rotation the test has just seen, so "longer than half
a lifetime" and "still valid" hold whatever the machine's speed. Nothing asserts a speed:
waits have generous deadlines only so a broken mesh fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.mesh_helpers import APP
from tests.netns import Host, Network, network

pytestmark = [pytest.mark.slow, pytest.mark.netns]

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/default/sa/web"
API = f"spiffe://{TD}/ns/default/sa/api"
DB = f"spiffe://{TD}/ns/default/sa/db"

POLICIES = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-callers, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
    - from:
        - source:
            principals: [cluster.local/ns/default/sa/web, cluster.local/ns/default/sa/db]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-callers, namespace: default}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/api]}}]}]
"""

# Ports: the same app port on two hosts is fine (each host's loopback is its own).
WEB_TO_API, WEB_TO_DB, DB_TO_API = 19001, 19002, 19003
APP_PORT, API_INBOUND, DB_INBOUND, WEB_INBOUND = 18080, 16080, 16081, 16082

GET = """
import http.client, json, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    c = http.client.HTTPConnection(host, port, timeout=5)
    c.request("GET", path)
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": r.read().decode(errors="replace")}))
except OSError as exc:
    print(json.dumps({"status": None, "body": f"{type(exc).__name__}: {exc}"}))
"""

# Requests for `seconds` through one sidecar port, a new connection to the sidecar each
# time (the sidecar keeps its own pool of mTLS connections to the peer).
LOAD = """
import http.client, json, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
ok, failed, errors = 0, 0, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/")
        r = c.getresponse(); r.read(); c.close()
        if r.status == 200:
            ok += 1
            continue
        err = f"HTTP {r.status}"
    except OSError as exc:
        err = f"{type(exc).__name__}: {exc}"
    failed += 1
    errors.append(err)
    time.sleep(0.01)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
"""

CONNECT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
except OSError as exc:
    print(type(exc).__name__)
    sys.exit(0)
s.settimeout(3)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
try:
    print("answered" if s.recv(100) else "closed")
except OSError as exc:
    print(type(exc).__name__)
"""

SIGN = """
import asyncio, sys
from meshtrust.caapi.client import CaClient
from meshtrust.errors import MeshTrustError
from meshtrust.joinfile import load_join_file
from meshtrust.pki.csr import build_csr
from meshtrust.pki.keys import generate_key
from meshtrust.spiffe import SpiffeId

join = load_join_file(sys.argv[1])
csr = build_csr(generate_key(), SpiffeId.parse(sys.argv[2]))
client = CaClient(join.ca_addresses[0], join.bundle_pem)
try:
    asyncio.run(client.sign(csr, token=join.token))
    print("ISSUED")
except MeshTrustError as exc:
    print(type(exc).__name__, exc)
"""


@dataclass
class Mesh:
    net: Network
    path: Path
    work: Path
    homes: dict[str, Path]

    def cli(self, host: str, *args: str, timeout: float = 120) -> tuple[int, str]:
        """``meshtrust ARGS`` run on ``host``; (exit status, stdout + stderr)."""
        done = self.net[host].run(
            [sys.executable, "-m", "meshtrust", *args],
            timeout=timeout,
            env={**os.environ, "MESHTRUST_HOME": str(self.homes[host])},
        )
        return done.returncode, (done.stdout + done.stderr).decode(errors="replace")

    def status(self, host: str) -> dict[str, Any]:
        _, out = self.cli(host, "status", str(self.path), "--host", host, "--json")
        document: dict[str, Any] = json.loads(out[: out.rindex("}") + 1])
        return document

    def service(self, host: str, name: str) -> dict[str, Any]:
        (svc,) = [s for s in self.status(host)["services"] if s["name"] == name]
        found: dict[str, Any] = svc
        return found


def run_py(host: Host, script: str, *args: str, timeout: float = 60) -> str:
    done = host.run([sys.executable, "-c", script, *args], timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


def get(host: Host, port: int, path: str = "/", address: str = "127.0.0.1") -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(run_py(host, GET, address, str(port), path))
    return answer


def wait_for(what: str, check: Any, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {value!r})")
        time.sleep(0.3)


def mesh_file(directory: Path, net: Network) -> Path:
    (directory / "policies.yaml").write_text(POLICIES)
    app = ["python3", str(APP)]
    env = {"CALL_EVERY": "0"}
    mesh = {
        "trustDomain": TD,
        "certTTL": "30s",
        "workDir": str(directory / "work"),
        "hosts": [{"name": n, "address": net[n].address} for n in ("h1", "h2", "h3")],
        "ca": {"host": "h1"},
        "meshMTLS": {"minProtocolVersion": "TLSV1_3"},
        "services": [
            {
                "name": "web",
                "host": "h2",
                "port": APP_PORT,
                "inboundPort": WEB_INBOUND,
                "rotationRatio": 0.7,
                "command": app,
                "env": env,
                "upstreams": [
                    {"service": "api", "localPort": WEB_TO_API},
                    {"service": "db", "localPort": WEB_TO_DB},
                ],
            },
            {
                "name": "api",
                "host": "h3",
                "port": APP_PORT,
                "inboundPort": API_INBOUND,
                "command": app,
                "env": env,
            },
            {
                "name": "db",
                "host": "h3",
                "port": APP_PORT + 1,
                "inboundPort": DB_INBOUND,
                "certTTL": "1m",
                "command": app,
                "env": env,
                "upstreams": [{"service": "api", "localPort": DB_TO_API}],
            },
        ],
        "policies": ["policies.yaml"],
    }
    path = directory / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("multihost")
    with network(["h1", "h2", "h3"]) as net:
        m = Mesh(
            net=net,
            path=mesh_file(directory, net),
            work=directory / "work",
            homes={h: directory / f"home-{h}" for h in ("h1", "h2", "h3")},
        )
        try:
            code, out = m.cli("h1", "up", str(m.path), "--host", "h1", "--detach")
            assert code == 0, out
            for host in ("h2", "h3"):
                join = directory / f"{host}.join"
                code, out = m.cli("h1", "join", "create", str(m.path), "--host", host,
                                  "-o", str(join))  # fmt: skip
                assert code == 0, out
                assert oct(join.stat().st_mode & 0o777) == "0o600"
            for host in ("h2", "h3"):
                code, out = m.cli(host, "up", str(m.path), "--host", host, "--join",
                                  str(directory / f"{host}.join"), "--detach")  # fmt: skip
                assert code == 0, out
            yield m
        finally:
            for host in ("h3", "h2", "h1"):
                with contextlib.suppress(Exception):
                    m.cli(host, "down", str(m.path), "--host", host, timeout=60)


def test_each_host_runs_its_share_in_its_own_directory(mesh: Mesh) -> None:
    assert sorted(p.name for p in mesh.work.iterdir()) == ["h1", "h2", "h3"]
    assert (mesh.work / "h1" / "ca" / "root-cert.pem").is_file()
    assert not (mesh.work / "h2" / "ca").exists() and not (mesh.work / "h3" / "ca").exists()
    assert sorted(p.name for p in (mesh.work / "h3").iterdir() if (p / "agent.yaml").exists()) == [
        "api",
        "db",
    ]
    h1 = mesh.status("h1")
    assert h1["host"] == "h1" and h1["services"] == [] and h1["ca"]["state"] == "running"
    # The CA's host sees every identity of the mesh and its latest certificate.
    assert {i["spiffe_id"]: (i["host"], i["renewing"]) for i in h1["identities"]} == {
        WEB: ("h2", True),
        API: ("h3", True),
        DB: ("h3", True),
    }
    h3 = mesh.status("h3")
    assert h3["state"] == "running" and h3["ca"]["state"] == "reachable"
    assert [s["name"] for s in h3["services"]] == ["api", "db"]
    code, out = mesh.cli("h2", "proxy-config", "secret", "web", "--mesh", str(mesh.path),
                         "--host", "h2")  # fmt: skip
    assert code == 0 and "ACTIVE" in out, out
    code, out = mesh.cli("h3", "check", "api", "--mesh", str(mesh.path), "--host", "h3")
    assert code == 0, out
    code, out = mesh.cli("h2", "certs", "monitor", "--mesh", str(mesh.path), "--host", "h2",
                         "--warn-within", "5s")  # fmt: skip
    assert code == 0 and "web" in out, out


def test_cross_host_calls_are_mtls_with_policy_and_the_callers_identity(mesh: Mesh) -> None:
    h2 = mesh.net["h2"]
    allowed = get(h2, WEB_TO_API)
    assert allowed["status"] == 200, allowed
    # The callee (api on h3) saw web's identity in x-forwarded-client-cert.
    assert json.loads(allowed["body"]) == {"service": "api", "caller": WEB}
    denied = get(h2, WEB_TO_DB)
    assert denied["status"] == 403 and "RBAC" in denied["body"], denied
    # db may call api (same host, through both sidecars on h3's address).
    from_db = get(mesh.net["h3"], DB_TO_API)
    assert from_db["status"] == 200 and json.loads(from_db["body"])["caller"] == DB


def test_from_another_host_only_the_sidecar_port_is_reachable(mesh: Mesh) -> None:
    h2, h3 = mesh.net["h2"], mesh.net["h3"]
    web = mesh.service("h2", "web")
    # On h2 itself the app answers on loopback...
    assert get(h2, APP_PORT)["status"] == 200
    # ...but from h3, neither the app port nor the agent's status port exist on h2's address,
    # and Envoy's admin API is a Unix socket, on no port at all.
    state = json.loads((mesh.work / "h2" / "state.json").read_text())
    agent_port = int(state["services"][0]["status"].rsplit(":", 1)[1])
    for port in (APP_PORT, agent_port, WEB_TO_API):
        assert run_py(h3, CONNECT, h2.address, str(port)) == "ConnectionRefusedError", port
    assert web["envoy"]["admin"].startswith("unix://")
    # The sidecar port is there, and refuses plain text (STRICT): closed without an answer.
    assert run_py(h3, CONNECT, h2.address, str(WEB_INBOUND)) in ("closed", "ConnectionResetError")


def test_min_protocol_tls13_refuses_a_tls12_client(mesh: Mesh) -> None:
    h3, h2 = mesh.net["h3"], mesh.net["h2"]
    target = f"{h2.address}:{WEB_INBOUND}"
    old = h3.run(["openssl", "s_client", "-connect", target, "-tls1_2"], input=b"", timeout=30)
    assert old.returncode != 0
    assert b"protocol version" in old.stdout + old.stderr, old.stderr
    # The control: a TLS 1.3 client gets as far as the handshake (then lacks a certificate).
    new = h3.run(["openssl", "s_client", "-connect", target, "-tls1_3"], input=b"", timeout=30)
    assert b"TLSv1.3" in new.stdout, new.stdout


def _seconds(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_per_service_cert_ttl_and_rotation_ratio_reach_certificates(mesh: Mesh) -> None:
    # NotBefore is backdated 2 minutes; the agent renews when `rotationRatio` of the
    # lifetime is left (Istio's grace period ratio).
    for host, name, ttl, ratio in (("h2", "web", 30, 0.7), ("h3", "db", 60, 0.5),
                                   ("h3", "api", 30, 0.5)):  # fmt: skip
        svc = mesh.service(host, name)
        issued = _seconds(svc["not_before"]) + 120
        assert _seconds(svc["not_after"]) - issued == ttl, svc
        left = (_seconds(svc["not_after"]) - _seconds(svc["next_rotation"])) / ttl
        assert abs(left - ratio) < 0.07, (name, left)


def _rotations(mesh: Mesh, host: str, name: str) -> int:
    return int(mesh.service(host, name)["rotations"] or 0)


def test_rotation_under_cross_host_load_fails_no_request(mesh: Mesh) -> None:
    before = {n: _rotations(mesh, h, n) for h, n in (("h2", "web"), ("h3", "api"))}
    result = json.loads(run_py(mesh.net["h2"], LOAD, str(WEB_TO_API), "40", timeout=120))
    after = {n: _rotations(mesh, h, n) for h, n in (("h2", "web"), ("h3", "api"))}
    assert result["failed"] == 0, result
    assert result["ok"] > 100
    # Several rotations on both sides of the calls happened under the load.
    assert after["web"] - before["web"] >= 3 and after["api"] - before["api"] >= 2, (before, after)


def _wait_for_rotation(mesh: Mesh, host: str, name: str) -> dict[str, Any]:
    """The service's status just after its next rotation (a fresh certificate)."""
    serial = mesh.service(host, name)["serial"]
    return dict(
        wait_for(
            f"a rotation of {name}",
            lambda: (s := mesh.service(host, name))["serial"] != serial and s,
            timeout=60,
        )
    )


def test_a_host_cut_off_longer_than_half_a_lifetime_keeps_serving_and_renews(
    mesh: Mesh,
) -> None:
    h3 = mesh.net["h3"]
    fresh = _wait_for_rotation(mesh, "h3", "api")
    h3.run(["ip", "link", "set", "eth0", "down"])
    try:
        # Past api's rotation point (half its 30 s lifetime) with no CA: it keeps its
        # certificate and h3's sidecars keep serving with it.
        time.sleep(17)
        during = mesh.service("h3", "api")
        assert during["serial"] == fresh["serial"] and during["expires_in_seconds"] > 0, during
        assert during["last_error"], during  # it tried to renew and could not
        assert get(h3, DB_TO_API)["status"] == 200
        assert mesh.status("h3")["ca"]["state"] == "unreachable"
    finally:
        h3.run(["ip", "link", "set", "eth0", "up"])
    wait_for(
        "web -> api across hosts again",
        lambda: get(mesh.net["h2"], WEB_TO_API)["status"] == 200,
        30,
    )
    renewed = wait_for(
        "api renewed after the link came back",
        lambda: (s := mesh.service("h3", "api"))["serial"] != fresh["serial"] and s,
        timeout=30,
    )
    assert renewed["expires_in_seconds"] > 0


def test_the_ca_host_stopped_longer_than_a_rotation_period_fails_no_request(mesh: Mesh) -> None:
    h1, h2 = mesh.net["h1"], mesh.net["h2"]
    before = {n: mesh.service(h, n)["serial"] for h, n in (("h2", "web"), ("h3", "api"))}
    stopped = h1.pids()
    assert stopped
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        # 12 s: longer than web's rotation period (30 s - 0.7 x 30 s = 9 s), shorter than
        # what is left of any certificate at its rotation point (>= 15 s).
        result = json.loads(run_py(h2, LOAD, str(WEB_TO_API), "12", timeout=60))
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert result["failed"] == 0 and result["ok"] > 0, result
    # Renewals resume: both get new certificates, and the calls still go through.
    for host, name in (("h2", "web"), ("h3", "api")):
        wait_for(
            f"{name} renewed after the CA came back",
            lambda h=host, n=name: mesh.service(h, n)["serial"] != before[n],
            timeout=40,
        )
    assert get(h2, WEB_TO_API)["status"] == 200


def _ledger_requesters(mesh: Mesh) -> list[tuple[str, str]]:
    db = mesh.work / "h1" / "ca" / "ledger.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return list(conn.execute("SELECT spiffe_id, requester FROM certificates"))


def test_a_join_file_for_h2_cannot_obtain_h3s_identities_and_expired_ones_are_refused(
    mesh: Mesh, tmp_path: Path
) -> None:
    h3 = mesh.net["h3"]
    # Made first: the CA allows 30 s of clock skew past a token's expiry, waited out below.
    expired = tmp_path / "h3.join"
    code, out = mesh.cli("h1", "join", "create", str(mesh.path), "--host", "h3", "--ttl", "1s",
                         "-o", str(expired))  # fmt: skip
    assert code == 0, out
    made = time.monotonic()
    h2_join = mesh.path.parent / "h2.join"
    answer = run_py(h3, SIGN, str(h2_join), API)
    assert answer.startswith("PermissionDenied"), answer
    # Nothing was issued for h3's identities with h2's credential.
    by_h2 = {sid for sid, requester in _ledger_requesters(mesh) if "host h2" in requester}
    assert by_h2 == {WEB}
    # `up` on h3 with h2's file is refused before anything starts, saying why (a copy of the
    # mesh file with its own workDir: h3's share of the real one is running).
    other = tmp_path / "mesh.yaml"
    doc = yaml.safe_load(mesh.path.read_text())
    doc["workDir"] = str(tmp_path / "work")
    doc["policies"] = [str(mesh.path.parent / "policies.yaml")]
    other.write_text(yaml.safe_dump(doc))
    code, out = mesh.cli("h3", "up", str(other), "--host", "h3", "--join", str(h2_join))
    assert code != 0 and "is not for host h3" in out, out
    # An expired join file: refused by `up` and by the CA, each saying so.
    time.sleep(max(0.0, made + 2 - time.monotonic()))
    code, out = mesh.cli("h3", "up", str(other), "--host", "h3", "--join", str(expired))
    assert code != 0 and "expired" in out, out
    assert not (tmp_path / "work" / "h3" / "api" / "token").exists()
    time.sleep(max(0.0, made + 33 - time.monotonic()))
    answer = run_py(h3, SIGN, str(expired), API)
    assert not answer.startswith("ISSUED") and "expired" in answer, answer
