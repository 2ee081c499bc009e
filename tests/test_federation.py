"""SPIFFE federation, the CA's side, in process: the bundle endpoint (both profiles) on a
real loopback socket with real TLS, the fetcher that authenticates it, the poller that keeps
the last good bundle in a real (SQLite) ledger, and the ``federation`` settings."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509

from meshtrust.ca.bundle_endpoint import BundleEndpoint, endpoint_spiffe_id
from meshtrust.ca.cadir import CaMaterial, init_ca_dir, load_ca_dir
from meshtrust.ca.config import load_config_file
from meshtrust.ca.federation import (
    BundleFetchError,
    FederationPoller,
    FederationStore,
    bundle_changed,
    fetch_bundle,
    load_bootstrap_bundle,
    poll_delay,
)
from meshtrust.ca.ledger import SqlLedger
from meshtrust.clock import SystemClock
from meshtrust.config.federation import (
    BundleEndpointConfig,
    EndpointProfile,
    FederatedTrustDomain,
)
from meshtrust.errors import ConfigError
from meshtrust.fileio import load_cert_chain_pem
from meshtrust.pki import certs_pem, generate_key, make_root, make_serving_cert, private_key_pem
from meshtrust.pki.profile import LeafIssuer, Signer
from meshtrust.spiffe import SpiffeId, TrustDomain
from meshtrust.spiffe.bundle import InvalidBundle, SpiffeBundle, bundle_document
from tests.badcerts import make_ca, svid_leaf
from tests.processes import free_port

NOW = SystemClock().now()
EAST = TrustDomain.parse("east.test")
WEST = TrustDomain.parse("west.test")
WEST_ENDPOINT = endpoint_spiffe_id(WEST)


# --- pure parts ----------------------------------------------------------------------------


def test_poll_delay_follows_the_refresh_hint_within_bounds() -> None:
    default = dt.timedelta(minutes=5)
    root = make_ca("west.test").root
    hinted = SpiffeBundle(WEST, (root,), refresh_hint=dt.timedelta(seconds=7))
    assert poll_delay(hinted, default) == dt.timedelta(seconds=7)
    assert poll_delay(None, default) == default
    assert poll_delay(SpiffeBundle(WEST, (root,), refresh_hint=dt.timedelta(0)), default) == default
    tiny = SpiffeBundle(WEST, (root,), refresh_hint=dt.timedelta(milliseconds=1))
    assert poll_delay(tiny, default) == dt.timedelta(seconds=1)


def test_bundle_changed_looks_at_authorities_sequence_and_hint() -> None:
    a, b = make_ca("west.test").root, make_ca("west.test").root
    one = SpiffeBundle(WEST, (a,), sequence=1)
    assert bundle_changed(None, one)
    assert not bundle_changed(one, SpiffeBundle(WEST, (a,), sequence=1))
    assert bundle_changed(one, SpiffeBundle(WEST, (a, b), sequence=1))
    assert bundle_changed(one, SpiffeBundle(WEST, (a,), sequence=2))


def test_bootstrap_bundle_is_pem_or_a_document() -> None:
    root = make_ca("west.test").root
    from_pem = load_bootstrap_bundle(certs_pem([root]), WEST, "west.pem")
    from_doc = load_bootstrap_bundle(bundle_document(from_pem), WEST, "west.json")
    assert from_pem.x509_authorities == from_doc.x509_authorities == (root,)
    with pytest.raises(InvalidBundle, match="west.pem.*no PEM certificate"):
        load_bootstrap_bundle(b"hello", WEST, "west.pem")
    own = make_root(generate_key(), "east.test", NOW, dt.timedelta(days=1))
    with pytest.raises(InvalidBundle, match="belongs to trust domain 'east.test'"):
        load_bootstrap_bundle(certs_pem([own]), WEST, "west.pem")


# --- settings -------------------------------------------------------------------------------


GOOD_SETTINGS = """\
ca-dir: ./ca
federation:
  bundleEndpoint:
    listen: 127.0.0.1:8443
    profile: https_spiffe
    refreshHint: 5s
  federatesWith:
  - trustDomain: west.test
    bundleEndpointUrl: https://198.18.0.2:8443/bundle
    profile: https_spiffe
    endpointSpiffeId: spiffe://west.test/meshtrust/bundle-endpoint
    bootstrapBundle: west.pem
  - trustDomain: web.test
    bundleEndpointUrl: https://bundles.web.test/
    profile: https_web
