"""Shared root across hosts: meshes east and west on two network namespaces
(:mod:`tests.netns`), each with its CA made by ``ca init --root`` from one offline root.

East's ``web`` calls west's ``api`` through two real Envoy sidecars (each Envoy runs inside
its host's namespace; their SDS servers are in this process, on Unix sockets, which the
namespaces share with the file system). West's AuthorizationPolicy allows east's web and
denies another east identity, whose certificate is otherwise good (same root).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.sds import SdsServer
from meshtrust.ca.cadir import CaMaterial, load_ca_dir
from meshtrust.ca.crl import build_crl
from meshtrust.ca.revocation import RevocationState
from meshtrust.ca.shared_root import init_ca_dir_under_root, init_root_dir
from meshtrust.clock import SystemClock
from meshtrust.envoy import EnvoyProcess, envoy_binary
from meshtrust.envoy.sidecar import (
    PeerDomains,
    SidecarConfig,
    Upstream,
    inbound_listeners,
    sidecar_bootstrap,
    sidecar_envoy_args,
    write_lds_file,
)
from meshtrust.envoy.trust_domains import peer_sni
from meshtrust.pki import generate_key
from meshtrust.pki.profile import LeafIssuer
from meshtrust.policy import load_policy_files
from meshtrust.policy.model import InboundPolicy, MtlsMode
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.badcerts import Leaf
from tests.netns import Host, network
from tests.test_shared_root import WEST_POLICY
from tests.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

NOW = SystemClock().now()
EAST_WEB = SpiffeId.parse("spiffe://east.test/ns/default/sa/web")
EAST_OTHER = SpiffeId.parse("spiffe://east.test/ns/default/sa/other")
WEST_API = SpiffeId.parse("spiffe://west.test/ns/default/sa/api")
INBOUND, OUTBOUND, APP = 15006, 15101, 8080

APP_SCRIPT = """\
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path,
                           "xfcc": self.headers.get_all("x-forwarded-client-cert") or []}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", %d), H).serve_forever()
"""


def _leaf(material: CaMaterial, identity: SpiffeId) -> Leaf:
    key = generate_key()
    cert = LeafIssuer(material.signer).issue(key.public_key(), identity, NOW, dt.timedelta(hours=1))
    return Leaf(cert, key, material.intermediates)


def _crl(material: CaMaterial) -> x509.CertificateRevocationList:
    return build_crl(material.signer, RevocationState(1, {}), NOW, dt.timedelta(hours=1))


class Hosts:
    def __init__(self, workdir: Path, east: Host, west: Host, stack: contextlib.AsyncExitStack):
        self.workdir, self.east, self.west, self.stack = workdir, east, west, stack
        root = workdir / "root"
        init_root_dir(root, TrustDomain.parse("mesh.test"), NOW)
        for name, td in (("east", "east.test"), ("west", "west.test")):
            init_ca_dir_under_root(workdir / name, root, NOW, trust_domain=TrustDomain.parse(td))
        self.east_ca = load_ca_dir(workdir / "east", NOW)
        self.west_ca = load_ca_dir(workdir / "west", NOW)

    def envoy_in(self, host: Host) -> Path:
        """An "Envoy binary" that runs the real one inside ``host``'s namespace."""
        wrapper = self.workdir / f"envoy-{host.name}"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {host.netns} {envoy_binary()} "$@"\n')
        wrapper.chmod(0o755)
        return wrapper

    async def sidecar(
        self,
        host: Host,
        config: SidecarConfig,
        material: CaMaterial,
        identity: SpiffeId,
        policy: InboundPolicy,
    ) -> None:
        directory = self.workdir / config.name
        (directory / "lds").mkdir(parents=True)
        leaf = _leaf(material, identity)
        cache = SecretCache()
        # Each mesh's own CRL, as its CA publishes one; the other mesh's callers go to the
        # shared-root chain (ROOTCA~shared-root) by the SNI its sidecars send.
        await cache.publish(
            WorkloadSecret(
                identity, leaf.key, tuple(leaf.chain), material.roots, NOW, crl=_crl(material)
            )
        )
        peers = PeerDomains(identity.trust_domain)
        sds = SdsServer(cache, directory / "sds.sock")
        await sds.start()
        self.stack.push_async_callback(sds.stop)
        lds_path = directory / "lds" / "listeners.json"
        write_lds_file(lds_path, inbound_listeners(config, policy, peers=peers), "1")
        bootstrap = sidecar_bootstrap(
            config,
            sds_socket=sds.socket_path,
            lds_path=lds_path,
            node_id=f"sidecar~{host.address}~{config.name}.{config.namespace}~local",
            admin_socket=directory / "admin.sock",
            peers=peers,
        )
        envoy = EnvoyProcess(
            bootstrap,
            directory,
            name=config.name,
            binary=self.envoy_in(host),
            extra_args=sidecar_envoy_args(),
        )
        envoy.start()
        self.stack.callback(envoy.stop)
        await asyncio.to_thread(envoy.wait_ready, 60)

    def curl(self, host: Host, *args: str) -> tuple[int, str]:
        done = host.run(
            ["curl", "-s", "-o", "-", "-w", "\\n%{http_code}", "--max-time", "10", *args]
        )
        out = done.stdout.decode()
        body, _, code = out.rpartition("\n")
        return int(code or 0), body


