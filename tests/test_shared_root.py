"""Shared root (Istio's multi-primary ``cacerts``): ``ca root init`` + ``ca init --root``.

Two meshes, east and west, each with its own CA directory made under one offline root.
The fast tests check the layout and the refusals; the slow one runs two real Envoy sidecars
(east's ``web`` calling west's ``api``) with certificates each CA's own signer issued, and
west's AuthorizationPolicy allowing east's web and denying another east identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import ssl
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from click.testing import CliRunner
from cryptography import x509

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.sds import SdsServer
from meshtrust.ca.cadir import CaMaterial, load_ca_dir
from meshtrust.ca.shared_root import init_ca_dir_under_root, init_root_dir
from meshtrust.cli import cli
from meshtrust.clock import SystemClock
from meshtrust.envoy import EnvoyProcess
from meshtrust.envoy.sidecar import (
    SidecarConfig,
    Upstream,
    inbound_listeners,
    sidecar_bootstrap,
    sidecar_envoy_args,
    write_lds_file,
)
from meshtrust.errors import CADirectoryError
from meshtrust.pki import generate_key, load_certs_pem
from meshtrust.pki.profile import LeafIssuer
from meshtrust.policy import load_policy_files
from meshtrust.policy.model import InboundPolicy, MtlsMode
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests.badcerts import Leaf, cert_pem, make_ca, svid_leaf
from tests.processes import free_port
from tests.test_sidecar_envoy import EchoHttpApp, HttpConnection, http_get_once, refused

NOW = SystemClock().now()  # real time: Envoy checks validity against its own clock
EAST_WEB = SpiffeId.parse("spiffe://east.test/ns/default/sa/web")
EAST_OTHER = SpiffeId.parse("spiffe://east.test/ns/default/sa/other")
WEST_API = SpiffeId.parse("spiffe://west.test/ns/default/sa/api")


def _shared(tmp_path: Path) -> tuple[Path, CaMaterial, CaMaterial]:
    root = tmp_path / "root"
    init_root_dir(root, TrustDomain.parse("mesh.test"), NOW)
    east, west = tmp_path / "east", tmp_path / "west"
    init_ca_dir_under_root(east, root, NOW, trust_domain=TrustDomain.parse("east.test"))
    init_ca_dir_under_root(west, root, NOW, trust_domain=TrustDomain.parse("west.test"))
    return root, load_ca_dir(east, NOW), load_ca_dir(west, NOW)


def test_cluster_ca_has_istios_plugged_in_layout_under_the_shared_root(tmp_path: Path) -> None:
    root, east, west = _shared(tmp_path)
    (shared,) = load_certs_pem((root / "root-cert.pem").read_bytes())
    assert stat.S_IMODE((root / "root-key.pem").stat().st_mode) == 0o600
    for name, material in (("east", east), ("west", west)):
        directory = tmp_path / name
        assert stat.S_IMODE((directory / "ca-key.pem").stat().st_mode) == 0o600
        assert not (directory / "root-key.pem").exists()  # the root key stays offline
        chain = load_certs_pem((directory / "cert-chain.pem").read_bytes())
        assert chain == [material.signer.cert, shared]  # intermediate + root
        assert material.roots == (shared,)
        assert material.layout == "istio"
        assert (directory / "token-jwks.json").exists()  # for `meshtrust token create`
        loc = material.signer.cert.subject.get_attributes_for_oid(x509.NameOID.LOCALITY_NAME)
        assert [a.value for a in loc] == [name]
    assert str(east.trust_domain_hint()) == "east.test"
    assert str(west.trust_domain_hint()) == "west.test"
    assert east.signer.cert.subject != west.signer.cert.subject


def test_trust_domain_and_key_type_default_to_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = CliRunner().invoke(
        cli, ["ca", "root", "init", "--dir", str(root), "--key-type", "ec-p384"]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        cli, ["ca", "init", "--dir", str(tmp_path / "c1"), "--root", str(root)]
    )
    assert result.exit_code == 0, result.output
    assert "trust domain cluster.local" in result.output
    # The CLI signs at the real time; NOW was read at collection, maybe minutes ago.
    material = load_ca_dir(tmp_path / "c1", SystemClock().now())
    assert str(material.trust_domain_hint()) == "cluster.local"
    assert material.signer.cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]


def test_refusals_name_the_problem_and_write_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    init_root_dir(root, TrustDomain.parse("mesh.test"), NOW)
    with pytest.raises(CADirectoryError, match="already holds a root"):
        init_root_dir(root, TrustDomain.parse("mesh.test"), NOW)
    with pytest.raises(CADirectoryError, match="ca root init"):
        init_ca_dir_under_root(tmp_path / "c", tmp_path / "nowhere", NOW)
    assert not (tmp_path / "c").exists()

    other = tmp_path / "other"
    init_root_dir(other, TrustDomain.parse("mesh.test"), NOW)
    (root / "root-key.pem").write_bytes((other / "root-key.pem").read_bytes())
    with pytest.raises(CADirectoryError, match="does not match"):
        init_ca_dir_under_root(tmp_path / "c", root, NOW)
    assert not (tmp_path / "c").exists()

    init_ca_dir_under_root(tmp_path / "c", other, NOW)
    with pytest.raises(CADirectoryError, match="already holds a CA"):
        init_ca_dir_under_root(tmp_path / "c", other, NOW)
    init_ca_dir_under_root(tmp_path / "c", other, NOW, force=True)


def test_cli_refusals_are_one_line_without_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["ca", "init", "--dir", str(tmp_path / "c")])
    assert result.exit_code != 0
    assert "--trust-domain is required" in result.output
    result = runner.invoke(
        cli, ["ca", "init", "--dir", str(tmp_path / "c"), "--root", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "root-cert.pem does not exist" in result.output
    assert "Traceback" not in result.output
    help_text = runner.invoke(cli, ["ca", "root", "init", "--help"]).output
    assert "ca init --dir east-ca --root ROOT" in help_text


# --- two meshes, real Envoys ----------------------------------------------------------------


def _leaf(material: CaMaterial, identity: SpiffeId) -> Leaf:
    """An SVID from ``material``'s signer, with the same profile ``ca serve`` issues."""
    key = generate_key()
    cert = LeafIssuer(material.signer).issue(key.public_key(), identity, NOW, dt.timedelta(hours=1))
    return Leaf(cert, key, material.intermediates)


