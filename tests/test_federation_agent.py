"""Federated bundles in the agent: what it accepts from the trust stream
(:func:`~meshtrust.agent.federated.verify_federated`), and what it serves as one generation:
the Workload API to real py-spiffe and go-spiffe clients, ``federated/<td>.pem``, and SDS
``ROOTCA:<td>`` per trust domain (envoy/trust_domains.py). The CA's side (the ledger's
bundles on the trust stream, end to end with a real agent) is at the end."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshtrust.agent.cache import SecretCache
from meshtrust.agent.federated import FederatedIntake, verify_federated
from meshtrust.agent.files import CertificateFiles
from meshtrust.agent.sds import ROOT_SECRET, is_known_secret, secret_resource
from meshtrust.agent.workload_api import WorkloadApiServer
from meshtrust.ca.cadir import load_ca_dir
from meshtrust.ca.crl import build_crl
from meshtrust.ca.federated_push import FederatedWatch, federated_field, read_federated
from meshtrust.ca.federation import FederationStore
from meshtrust.ca.revocation import RevocationState
from meshtrust.clock import SystemClock
from meshtrust.envoy.trust_domains import peer_sni
from meshtrust.pki import format_serial, generate_key, make_root
from meshtrust.pki.profile import Signer
from meshtrust.spiffe import SpiffeId, TrustDomain
from meshtrust.spiffe.bundle import SpiffeBundle
from tests.badcerts import CaFixture, Leaf, leaf_with_two_uri_sans, make_ca, svid_leaf
from tests.gobuild import build_go_program
from tests.revocation_rig import Client
from tests.test_workload_api import make_secret
from tests.waiting import async_until

EAST = TrustDomain.parse("east.test")
WEST = TrustDomain.parse("west.test")
NOW = SystemClock().now()
DER = serialization.Encoding.DER
TIMEOUT = 15.0
EAST_ROOT = make_root(generate_key(), "east.test", NOW, dt.timedelta(days=1))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(DER)


def sha(cert: x509.Certificate) -> str:
    return hashlib.sha256(der(cert)).hexdigest()


@pytest.fixture(scope="module")
def east() -> CaFixture:
    return make_ca(EAST, now=NOW)


@pytest.fixture(scope="module")
def west() -> CaFixture:
    return make_ca(WEST, now=NOW)


# --- what the agent accepts ---------------------------------------------------------------------


def test_a_federated_bundle_is_accepted_for_its_own_trust_domain(west: CaFixture) -> None:
    verdict = verify_federated({"west.test": [der(west.root)]}, EAST, {}, NOW)
    assert verdict.held == {WEST: (west.root,)} and verdict.refused == ()


@pytest.mark.parametrize(
    ("name", "roots", "why"),
    [
        ("east.test", lambda e, w: [der(w.root)], "this mesh's own trust domain"),
        ("West Test", lambda e, w: [der(w.root)], "not a trust domain"),
        # A meshtrust root of east.test (its O names it) cannot vouch for west.test.
        ("west.test", lambda e, w: [der(EAST_ROOT)], "belongs to trust domain 'east.test'"),
        ("west.test", lambda e, w: [b"garbage"], "root 1 is not a DER certificate"),
        ("west.test", lambda e, w: [der(w.root), der(w.root)], "root 2 is repeated"),
        (
            "west.test",
            lambda e, w: [der(svid_leaf(w.signer, "spiffe://west.test/ns/a/sa/b", now=NOW).cert)],
            "not a CA certificate",
        ),
        (
            "west.test",
            lambda e, w: [
                der(
                    make_ca(
                        WEST, now=NOW - dt.timedelta(days=30), lifetime=dt.timedelta(days=1)
                    ).root
                )
            ],
            "expired at",
        ),
    ],
)
def test_a_bad_federated_bundle_is_refused_and_the_last_good_one_kept(
    east: CaFixture, west: CaFixture, name: str, roots: object, why: str
) -> None:
    assert callable(roots)
    held = {WEST: (west.root,)}
    verdict = verify_federated({name: roots(east, west)}, EAST, held, NOW)
    assert len(verdict.refused) == 1 and why in verdict.refused[0], verdict.refused
    assert verdict.held == ({WEST: (west.root,)} if name == "west.test" else {})


def test_a_trust_domain_the_ca_no_longer_sends_is_dropped(west: CaFixture) -> None:
    assert verify_federated({}, EAST, {WEST: (west.root,)}, NOW).held == {}


# --- what the agent serves ----------------------------------------------------------------------


@pytest_asyncio.fixture
async def served(east: CaFixture, west: CaFixture) -> AsyncIterator[tuple[SecretCache, Path]]:
    """A cache holding east's web with west's bundle, served on a Workload API socket."""
    workdir = Path(tempfile.mkdtemp(prefix="fed-"))
    cache = SecretCache()
    server = WorkloadApiServer(cache, workdir / "agent" / "socket")
    await server.start()
    try:
        await cache.publish(make_secret(east, SpiffeId.for_workload(EAST, "default", "web")))
        intake = FederatedIntake(cache)
        assert await intake.offer({"west.test": [der(west.root)]}, NOW)
        assert not await intake.offer({"west.test": [der(west.root)]}, NOW)  # unchanged
        yield cache, workdir / "agent" / "socket"
    finally:
        await server.stop(grace=0.5)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.asyncio
async def test_py_spiffe_sees_the_federated_bundle(
    served: tuple[SecretCache, Path], east: CaFixture, west: CaFixture
) -> None:
    _, socket_path = served
    client = spiffe.WorkloadApiClient(f"unix://{socket_path}")
    try:
        context = await asyncio.to_thread(client.fetch_x509_context, TIMEOUT)
        bundles = await asyncio.to_thread(client.fetch_x509_bundles, TIMEOUT)
    finally:
        client.close()
    for found in (context.x509_bundle_set, bundles):
        west_bundle = found.get_bundle_for_trust_domain(spiffe.TrustDomain("west.test"))
        east_bundle = found.get_bundle_for_trust_domain(spiffe.TrustDomain("east.test"))
        assert west_bundle is not None and west_bundle.x509_authorities == {west.root}
        assert east_bundle is not None and east_bundle.x509_authorities == {east.root}


@pytest.mark.asyncio
async def test_go_spiffe_sees_the_federated_bundle(
    served: tuple[SecretCache, Path], east: CaFixture, west: CaFixture
) -> None:
    _, socket_path = served
    program = await asyncio.to_thread(build_go_program, "workload")
    result = await asyncio.to_thread(
        subprocess.run,
        [str(program), f"unix://{socket_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["spiffe_id"] == "spiffe://east.test/ns/default/sa/web"
    expected = {"east.test": [sha(east.root)], "west.test": [sha(west.root)]}
    assert out["context_bundles"] == expected
    assert out["bundles"] == expected


@pytest.mark.asyncio
async def test_the_files_hold_one_pem_per_federated_trust_domain(
    served: tuple[SecretCache, Path], tmp_path: Path, east: CaFixture, west: CaFixture
) -> None:
    cache, _ = served
    secret = cache.current
    assert secret is not None
    files = CertificateFiles(tmp_path / "certs")
    files.prepare()
    files.write(secret)
    pem = (tmp_path / "certs" / "federated" / "west.test.pem").read_bytes()
    assert x509.load_pem_x509_certificates(pem) == [west.root]
    assert x509.load_pem_x509_certificates((tmp_path / "certs" / "root-cert.pem").read_bytes()) == [
        east.root
    ]  # never mixed into the mesh's own roots
    assert sorted(p.name for p in (tmp_path / "certs" / "federated").iterdir()) == ["west.test.pem"]
    # The next generation without it: the file is gone with the swap.
    await FederatedIntake(cache).offer({}, NOW)
    assert cache.current is not None
    files.write(cache.current)
    assert list((tmp_path / "certs" / "federated").iterdir()) == []


def _context(name: str, secret: object) -> tuple[list[x509.Certificate], bytes]:
    context = secret_resource(name, secret).validation_context  # type: ignore[arg-type]
    assert not context.HasField("custom_validator_config")  # Envoy's default validator
    roots = x509.load_pem_x509_certificates(context.trusted_ca.inline_bytes)
    return roots, context.crl.inline_bytes


@pytest.mark.asyncio
async def test_each_trust_domain_has_its_own_validation_context_and_only_the_meshs_has_its_crl(
    served: tuple[SecretCache, Path], east: CaFixture, west: CaFixture
) -> None:
    cache, _ = served
    secret = cache.current
    assert secret is not None and secret.trust_domain == EAST
    crl = east_crl(east)
    secret = dataclasses.replace(secret, crl=crl)
    own_roots, own_crl = _context(ROOT_SECRET, secret)
    assert own_roots == [east.root]  # never a federated root: it would vouch for east.test
    assert x509.load_pem_x509_crl(own_crl) == crl
    # West's callers: west's roots only, and never east's CRL (Envoy would refuse a west
    # leaf whose issuer has no CRL there).
    assert _context("ROOTCA:west.test", secret) == ([west.root], b"")
    # Another trust domain under east's roots (a shared root): east's roots, no CRL.
    assert _context("ROOTCA:other.test", secret) == ([east.root], b"")
    assert _context("ROOTCA~shared-root", secret) == ([east.root], b"")
    # A trust domain whose federation ended while the agent runs is trusted by nobody,
    # not by the mesh's roots as an unknown one would be.
    ended = dataclasses.replace(secret, federated={}, dropped_federated=frozenset({WEST}))
    (gone,), _ = _context("ROOTCA:west.test", ended)
    assert gone not in (east.root, west.root)
    assert _context("ROOTCA:east.test", secret) == ([east.root], own_crl)
    # A federated trust domain held without roots trusts nobody (empty roots would be
    # "verify nothing" to Envoy).
    empty = dataclasses.replace(secret, federated={WEST: ()})
    (nobody,), _ = _context("ROOTCA:west.test", empty)
    assert nobody not in (east.root, west.root)
    for name in ("ROOTCA:", "ROOTCA:Bad_TD", "ROOTCA:west.test:x", "other"):
        assert not is_known_secret(name)
        with pytest.raises(ValueError):
            secret_resource(name, secret)


def east_crl(ca: CaFixture) -> x509.CertificateRevocationList:
    return build_crl(ca.signer, RevocationState(1, {}), NOW, dt.timedelta(hours=1))


# --- the CA's side --------------------------------------------------------------------------------


def test_the_ledgers_federated_bundles_become_the_trust_streams_map(
    tmp_path: Path, west: CaFixture
) -> None:
    from meshtrust.ca.ledger import SqlLedger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = SqlLedger(url)
    store = FederationStore(url)
    try:
        assert read_federated(ledger.engine, EAST).bundles == {}
        store.save(SpiffeBundle(WEST, (west.root,), sequence=4), "static: west.json", NOW)
        held = read_federated(ledger.engine, EAST)
        field = federated_field(held)
        assert list(field) == ["west.test"]
        assert [bytes(r) for r in field["west.test"].roots] == [der(west.root)]
        assert field["west.test"].sequence == 4
        # A row for the CA's own trust domain is never pushed.
        assert read_federated(ledger.engine, WEST).bundles == {}
        watch = FederatedWatch(ledger.engine, EAST, SystemClock())
        assert watch.held.bundles == {}
        assert asyncio.run(watch.poll_once()) and WEST in watch.held.bundles
        assert not asyncio.run(watch.poll_once())  # unchanged
    finally:
        store.close()
        ledger.close()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_federated_bundle_stored_at_the_ca_reaches_a_running_agent(
    west: CaFixture,
) -> None:
    from tests.revocation_rig import revocation_rig

    workdir = Path(tempfile.mkdtemp(prefix="fedrig-"))
    try:
        async with revocation_rig(workdir, poll=0.2) as rig:
            await async_until(lambda: rig.agent.cache.current is not None, what="a certificate")
            store = FederationStore(rig.ledger.url)
            try:
                store.save(SpiffeBundle(WEST, (west.root,), sequence=1), "static: t", NOW)
                await async_until(
                    lambda: rig.agent.cache.federated == {WEST: (west.root,)},
                    timeout=20,
                    what="west's bundle in the agent",
                )
                assert rig.agent.cache.current is not None
                assert rig.agent.cache.current.federated == {WEST: (west.root,)}
                store.delete(WEST)
                await async_until(
                    lambda: rig.agent.cache.federated == {}, timeout=20, what="west dropped"
                )
            finally:
                store.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _until_threaded(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """:func:`async_until` for a blocking ``condition`` (a handshake): run in a thread, so
    the agent on this event loop keeps serving Envoy meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(condition):
        assert loop.time() < deadline, f"not true within {timeout:g}s: {what}"
        await asyncio.sleep(0.1)


