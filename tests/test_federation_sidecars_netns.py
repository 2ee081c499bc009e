"""SPIFFE federation end to end across two hosts (network namespaces, :mod:`tests.netns`):
meshes ``east.test`` and ``west.test`` with unrelated roots, each a real ``meshtrust ca
serve`` with an ``https_spiffe`` bundle endpoint polling the other's (refresh hint
:data:`HINT`), and per mesh one real ``meshtrust agent --sidecar`` running its real Envoy
inside its host. Every hop is the product's: west's ledger -> west's bundle endpoint ->
east's poller -> east's ledger -> east's trust stream -> east's agent -> SDS -> east's Envoy.

Checked: east's web calls west's api through both sidecars, allowed by west's policy naming
``east.test/ns/default/sa/web`` (another east identity is denied); a ``west.test``
certificate signed by east's CA is refused by east's sidecar (a root vouches only for its
own trust domain); a new root added to west's bundle (``meshtrust ca bundle add-root``) is
accepted by east's sidecar; west's CA
(its bundle endpoint) down for several refresh hints changes nothing for the calls.
One pair of meshes for the module.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from meshtrust.ca import init_ca_dir, load_token_signing_key, mint_token, token_issuer_for
from meshtrust.ca.cadir import load_ca_dir
from meshtrust.clock import SystemClock
from meshtrust.envoy.trust_domains import peer_sni
from meshtrust.pki import certs_pem, generate_key, make_root, private_key_pem
from meshtrust.pki.profile import LeafIssuer, Signer
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.netns import Host, network
from tests.processes import MESHTRUST
from tests.test_shared_root import WEST_POLICY
from tests.test_shared_root_netns import APP_SCRIPT
from tests.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

EAST, WEST = TrustDomain.parse("east.test"), TrustDomain.parse("west.test")
EAST_WEB = SpiffeId.parse("spiffe://east.test/ns/default/sa/web")
WEST_API = SpiffeId.parse("spiffe://west.test/ns/default/sa/api")
EAST_OTHER = SpiffeId.parse("spiffe://east.test/ns/default/sa/other")
WEST_OTHER = SpiffeId.parse("spiffe://west.test/ns/default/sa/other")
INBOUND, OUTBOUND, APP = 15006, 15101, 8080
HINT = 2  # seconds: the bundle endpoints' refresh hint
NOW = SystemClock().now()


def _ca_settings(other: TrustDomain, other_address: str, bootstrap: Path) -> str:
    return f"""\
listen: 127.0.0.1:15012
metrics-listen: 127.0.0.1:15014
workers: 1
federation:
  bundleEndpoint:
    listen: 0.0.0.0:8443
    profile: https_spiffe
    refreshHint: {HINT}s
  federatesWith:
  - trustDomain: {other}
    bundleEndpointUrl: https://{other_address}:8443/
    profile: https_spiffe
    endpointSpiffeId: spiffe://{other}/meshtrust/bundle-endpoint
    bootstrapBundle: {bootstrap}
