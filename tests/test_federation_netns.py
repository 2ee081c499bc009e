"""Two CAs with unrelated roots, ``east.test`` and ``west.test``, on two hosts (network
namespaces, :mod:`tests.netns`), each serving its bundle at an ``https_spiffe`` bundle
endpoint and polling the other's, as real ``meshtrust ca serve`` processes.

What is checked is what the CAs keep: each one's ledger holds the other's last good bundle
(read here through :class:`~meshtrust.ca.federation.FederationStore`, as ``meshtrust bundle
show`` does). West down for several refresh hints changes nothing at east; a new root
added to west's versioned bundle (``meshtrust ca bundle add-root``, live) reaches east's
ledger; a restarted east starts from the bundle it kept.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshtrust.ca.cadir import init_ca_dir, load_ca_dir
from meshtrust.ca.federation import FederationStore, StoredBundle
from meshtrust.clock import SystemClock
from meshtrust.pki import certs_pem, generate_key, make_root
from meshtrust.spiffe import TrustDomain
from tests.netns import Host, network
from tests.processes import MESHTRUST
from tests.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

EAST = TrustDomain.parse("east.test")
WEST = TrustDomain.parse("west.test")
NOW = SystemClock().now()


def _settings(me: TrustDomain, other: TrustDomain, other_address: str, bootstrap: Path) -> str:
    return f"""\
listen: 127.0.0.1:15012
metrics-listen: 127.0.0.1:15014
workers: 1
federation:
  bundleEndpoint:
    listen: 0.0.0.0:8443
    profile: https_spiffe
    refreshHint: 1s
  federatesWith:
  - trustDomain: {other}
    bundleEndpointUrl: https://{other_address}:8443/
    profile: https_spiffe
    endpointSpiffeId: spiffe://{other}/meshtrust/bundle-endpoint
    bootstrapBundle: {bootstrap}
"""


@dataclass
class Side:
    td: TrustDomain
    host: Host
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ca_dir(self) -> Path:
        return self.directory / "ca"

    def start(self) -> None:
        log = (self.directory / "ca.log").open("ab")
        self.proc = self.host.popen(
            [
                *MESHTRUST,
                "ca",
                "serve",
                "--config",
                str(self.directory / "ca.yaml"),
                "--ca-dir",
                str(self.ca_dir),
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def log(self) -> str:
        return (self.directory / "ca.log").read_text(errors="replace")

    def stored(self, td: TrustDomain) -> StoredBundle | None:
        store = FederationStore(f"sqlite:///{self.ca_dir / 'ledger.db'}")
        try:
            return store.load(td)
        except Exception:  # the ledger is not there yet
            return None
        finally:
            store.close()

    def unreachable(self) -> int:
        """East's count of failed fetches of the other side's bundle (its /metrics, read
        inside its host: the metrics port is on the host's own loopback)."""
        code = (
            "import urllib.request,sys;"
            "sys.stdout.write(urllib.request.urlopen("
            "'http://127.0.0.1:15014/metrics', timeout=5).read().decode())"
        )
        done = self.host.run([sys.executable, "-c", code], timeout=30)
        if done.returncode != 0:
            return 0
        for line in done.stdout.decode().splitlines():
            if line.startswith("meshtrust_federation_bundle_fetches_total{") and (
                'result="unreachable"' in line
            ):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    def roots(self) -> set[bytes]:
        return {certs_pem([c]) for c in load_ca_dir(self.ca_dir, NOW).roots}


def _roots_of(stored: StoredBundle | None) -> set[bytes]:
    return set() if stored is None else {certs_pem([c]) for c in stored.bundle.x509_authorities}


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    directory = tmp_path_factory.mktemp("federation")
    with network(["east", "west"]) as net:
        east = Side(EAST, net["east"], directory / "east")
        west = Side(WEST, net["west"], directory / "west")
        for side in (east, west):
            init_ca_dir(side.ca_dir, side.td, NOW)
        # The offline exchange: each side is given the other's root once.
        for me, other in ((east, west), (west, east)):
            bootstrap = me.directory / f"{other.td}.pem"
            bootstrap.write_bytes((other.ca_dir / "root-cert.pem").read_bytes())
            (me.directory / "ca.yaml").write_text(
                _settings(me.td, other.td, other.host.address, bootstrap)
            )
        try:
            east.start()
            west.start()
            yield east, west
        finally:
            for side in (east, west):
                with contextlib.suppress(Exception):
                    side.stop()


def test_each_ca_keeps_the_others_bundle_apart_from_its_own(sides: tuple[Side, Side]) -> None:
    east, west = sides
    for me, other in ((east, west), (west, east)):
        until(
            lambda me=me, other=other: _roots_of(me.stored(other.td)) == other.roots(),  # type: ignore[misc]
            timeout=60,
            what=f"{me.td} has {other.td}'s bundle\n{me.log()[-2000:]}",
        )
        stored = me.stored(other.td)
        assert stored is not None and stored.bundle.sequence == 1
        assert stored.source == f"https://{other.host.address}:8443/"
        assert me.stored(me.td) is None  # its own bundle is never among the foreign ones
        assert not _roots_of(stored) & me.roots()  # unrelated roots, kept apart


def test_west_down_for_several_refreshes_changes_nothing_at_east(sides: tuple[Side, Side]) -> None:
    east, west = sides
    until(lambda: east.stored(WEST) is not None, timeout=60, what="east has west's bundle")
    before = east.stored(WEST)
    assert before is not None
    west.stop()
    # Four refresh hints of failed fetches (counted), one warning, the bundle kept.
    until(lambda: east.unreachable() >= 4, timeout=60, what=f"four failed fetches\n{east.log()}")
    after = east.stored(WEST)
    assert after is not None and after.bundle == before.bundle
    assert 1 <= east.log().count("kept (last good one)") < east.unreachable()  # not every poll
    # A restarted east still has it (the ledger), though west is still down.
    east.stop()
    east.start()
    until(lambda: east.unreachable() >= 1, timeout=60, what="restarted east polls again")
    kept = east.stored(WEST)
    assert kept is not None and kept.bundle == before.bundle


def test_a_new_root_in_wests_bundle_reaches_east(sides: tuple[Side, Side]) -> None:
    east, west = sides
    if west.proc is None:  # the previous test stopped it
        west.start()
    # West adds a second root to its versioned bundle (phase A+B of a root rotation), while
    # running: its bundle endpoint serves the new version, numbered by it.
    new_root = make_root(generate_key(), "west.test", NOW, dt.timedelta(days=30))
    (west.directory / "new-root.pem").write_bytes(certs_pem([new_root]))
    added = subprocess.run(
        [*MESHTRUST, "ca", "bundle", "add-root", str(west.directory / "new-root.pem"),
         "--ca-dir", str(west.ca_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    until(
        lambda: certs_pem([new_root]) in _roots_of(east.stored(WEST)),
        timeout=60,
        what=f"east has west's new root\n{east.log()[-2000:]}",
    )
    stored = east.stored(WEST)
    assert stored is not None and stored.bundle.sequence == 2
    assert _roots_of(stored) == west.roots() | {certs_pem([new_root])}