def _with_dns_san(signer: Signer, identity: SpiffeId, dns: str, now: dt.datetime) -> Leaf:
    """An SVID of ``identity`` with a DNS SAN too (Envoy's principal matchers read it)."""
    key = generate_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=2))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(identity)), x509.DNSName(dns)]
            ),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(signer.key, hashes.SHA256())
    )
    return Leaf(cert, key, (signer.cert,))


def _leaf_client(directory: Path, leaf: Leaf, identity: SpiffeId) -> Client:
    directory.mkdir()
    (directory / "chain.pem").write_bytes(leaf.chain_pem)
    (directory / "key.pem").write_bytes(leaf.key_pem)
    return Client(identity, leaf.cert.serial_number, directory)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_envoy_takes_each_trust_domain_only_from_its_own_root_and_keeps_the_crl(
    west: CaFixture,
) -> None:
    """A real agent and its real sidecar Envoy (tests/revocation_rig.py, trust domain
    example.org). Once west.test's bundle is stored at the CA, Envoy accepts west's workloads
    (calling with SNI ``west.test.peer.meshtrust``, as a sidecar does), and refuses a
    west.test certificate signed by the mesh's own CA whichever SNI it sends. A revoked
    certificate of the mesh is refused while the federated bundle is held, whichever SNI it
    sends: the mesh chain has the CRL, the others refuse the mesh's trust domain."""
    from tests.revocation_rig import TD, revocation_rig

    west_sni, own_sni = peer_sni(WEST), peer_sni(TD)
    workdir = Path(tempfile.mkdtemp(prefix="fedenv-"))
    try:
        async with revocation_rig(workdir, poll=0.2, sidecar=True) as rig:
            now = SystemClock().now()
            west_id = SpiffeId.for_workload(WEST, "default", "web")
            west_web = _leaf_client(
                workdir / "w", svid_leaf(west.signer, west_id, now=now), west_id
            )
            own = load_ca_dir(rig.ca_dir, now)
            forged = _leaf_client(workdir / "f", svid_leaf(own.signer, west_id, now=now), west_id)
            revoked, good = await rig.client("web"), await rig.client("api")

            def accepted(client: Client, sni: str | None = None) -> Callable[[], bool]:
                return lambda: rig.accepted(client, sni=sni)

            async def check(client: Client, sni: str | None, want: bool) -> None:
                got = await asyncio.to_thread(accepted(client, sni))
                assert got is want, f"{client.spiffe_id} with SNI {sni}: {got}, wanted {want}"

            await check(west_web, west_sni, False)  # not federated yet
            # Before: the mesh's root vouches for any ID it signed, west.test's too (a
            # shared root; only a policy would stop it).
            await check(forged, None, True)
            await check(good, None, True)

            store = FederationStore(rig.ledger.url)
            try:
                store.save(SpiffeBundle(WEST, (west.root,), sequence=1), "static: t", now)
            finally:
                store.close()
            await _until_threaded(accepted(west_web, west_sni), "Envoy accepts west's web")
            assert rig.agent.sidecar is not None and rig.agent.sidecar.federated == (WEST,)
            await check(west_web, None, False)  # the mesh chain: the mesh's roots only
            await check(west_web, own_sni, False)
            # West's CA posing as the mesh: a second URI SAN (or a DNS SAN) naming the mesh's
            # own identity passes Envoy's any-SAN matcher; the chain's RBAC DENY closes it.
            api_id = SpiffeId.for_workload(TD, "default", "api")
            posing = [
                leaf_with_two_uri_sans(west.signer, west_id, api_id, now=now),
                leaf_with_two_uri_sans(west.signer, api_id, west_id, now=now),
                _with_dns_san(west.signer, west_id, str(api_id), now),
            ]
            for i, leaf in enumerate(posing):
                await check(_leaf_client(workdir / f"p{i}", leaf, west_id), west_sni, False)
            for sni in (None, west_sni, own_sni, "other.test.peer.meshtrust"):
                await check(forged, sni, False)
            await check(good, None, True)
            await check(revoked, None, True)

            rig.ledger.revoke_serial(
                format_serial(revoked.serial), x509.ReasonFlags.key_compromise, "t", "", now
            )
            await _until_threaded(lambda: not rig.accepted(revoked), "the revoked one refused")
            for sni in (west_sni, own_sni, "other.test.peer.meshtrust", "api.example.org"):
                await check(revoked, sni, False)
            await check(good, None, True)
            await check(good, "api.example.org", True)  # any other SNI: the mesh chain
            await check(west_web, west_sni, True)

            store = FederationStore(rig.ledger.url)
            try:
                store.delete(WEST)
            finally:
                store.close()
            await _until_threaded(lambda: not rig.accepted(west_web, sni=west_sni), "west gone")
            await check(revoked, None, False)
            await check(good, None, True)
            assert TD.name == "example.org"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- trust-domain aliases in the agent's policy compilation ---------------------------------------