"""


@dataclass
class Mesh:
    td: TrustDomain
    host: Host
    directory: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def ca_dir(self) -> Path:
        return self.directory / "ca"

    def spawn(self, name: str, argv: list[str]) -> None:
        log = (self.directory / f"{name}.log").open("ab")
        self.procs[name] = self.host.popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        log.close()

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-3000:]

    def start_ca(self) -> None:
        config = str(self.directory / "ca.yaml")
        self.spawn(
            "ca", [*MESHTRUST, "ca", "serve", "--config", config, "--ca-dir", str(self.ca_dir)]
        )

    def start_agent(self, service_account: str, sidecar: str, policy: str) -> None:
        key = load_token_signing_key(self.ca_dir)
        assert key is not None
        token = mint_token(
            key, token_issuer_for(self.td), "default", service_account, NOW, dt.timedelta(hours=2)
        )
        (self.directory / "token").write_text(token)
        (self.directory / "sidecar.yaml").write_text(sidecar)
        (self.directory / "policy.yaml").write_text(policy)
        self.spawn(
            "agent",
            [
                *MESHTRUST, "agent",
                "--ca-address", "127.0.0.1:15012",
                "--ca-root", str(self.ca_dir / "root-cert.pem"),
                "--token-file", str(self.directory / "token"),
                "--sds-socket", str(self.directory / "sds.sock"),
                "--sidecar", str(self.directory / "sidecar.yaml"),
                "--policy", str(self.directory / "policy.yaml"),
                "--envoy-workdir", str(self.directory / "envoy"),
                "--status-listen", "127.0.0.1:15021",
            ],
        )  # fmt: skip

    def curl(self, *args: str) -> tuple[int, str]:
        done = self.host.run(
            ["curl", "-s", "-o", "-", "-w", "\\n%{http_code}", "--max-time", "10", *args],
            timeout=30,
        )
        body, _, code = done.stdout.decode().rpartition("\n")
        return int(code or 0), body

    def unreachable(self) -> int:
        """The CA's count of failed fetches of the other mesh's bundle (its /metrics)."""
        code = (
            "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
            "'http://127.0.0.1:15014/metrics', timeout=5).read().decode())"
        )
        done = self.host.run([sys.executable, "-c", code], timeout=30)
        for line in done.stdout.decode().splitlines() if done.returncode == 0 else ():
            if line.startswith("meshtrust_federation_bundle_fetches_total{") and (
                'result="unreachable"' in line
            ):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0


@dataclass
class Meshes:
    east: Mesh
    west: Mesh
    workdir: Path

    def call(self) -> tuple[int, str]:
        """East's app calls west's api through east's sidecar (its outbound port)."""
        return self.east.curl(f"http://127.0.0.1:{OUTBOUND}/from-east")

    def present(
        self, leaf_pem: bytes, key_pem: bytes, name: str, sni: str | None = peer_sni(WEST)
    ) -> int:
        """West's host connects straight to east's inbound port with this certificate,
        sending SNI ``sni`` (by default what west's sidecars send; None: no SNI)."""
        cert, key = self.workdir / f"{name}.pem", self.workdir / f"{name}-key.pem"
        cert.write_bytes(leaf_pem)
        key.write_bytes(key_pem)
        code, _ = self.west.curl(
            "-k", "--cert", str(cert), "--key", str(key),
            *_with_sni(self.east.host.address, sni),
        )  # fmt: skip
        return code


def _with_sni(address: str, sni: str | None) -> tuple[str, ...]:
    """curl arguments for https://<address>:INBOUND/ with SNI ``sni`` (none when None)."""
    if sni is None:
        return (f"https://{address}:{INBOUND}/",)
    return ("--connect-to", f"{sni}:{INBOUND}:{address}:{INBOUND}", f"https://{sni}:{INBOUND}/")


def _leaf(signer: Signer, chain: tuple[object, ...], identity: SpiffeId) -> tuple[bytes, bytes]:
    key = generate_key()
    cert = LeafIssuer(signer).issue(key.public_key(), identity, NOW, dt.timedelta(hours=1))
    return certs_pem([cert, *chain]), private_key_pem(key)  # type: ignore[list-item]