@pytest_asyncio.fixture
async def hosts() -> AsyncIterator[Hosts]:
    if shutil.which("curl") is None:
        pytest.fail("curl is needed (scripts/system-packages installs it)", pytrace=False)
    workdir = Path(tempfile.mkdtemp(prefix="shrootns-"))
    try:
        with network(["east", "west"]) as net:
            async with contextlib.AsyncExitStack() as stack:
                yield Hosts(workdir, net["east"], net["west"], stack)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.asyncio
async def test_east_web_calls_west_api_across_hosts_and_west_policy_decides(hosts: Hosts) -> None:
    east, west = hosts.east, hosts.west
    app = hosts.workdir / "app.py"
    app.write_text(APP_SCRIPT % APP)
    west.popen([sys.executable, str(app)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    (hosts.workdir / "west-policy.yaml").write_text(WEST_POLICY)
    api = SidecarConfig(
        name="api", app_port=APP, inbound_port=INBOUND, inbound_address=west.address
    )
    policy = load_policy_files([hosts.workdir / "west-policy.yaml"]).inbound_for(
        api.workload(WEST_API), trust_domain="west.test"
    )
    await hosts.sidecar(west, api, hosts.west_ca, WEST_API, policy)
    web = SidecarConfig(
        name="web",
        app_port=APP,
        inbound_port=INBOUND,
        inbound_address=east.address,
        upstreams=(Upstream("api", OUTBOUND, f"{west.address}:{INBOUND}", WEST_API),),
    )
    await hosts.sidecar(east, web, hosts.east_ca, EAST_WEB, InboundPolicy(MtlsMode.STRICT))

    until(
        lambda: hosts.curl(west, f"http://127.0.0.1:{APP}/")[0] == 200,
        timeout=30,
        what="west's app",
    )
    # east's web (its own loopback) -> east's sidecar -> mTLS across the bridge -> west.
    code, body = hosts.curl(east, f"http://127.0.0.1:{OUTBOUND}/from-east")
    assert code == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/from-east" and f"URI={EAST_WEB}" in seen["xfcc"][0]

    # Another east identity, straight to west's inbound port from east: a good certificate
    # under the shared root, refused by west's policy.
    other = _leaf(hosts.east_ca, EAST_OTHER)
    (hosts.workdir / "other.pem").write_bytes(other.chain_pem)
    (hosts.workdir / "other-key.pem").write_bytes(other.key_pem)
    cert, key = str(hosts.workdir / "other.pem"), str(hosts.workdir / "other-key.pem")
    sni = peer_sni(EAST_OTHER.trust_domain)  # what east's sidecars send to another domain
    code, _ = hosts.curl(
        east, "-k", "--cert", cert, "--key", key,
        "--connect-to", f"{sni}:{INBOUND}:{west.address}:{INBOUND}", f"https://{sni}:{INBOUND}/",
    )  # fmt: skip
    assert code == 403