ALIAS_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-api, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["old.test/ns/default/sa/api"]}}]
"""


@pytest.mark.parametrize("aliases", [(), (TrustDomain.parse("old.test"),)])
def test_a_policy_naming_an_alias_matches_the_meshs_own_identities(
    tmp_path: Path, aliases: tuple[TrustDomain, ...]
) -> None:
    from meshtrust.agent.sidecar import EnvoySidecar, SidecarSettings
    from meshtrust.clock import FakeClock
    from meshtrust.envoy.sidecar import SidecarConfig, inbound_listeners
    from meshtrust.policy import load_policy_files
    from tests.fake_envoy import FakeEnvoy, FakeLauncher, FakePolicies

    (tmp_path / "policy.yaml").write_text(ALIAS_POLICY)
    config = SidecarConfig(name="web", namespace="default", app_port=8080, inbound_port=15006)
    clock = FakeClock(NOW)
    sidecar = EnvoySidecar(
        SidecarSettings(config=config, workdir=tmp_path, trust_domain_aliases=aliases),
        SpiffeId.parse("spiffe://new.test/ns/default/sa/web"),
        tmp_path / "sds.sock",
        launcher=FakeLauncher(FakeEnvoy(clock)),
        policies=FakePolicies(load_policy_files([tmp_path / "policy.yaml"])),
        clock=clock,
    )
    rendered = json.dumps(inbound_listeners(config, sidecar.compile_policy()))
    assert ("spiffe://new.test/ns/default/sa/api" in rendered) == bool(aliases)


def test_aliases_come_from_the_config_file_and_the_flag(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meshtrust.agent.config import load_agent_settings
    from meshtrust.cli import cli

    (tmp_path / "agent.yaml").write_text("trust-domain-aliases: [old.test, older.test]\n")
    assert load_agent_settings(tmp_path / "agent.yaml")["trust_domain_aliases"] == (
        TrustDomain.parse("old.test"),
        TrustDomain.parse("older.test"),
    )
    (tmp_path / "bad.yaml").write_text("trust-domain-aliases: [Not A Domain]\n")
    result = CliRunner().invoke(cli, ["agent", "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "bad.yaml:1" in result.output and "trust-domain-aliases[0]" in result.output
    assert "--trust-domain-alias" in CliRunner().invoke(cli, ["agent", "--help"]).output