@pytest.fixture(scope="module")
def meshes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meshes]:
    if shutil.which("curl") is None:
        pytest.fail("curl is needed (scripts/system-packages installs it)", pytrace=False)
    workdir = tmp_path_factory.mktemp("fedsc")
    with network(["east", "west"]) as net:
        east = Mesh(EAST, net["east"], workdir / "east")
        west = Mesh(WEST, net["west"], workdir / "west")
        for mesh in (east, west):
            init_ca_dir(mesh.ca_dir, mesh.td, NOW)
        for me, other in ((east, west), (west, east)):
            bootstrap = me.directory / f"{other.td}.pem"
            bootstrap.write_bytes((other.ca_dir / "root-cert.pem").read_bytes())
            (me.directory / "ca.yaml").write_text(
                _ca_settings(other.td, other.host.address, bootstrap)
            )
        app = workdir / "app.py"
        app.write_text(APP_SCRIPT % APP)
        try:
            for mesh in (east, west):
                mesh.start_ca()
                mesh.spawn("app", [sys.executable, str(app)])
            west.start_agent(
                "api",
                f"name: api\napp_port: {APP}\ninbound_port: {INBOUND}\n"
                f"inbound_address: {west.host.address}\n",
                WEST_POLICY,
            )
            east.start_agent(
                "web",
                f"name: web\napp_port: {APP}\ninbound_port: {INBOUND}\n"
                f"inbound_address: {east.host.address}\nupstreams:\n"
                f"- name: api\n  local_port: {OUTBOUND}\n"
                f"  address: {west.host.address}:{INBOUND}\n  spiffe_id: {WEST_API}\n",
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
                "metadata: {name: strict, namespace: default}\nspec: {mtls: {mode: STRICT}}\n",
            )
            yield Meshes(east, west, workdir)
        finally:
            for mesh in (east, west):
                for name in list(mesh.procs):
                    with contextlib.suppress(Exception):
                        mesh.stop(name)


def test_east_web_calls_west_api_allowed_by_a_policy_naming_east_web(meshes: Meshes) -> None:
    until(
        lambda: meshes.call()[0] == 200,
        timeout=120,
        what=(
            f"east's web reaches west's api\neast agent: {meshes.east.log('agent')}\n"
            f"west agent: {meshes.west.log('agent')}"
        ),
    )
    code, body = meshes.call()
    assert code == 200
    assert f"URI={EAST_WEB}" in json.loads(body)["xfcc"][0]
    # Another east identity, good under east's root (federated at west), straight to west's
    # inbound port: the policy names only east's web.
    east_ca = load_ca_dir(meshes.east.ca_dir, NOW)
    cert, key = _leaf(east_ca.signer, east_ca.intermediates, EAST_OTHER)
    (meshes.workdir / "other.pem").write_bytes(cert)
    (meshes.workdir / "other-key.pem").write_bytes(key)
    code, _ = meshes.east.curl(
        "-k",
        "--cert",
        str(meshes.workdir / "other.pem"),
        "--key",
        str(meshes.workdir / "other-key.pem"),
        *_with_sni(meshes.west.host.address, peer_sni(EAST)),  # as east's sidecars send it
    )
    assert code == 403


def test_a_west_certificate_signed_by_easts_root_is_refused(meshes: Meshes) -> None:
    until(lambda: meshes.call()[0] == 200, timeout=120, what="the meshes federate")
    west_ca, east_ca = load_ca_dir(meshes.west.ca_dir, NOW), load_ca_dir(meshes.east.ca_dir, NOW)
    # West's own certificate for another workload: accepted by east's sidecar (STRICT only).
    good = _leaf(west_ca.signer, west_ca.intermediates, WEST_OTHER)
    assert meshes.present(*good, name="good") == 200
    # Without the peer SNI it lands in the chain of east's own trust domain: refused.
    assert meshes.present(*good, name="good", sni=None) == 0
    # The same identity signed by east's CA: east's root does not vouch for west.test,
    # whichever chain the caller picks.
    forged = _leaf(east_ca.signer, east_ca.intermediates, WEST_OTHER)
    for sni in (peer_sni(WEST), None, peer_sni(EAST), "other.test.peer.meshtrust"):
        assert meshes.present(*forged, name="forged", sni=sni) == 0, sni