"""


def test_federation_settings_are_read(tmp_path: Path) -> None:
    path = tmp_path / "ca.yaml"
    path.write_text(GOOD_SETTINGS)
    federation = load_config_file(path)["federation"]
    endpoint = federation.bundle_endpoint
    assert endpoint.listen == "127.0.0.1:8443"
    assert endpoint.refresh_hint == dt.timedelta(seconds=5)
    west, web = federation.federates_with
    assert west.trust_domain == WEST and west.bootstrap_bundle == tmp_path / "west.pem"
    assert west.host_port_path == ("198.18.0.2", 8443, "/bundle")
    assert web.profile is EndpointProfile.HTTPS_WEB and web.endpoint_spiffe_id is None


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "reason"),
    [
        (
            "profile: https_spiffe\n    refresh",
            "profile: https\n    refresh",
            5,
            "federation.bundleEndpoint.profile",
            "unknown profile 'https'",
        ),
        (
            "refreshHint: 5s",
            "refreshHint: 0s",
            6,
            "federation.bundleEndpoint.refreshHint",
            "at least 1s",
        ),
        (
            "refreshHint: 5s",
            "refreshHnt: 5s",
            6,
            "federation.bundleEndpoint.refreshHnt",
            "unknown key",
        ),
        ("listen: 127.0.0.1:8443", "listen: nowhere", 4, "federation.bundleEndpoint.listen", ""),
        (
            "https://198.18.0.2:8443/bundle",
            "http://198.18.0.2/",
            9,
            "federation.federatesWith[0].bundleEndpointUrl",
            "not an https:// URL",
        ),
        (
            "spiffe://west.test/meshtrust",
            "spiffe://east.test/meshtrust",
            11,
            "federation.federatesWith[0].endpointSpiffeId",
            "is not in trust domain west.test",
        ),
        (
            "    bootstrapBundle: west.pem\n",
            "",
            8,
            "federation.federatesWith[0]",
            "needs 'bootstrapBundle'",
        ),
        (
            "trustDomain: web.test",
            "trustDomain: west.test",
            13,
            "federation.federatesWith[1].trustDomain",
            "listed twice",
        ),
        (
            "trustDomain: web.test",
            "trustDomain: Web.Test",
            13,
            "federation.federatesWith[1].trustDomain",
            "trust domain",
        ),
        (
            "    profile: https_web\n",
            "    profile: https_web\n    bootstrapBundle: x.pem\n",
            16,
            "federation.federatesWith[1].bootstrapBundle",
            "for https_spiffe",
        ),
    ],
)
def test_bad_federation_settings_name_file_line_and_field(
    tmp_path: Path, old: str, new: str, line: int, field: str, reason: str
) -> None:
    assert old in GOOD_SETTINGS
    path = tmp_path / "ca.yaml"
    path.write_text(GOOD_SETTINGS.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: {field}:"), message
    assert reason in message


def test_https_web_endpoint_needs_its_certificate_and_key(tmp_path: Path) -> None:
    path = tmp_path / "ca.yaml"
    path.write_text(
        "federation:\n  bundleEndpoint:\n    listen: 127.0.0.1:1\n    profile: https_web\n"
    )
    with pytest.raises(
        ConfigError, match=r"ca.yaml:2: federation.bundleEndpoint: .*needs certFile"
    ):
        load_config_file(path)


# --- endpoint, fetcher, poller on loopback ------------------------------------------------------


class Federation:
    """West's CA directory and bundle endpoint; east's ledger-backed store."""

    def __init__(self, tmp: Path, stack: contextlib.AsyncExitStack) -> None:
        self.tmp = tmp
        self.stack = stack
        init_ca_dir(tmp / "west", WEST, NOW)
        init_ca_dir(tmp / "east", EAST, NOW)
        self.west = load_ca_dir(tmp / "west", NOW)
        url = f"sqlite:///{tmp / 'east-ledger.db'}"
        SqlLedger(url).close()
        self.url = url
        self.store = FederationStore(url)
        stack.callback(self.store.close)

    async def endpoint(
        self, config: BundleEndpointConfig | None = None, material: CaMaterial | None = None
    ) -> BundleEndpoint:
        config = config or BundleEndpointConfig(
            f"127.0.0.1:{free_port()}", refresh_hint=dt.timedelta(seconds=1)
        )
        endpoint = BundleEndpoint(config, material or self.west, WEST, 1, NOW)
        await endpoint.start()
        self.stack.push_async_callback(endpoint.aclose)
        return endpoint

    def peer(self, port: int, spiffe_id: SpiffeId = WEST_ENDPOINT) -> FederatedTrustDomain:
        return FederatedTrustDomain(
            WEST,
            f"https://127.0.0.1:{port}/",
            EndpointProfile.HTTPS_SPIFFE,
            spiffe_id,
            self.tmp / "x",
        )

    @property
    def bootstrap(self) -> SpiffeBundle:
        return SpiffeBundle(WEST, self.west.roots)

    def poller(self, peer: FederatedTrustDomain) -> FederationPoller:
        return FederationPoller([peer], self.store, SystemClock(), bootstrap={WEST: self.bootstrap})


@pytest_asyncio.fixture
async def fed(tmp_path: Path) -> AsyncIterator[Federation]:
    async with contextlib.AsyncExitStack() as stack:
        yield Federation(tmp_path, stack)


@pytest.mark.asyncio
async def test_https_spiffe_endpoint_serves_the_document_and_is_authenticated(
    fed: Federation,
) -> None:
    endpoint = await fed.endpoint()
    got = await fetch_bundle(fed.peer(endpoint.port), fed.bootstrap)
    assert got.x509_authorities == fed.west.roots
    assert (got.sequence, got.refresh_hint) == (1, dt.timedelta(seconds=1))
    # The endpoint is the wrong workload, or its chain leads to a root we do not trust.
    wrong = SpiffeId.parse("spiffe://west.test/ns/default/sa/api")
    with pytest.raises(
        BundleFetchError, match="names spiffe://west.test/meshtrust/bundle-endpoint, not"
    ):
        await fetch_bundle(fed.peer(endpoint.port, wrong), fed.bootstrap)
    stranger = SpiffeBundle(WEST, (make_ca("west.test").root,))
    with pytest.raises(BundleFetchError, match="TLS refused"):
        await fetch_bundle(fed.peer(endpoint.port), stranger)


@pytest.mark.asyncio
async def test_https_web_endpoint_is_checked_by_host_name(fed: Federation) -> None:
    web_ca = make_ca("web.test", now=NOW)
    key = generate_key()
    cert = make_serving_cert(
        Signer(web_ca.root, web_ca.root_key),
        key,
        ["localhost", "127.0.0.1"],
        NOW,
        dt.timedelta(hours=1),
    )
    (fed.tmp / "web.crt").write_bytes(certs_pem([cert]))
    (fed.tmp / "web.key").write_bytes(private_key_pem(key))
    (fed.tmp / "web-ca.pem").write_bytes(certs_pem([web_ca.root]))
    config = BundleEndpointConfig(
        f"127.0.0.1:{free_port()}",
        EndpointProfile.HTTPS_WEB,
        cert_file=fed.tmp / "web.crt",
        key_file=fed.tmp / "web.key",
    )
    endpoint = await fed.endpoint(config)
    peer = FederatedTrustDomain(
        WEST,
        f"https://localhost:{endpoint.port}/",
        EndpointProfile.HTTPS_WEB,
        ca_file=fed.tmp / "web-ca.pem",
    )
    got = await fetch_bundle(peer, None)
    assert got.x509_authorities == fed.west.roots
    by_other_name = FederatedTrustDomain(
        WEST,
        f"https://127.0.0.2:{endpoint.port}/",
        EndpointProfile.HTTPS_WEB,
        ca_file=fed.tmp / "web-ca.pem",
    )
    with pytest.raises(BundleFetchError):
        await fetch_bundle(by_other_name, None)
    system_roots = FederatedTrustDomain(
        WEST, f"https://localhost:{endpoint.port}/", EndpointProfile.HTTPS_WEB
    )
    with pytest.raises(BundleFetchError, match="TLS refused"):
        await fetch_bundle(system_roots, None)


@pytest.mark.asyncio
async def test_the_endpoint_serves_without_asking_for_a_client_certificate(fed: Federation) -> None:
    endpoint = await fed.endpoint()
    context = ssl.create_default_context(cadata=fed.west.root_bundle_pem)
    context.check_hostname = False
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port, ssl=context)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"application/json" in head
    assert json.loads(body)["keys"][0]["use"] == "x509-svid"


@pytest.mark.asyncio
async def test_poller_keeps_the_last_good_bundle_in_the_ledger_across_restarts(
    fed: Federation,
) -> None:
    endpoint = await fed.endpoint()
    peer = fed.peer(endpoint.port)
    poller = fed.poller(peer)
    assert await poller.poll_once(peer)  # first fetch: a bundle with sequence and hint
    assert not await poller.poll_once(peer)  # unchanged
    assert poller.metrics.count(WEST, "ok") == 1 and poller.metrics.count(WEST, "unchanged") == 1
    # West adds a root (A+B): a new sequence reaches the poller.
    new_root = make_root(generate_key(), "west.test", NOW, dt.timedelta(days=1))
    endpoint.set_bundle((*fed.west.roots, new_root), 2)
    assert await poller.poll_once(peer)
    assert set(poller.bundles()[WEST].x509_authorities) == {*fed.west.roots, new_root}
    # A new poller (a CA restart) starts from the ledger's last good bundle, not bootstrap.
    stored = fed.store.load(WEST)
    assert (
        stored is not None
        and stored.bundle.sequence == 2
        and stored.source == peer.bundle_endpoint_url
    )
    again = fed.poller(peer)
    assert again.bundles()[WEST].sequence == 2


class GarbageEndpoint:
    """An https_spiffe endpoint (a good SVID of west) that serves whatever it is told."""

    def __init__(self, material: CaMaterial) -> None:
        key = generate_key()
        leaf = LeafIssuer(material.signer).issue(
            key.public_key(), WEST_ENDPOINT, NOW, dt.timedelta(hours=1)
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        load_cert_chain_pem(
            self.context, certs_pem([leaf, *material.intermediates]), private_key_pem(key)
        )
        self.body = b""
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.body), self.body)
            )
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _bad_documents(west: CaMaterial) -> dict[str, bytes]:
    good = json.loads(bundle_document(SpiffeBundle(WEST, west.roots, sequence=9)))
    key = good["keys"][0]
    other = json.loads(bundle_document(SpiffeBundle(WEST, (make_ca("west.test").root,))))["keys"][0]
    leaf = svid_leaf(make_ca("west.test").signer, SpiffeId.parse("spiffe://west.test/x"), now=NOW)
    leaf_key = json.loads(bundle_document(SpiffeBundle(WEST, (leaf.cert,))))["keys"][0]
    east_root = make_root(generate_key(), "east.test", NOW, dt.timedelta(days=1))
    return {
        "'kid'": json.dumps({**good, "keys": [{**key, "kid": "k"}]}).encode(),
        "exactly one certificate": json.dumps(
            {**good, "keys": [{**key, "x5c": key["x5c"] + other["x5c"]}]}
        ).encode(),
        "not a CA": json.dumps({**good, "keys": [leaf_key]}).encode(),
        "trust domain 'east.test'": bundle_document(SpiffeBundle(WEST, (east_root,))),
        "over 1024 KiB": b'{"keys": [], "x": "' + b"x" * (10 * 1024 * 1024) + b'"}',
        "not JSON": b"<html>oops</html>",
    }


@pytest.mark.asyncio
async def test_garbage_and_a_dead_endpoint_keep_the_last_good_bundle(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = GarbageEndpoint(fed.west)
    port = await garbage.start()
    fed.stack.push_async_callback(garbage.stop)
    peer = fed.peer(port)
    poller = fed.poller(peer)
    garbage.body = bundle_document(SpiffeBundle(WEST, fed.west.roots, sequence=9))
    assert await poller.poll_once(peer)
    good = poller.bundles()[WEST]
    for reason, body in _bad_documents(fed.west).items():
        garbage.body = body
        assert not await poller.poll_once(peer), reason
        assert poller.bundles()[WEST] == good, reason
        stored = fed.store.load(WEST)
        assert stored is not None and stored.bundle.sequence == 9
    assert poller.metrics.count(WEST, "invalid") == 6
    for reason in _bad_documents(fed.west):
        assert reason in caplog.text  # each refusal says why
    await garbage.stop()
    for _ in range(3):  # down for several refreshes
        assert not await poller.poll_once(peer)
    assert poller.metrics.count(WEST, "unreachable") == 3
    assert poller.bundles()[WEST] == good
    text = b"".join(
        f"{s.name}{s.labels} {s.value}\n".encode()
        for f in poller.metrics.families()
        for s in f.samples
    )
    assert b"'result': 'unreachable'} 3" in text


@pytest.mark.asyncio
async def test_trust_is_per_trust_domain_a_foreign_root_cannot_vouch(fed: Federation) -> None:
    """East's own root does not authenticate west's endpoint, and a document naming east's
    root as west's is refused: the bundles stay apart."""
    east = load_ca_dir(fed.tmp / "east", NOW)
    endpoint = await fed.endpoint()
    with pytest.raises(BundleFetchError, match="TLS refused"):
        await fetch_bundle(fed.peer(endpoint.port), SpiffeBundle(WEST, east.roots))
    assert isinstance(east.roots[0], x509.Certificate)