class TwoMeshes:
    def __init__(self, workdir: Path, stack: contextlib.AsyncExitStack) -> None:
        self.workdir = workdir
        self.stack = stack
        _, self.east, self.west = _shared(workdir)

    def tls(self, leaf: Leaf, root: x509.Certificate) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=cert_pem(root).decode())
        context.check_hostname = False
        directory = Path(tempfile.mkdtemp(dir=self.workdir))
        (directory / "chain.pem").write_bytes(leaf.chain_pem)
        (directory / "key.pem").write_bytes(leaf.key_pem)
        context.load_cert_chain(directory / "chain.pem", directory / "key.pem")
        return context

    async def sidecar(
        self, config: SidecarConfig, material: CaMaterial, identity: SpiffeId, policy: InboundPolicy
    ) -> None:
        directory = self.workdir / config.name
        (directory / "lds").mkdir(parents=True)
        leaf = _leaf(material, identity)
        cache = SecretCache()
        await cache.publish(
            WorkloadSecret(identity, leaf.key, tuple(leaf.chain), material.roots, NOW)
        )
        sds = SdsServer(cache, directory / "sds.sock")
        await sds.start()
        self.stack.push_async_callback(sds.stop)
        lds_path = directory / "lds" / "listeners.json"
        write_lds_file(lds_path, inbound_listeners(config, policy), "1")
        bootstrap = sidecar_bootstrap(
            config,
            sds_socket=sds.socket_path,
            lds_path=lds_path,
            node_id=f"sidecar~127.0.0.1~{config.name}.{config.namespace}~local",
            admin_socket=directory / "admin.sock",
        )
        envoy = EnvoyProcess(
            bootstrap, directory, name=config.name, extra_args=sidecar_envoy_args()
        )
        envoy.start()
        self.stack.callback(envoy.stop)
        await asyncio.to_thread(envoy.wait_ready, 60)


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="shroot-"))  # short: Unix socket paths
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest_asyncio.fixture
async def meshes(workdir: Path) -> AsyncIterator[TwoMeshes]:
    async with contextlib.AsyncExitStack() as stack:
        yield TwoMeshes(workdir, stack)


WEST_POLICY = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-from-east-web, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["east.test/ns/default/sa/web"]}}]
"""


@pytest.mark.slow
@pytest.mark.asyncio
async def test_east_web_calls_west_api_through_sidecars_under_one_root(meshes: TwoMeshes) -> None:
    app = EchoHttpApp()
    app_port = await app.start()
    meshes.stack.push_async_callback(app.stop)
    api = SidecarConfig(name="api", app_port=app_port, inbound_port=free_port())
    (meshes.workdir / "west-policy.yaml").write_text(WEST_POLICY)
    policies = load_policy_files([meshes.workdir / "west-policy.yaml"])
    policy = policies.inbound_for(api.workload(WEST_API), trust_domain="west.test")
    assert policy.mode is MtlsMode.STRICT
    await meshes.sidecar(api, meshes.west, WEST_API, policy)

    inbound = f"127.0.0.1:{api.inbound_port}"
    web = SidecarConfig(
        name="web",
        app_port=free_port(),
        inbound_port=free_port(),
        upstreams=(Upstream("api", free_port(), inbound, WEST_API),),
    )
    await meshes.sidecar(web, meshes.east, EAST_WEB, InboundPolicy(MtlsMode.STRICT))

    # east's web -> its sidecar -> mTLS (east's chain, checked against the shared root) -> west.
    conn = await HttpConnection.open(web.upstreams[0].local_port)
    try:
        response = await conn.get("/from-east")
    finally:
        await conn.close()
    assert response.status == 200
    assert f"URI={EAST_WEB}" in response.json()["xfcc"][0]

    # Another east identity: its certificate is good (same root), the policy says no.
    shared_root = meshes.west.roots[0]
    other = await http_get_once(
        api.inbound_port, meshes.tls(_leaf(meshes.east, EAST_OTHER), shared_root)
    )
    assert other.status == 403
    # east's web with a certificate from an unrelated root: refused in the handshake.
    stranger = make_ca("east.test", now=NOW)
    foreign = svid_leaf(stranger.signer, EAST_WEB, now=NOW)
    assert await refused(lambda: http_get_once(api.inbound_port, meshes.tls(foreign, shared_root)))
    assert [r["path"] for r in app.requests] == ["/from-east"]