def test_a_certificate_revoked_at_west_is_refused_by_easts_sidecar(meshes: Meshes) -> None:
    """West's CRLs travel with its bundle (the document's meshtrust_revocation member):
    west's bundle endpoint -> east's poller -> east's ledger and trust stream -> east's
    agent -> SDS ROOTCA:west.test -> east's Envoy."""
    until(lambda: meshes.call()[0] == 200, timeout=120, what="the meshes federate")
    west = meshes.west
    key = load_token_signing_key(west.ca_dir)
    assert key is not None
    token = mint_token(key, token_issuer_for(WEST), "default", "other", NOW, dt.timedelta(hours=1))
    (west.directory / "other.token").write_text(token)
    out = west.directory / "other-cert"
    done = west.host.run(
        [*MESHTRUST, "cert", "request", "--ca-address", "127.0.0.1:15012",
         "--ca-root", str(west.ca_dir / "root-cert.pem"),
         "--token-file", str(west.directory / "other.token"),
         "--spiffe-id", str(WEST_OTHER), "--out-dir", str(out)],
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    chain, key_pem = (out / "cert-chain.pem").read_bytes(), (out / "key.pem").read_bytes()
    assert meshes.present(chain, key_pem, name="issued") == 200
    serial = format(x509.load_pem_x509_certificate(chain).serial_number, "x")
    revoked = subprocess.run(
        [*MESHTRUST, "ca", "revoke", "--serial", serial, "--reason", "keyCompromise",
         "--ca-dir", str(west.ca_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    until(
        lambda: meshes.present(chain, key_pem, name="issued") == 0,
        timeout=60,
        what=f"east's sidecar refuses the revoked west certificate\n{meshes.east.log('agent')}",
    )
    print(f"revoked at west, refused by east's sidecar {time.monotonic() - started:.1f} s later")
    # Whichever chain it picks.
    for sni in (None, peer_sni(EAST), "other.test.peer.meshtrust"):
        assert meshes.present(chain, key_pem, name="issued", sni=sni) == 0, sni
    good = _leaf(*_west_signer(meshes), WEST_OTHER)  # not revoked, same issuer
    assert meshes.present(*good, name="good") == 200
    assert meshes.call()[0] == 200


def _west_signer(meshes: Meshes) -> tuple[Signer, tuple[object, ...]]:
    material = load_ca_dir(meshes.west.ca_dir, NOW)
    return material.signer, material.intermediates


def test_a_new_root_in_wests_bundle_reaches_easts_sidecar(meshes: Meshes) -> None:
    until(lambda: meshes.call()[0] == 200, timeout=120, what="the meshes federate")
    key = generate_key()
    root = make_root(key, "west.test", NOW, dt.timedelta(days=30))
    new_signer = Signer(root, key)
    leaf = _leaf(new_signer, (), WEST_OTHER)
    assert meshes.present(*leaf, name="newroot") == 0  # not yet in west's bundle
    (meshes.workdir / "new-root.pem").write_bytes(certs_pem([root]))
    added = subprocess.run(
        [*MESHTRUST, "ca", "bundle", "add-root", str(meshes.workdir / "new-root.pem"),
         "--ca-dir", str(meshes.west.ca_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    started = time.monotonic()
    until(
        lambda: meshes.present(*leaf, name="newroot") == 200,
        timeout=60,
        what=f"east's sidecar accepts west's new root\n{meshes.east.log('ca')}",
    )
    print(f"new root accepted by east's sidecar {time.monotonic() - started:.1f} s after add-root")
    assert meshes.call()[0] == 200


def test_wests_bundle_endpoint_down_changes_nothing_for_running_calls(meshes: Meshes) -> None:
    until(lambda: meshes.call()[0] == 200, timeout=120, what="the meshes federate")
    before = meshes.east.unreachable()
    meshes.west.stop("ca")  # its bundle endpoint with it
    try:
        until(
            lambda: meshes.east.unreachable() >= before + 4,
            timeout=60,
            what="four failed fetches of west's bundle at east",
        )
        for _ in range(5):
            code, body = meshes.call()
            assert code == 200, body
    finally:
        meshes.west.start_ca()