def test_bad_bootstrap_bundle_or_ca_file_stops_start_up(tmp_path: Path) -> None:
    from meshtrust.ca.federation import check_bootstrap_bundles
    from meshtrust.config.federation import FederationConfig

    spiffe_peer = FederatedTrustDomain(
        WEST,
        "https://127.0.0.1:1/",
        EndpointProfile.HTTPS_SPIFFE,
        WEST_ENDPOINT,
        tmp_path / "w.pem",
    )
    with pytest.raises(BundleFetchError, match=r"cannot read .*w.pem"):
        check_bootstrap_bundles(FederationConfig(None, (spiffe_peer,)))
    (tmp_path / "w.pem").write_text("garbage")
    with pytest.raises(InvalidBundle, match=r"w.pem: no PEM certificate"):
        check_bootstrap_bundles(FederationConfig(None, (spiffe_peer,)))
    web_peer = FederatedTrustDomain(
        WEST, "https://x.test/", EndpointProfile.HTTPS_WEB, ca_file=tmp_path / "missing.pem"
    )
    with pytest.raises(BundleFetchError, match=r"cannot use caFile .*missing.pem"):
        check_bootstrap_bundles(FederationConfig(None, (web_peer,)))


def test_ca_serve_refuses_a_bad_bootstrap_bundle_without_a_traceback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meshtrust.cli import cli

    init_ca_dir(tmp_path / "ca", EAST, NOW)
    (tmp_path / "west.pem").write_bytes((tmp_path / "ca" / "root-cert.pem").read_bytes())
    (tmp_path / "ca.yaml").write_text(
        f"ca-dir: ca\nlisten: 127.0.0.1:{free_port()}\n"
        f"metrics-listen: 127.0.0.1:{free_port()}\nfederation:\n"
        "  federatesWith:\n  - trustDomain: west.test\n"
        "    bundleEndpointUrl: https://127.0.0.1:1/\n    profile: https_spiffe\n"
        "    endpointSpiffeId: spiffe://west.test/meshtrust/bundle-endpoint\n"
        "    bootstrapBundle: west.pem\n"
    )
    result = CliRunner().invoke(cli, ["ca", "serve", "--config", str(tmp_path / "ca.yaml")])
    assert result.exit_code == 2, result.output
    assert "west.pem (trust domain west.test): keys[0].x5c[0]: the certificate belongs to" in (
        result.output
    )
    assert "Traceback" not in result.output
