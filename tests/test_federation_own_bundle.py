"""The bundle a CA gives federated trust domains is the mesh's *versioned* bundle
(ca/trust.py's ``trust_bundles``, its version as ``spiffe_sequence``): ``meshtrust bundle
show`` prints it, and a running bundle endpoint serves each new version, so a root rotation
(A -> A+B -> B) reaches federated peers."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshtrust.ca.cadir import init_ca_dir, load_ca_dir
from meshtrust.ca.federation import build_federation
from meshtrust.ca.ledger import SqlLedger, default_ledger_url
from meshtrust.ca.trust import TrustLedger
from meshtrust.cli import cli
from meshtrust.clock import SystemClock
from meshtrust.config.federation import BundleEndpointConfig, FederationConfig
from meshtrust.spiffe import TrustDomain
from meshtrust.spiffe.bundle import parse_bundle_document
from tests.badcerts import make_ca
from tests.waiting import async_until

WEST = TrustDomain.parse("west.test")
NOW = SystemClock().now()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rotate_to_two_roots(ca_dir: Path) -> TrustLedger:
    sql = SqlLedger(default_ledger_url(ca_dir))
    trust = TrustLedger(sql.engine)
    first = trust.initialise(load_ca_dir(ca_dir, NOW).roots, NOW)
    trust.set_roots(
        (*first.roots, make_ca(WEST).root), NOW, actor="t", why="A+B", expect_version=first.version
    )
    sql.close()
    return trust


def test_bundle_show_prints_the_versioned_bundle(tmp_path: Path) -> None:
    init_ca_dir(tmp_path / "west", WEST, NOW)
    _rotate_to_two_roots(tmp_path / "west")
    result = CliRunner().invoke(
        cli, ["bundle", "show", "--ca-dir", str(tmp_path / "west"), "--format", "spiffe"]
    )
    assert result.exit_code == 0, result.output
    bundle = parse_bundle_document(result.output.encode(), WEST)
    assert bundle.sequence == 2 and len(bundle.x509_authorities) == 2


def test_both_bundle_groups_say_which_is_which() -> None:
    own = CliRunner().invoke(cli, ["ca", "bundle", "--help"]).output
    federated = CliRunner().invoke(cli, ["bundle", "--help"]).output
    assert "meshtrust bundle list|set|delete" in own and "own" in own
    assert "meshtrust ca bundle add-root|remove-root" in federated


@pytest.mark.asyncio
async def test_a_running_bundle_endpoint_serves_each_new_version(tmp_path: Path) -> None:
    ca_dir = tmp_path / "west"
    init_ca_dir(ca_dir, WEST, NOW)
    SqlLedger(default_ledger_url(ca_dir)).close()
    config = FederationConfig(
        BundleEndpointConfig(f"127.0.0.1:{_free_port()}", refresh_hint=dt.timedelta(seconds=1)),
        (),
    )
    material = load_ca_dir(ca_dir, NOW)
    runtime = build_federation(config, material, WEST, default_ledger_url(ca_dir), SystemClock())
    await runtime.start()
    try:
        assert runtime.endpoint is not None
        endpoint = runtime.endpoint
        first = parse_bundle_document(endpoint.document, WEST)
        assert first.sequence == 1 and first.x509_authorities == material.roots
        await asyncio.to_thread(_rotate_to_two_roots, ca_dir)
        await async_until(
            lambda: parse_bundle_document(endpoint.document, WEST).sequence == 2,
            timeout=15,
            what="the endpoint serves version 2",
        )
        assert len(parse_bundle_document(endpoint.document, WEST).x509_authorities) == 2
    finally:
        await runtime.aclose()
