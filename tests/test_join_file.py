"""The join file: written 0600 whatever the umask, read back, and every bad field refused
with the file, line and field (a join file is input from outside)."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshtrust.ca.join import create_join_file
from meshtrust.clock import SystemClock
from meshtrust.errors import ConfigError
from meshtrust.joinfile import JoinFile, load_join_file
from meshtrust.spiffe import SpiffeId

WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
API = SpiffeId.parse("spiffe://example.org/ns/default/sa/api")


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def make_join(ca_dir: Path, out: Path, **kw: Any) -> JoinFile:
    settings: dict[str, Any] = {
        "identities": [WEB, API],
        "ca_addresses": ["198.18.0.1:15012"],
        "ttl": dt.timedelta(hours=1),
        "now": SystemClock().now(),
        "out": out,
        "host": "h2",
        **kw,
    }
    create_join_file(ca_dir, **settings)
    return load_join_file(out)


def test_written_0600_under_umask_000_and_read_back(
    ca_dir: Path, tmp_path: Path, umask_000: None
) -> None:
    now = SystemClock().now().replace(microsecond=0)
    out = tmp_path / "h2.join"
    loaded = make_join(ca_dir, out, now=now)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert loaded.host == "h2"
    assert loaded.identities == (WEB, API)
    assert loaded.ca_addresses == ("198.18.0.1:15012",)
    assert loaded.expires_at == now + dt.timedelta(hours=1)
    assert loaded.bundle_pem == (ca_dir / "root-cert.pem").read_bytes()
    assert loaded.token.count(".") == 2
    assert loaded.token not in repr(loaded)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_host_defaults_to_the_file_name(ca_dir: Path, tmp_path: Path) -> None:
    assert make_join(ca_dir, tmp_path / "h3.join", host=None).host == "h3"


def test_ttl_is_bounded_to_24h_unless_raised(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="above the bound of 1d"):
        make_join(ca_dir, tmp_path / "a.join", ttl=dt.timedelta(hours=25))
    with pytest.raises(ConfigError, match="positive"):
        make_join(ca_dir, tmp_path / "a.join", ttl=dt.timedelta(0))
    long = make_join(
        ca_dir, tmp_path / "b.join", ttl=dt.timedelta(days=7), max_ttl=dt.timedelta(days=7)
    )
    assert long.host == "h2"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"identities": []}, "at least one identity"),
        ({"identities": [SpiffeId.parse("spiffe://other.org/ns/a/sa/b")]}, "trust domain"),
        ({"ca_addresses": []}, "address"),
        ({"ca_addresses": ["no-port"]}, "HOST:PORT"),
        ({"host": "bad host"}, "host name"),
    ],
)
def test_create_refuses(ca_dir: Path, tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    out = tmp_path / "x.join"
    with pytest.raises(ConfigError, match=message):
        make_join(ca_dir, out, **kw)
    assert not out.exists()


Edit = Callable[[dict[str, Any]], None]


def _set(key: str, value: object) -> Edit:
    return lambda doc: doc.__setitem__(key, value)


def _drop(key: str) -> Edit:
    return lambda doc: doc.pop(key)


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        (_set("version", 2), "version", "version 2 is not supported"),
        (_set("kind", "Other"), "kind", "MeshtrustJoin"),
        (_drop("token"), "token", "is missing"),
        (_drop("trustBundle"), "trustBundle", "is missing"),
        (_drop("identities"), "identities", "is missing"),
        (_set("token", ""), "token", "join token"),
        (_set("token", "not a jwt"), "token", "not a JWT"),
        (_set("trustBundle", "-----BEGIN CERTIFICATE-----\nAAAA\n"), "trustBundle", ""),
        (_set("trustBundle", "hello"), "trustBundle", "no PEM certificate"),
        (_set("caAddresses", ["198.18.0.1"]), "caAddresses[0]", "HOST:PORT"),
        (_set("caAddresses", []), "caAddresses", "non-empty list"),
        (_set("identities", ["http://x"]), "identities[0]", ""),
        (_set("expiresAt", "tomorrow"), "expiresAt", "UTC time"),
        (_set("expiresAt", "2026-12-02T03:00:00"), "expiresAt", "zone"),
        (_set("host", 7), "host", "string"),
        (_set("extra", 1), "extra", "unknown field"),
    ],
)
def test_bad_join_files_name_file_line_and_field(
    ca_dir: Path, tmp_path: Path, edit: Edit, field: str, message: str
) -> None:
    out = tmp_path / "h2.join"
    good = make_join(ca_dir, out)
    doc = json.loads(out.read_text())
    edit(doc)
    out.write_text(json.dumps(doc, indent=2))
    with pytest.raises(ConfigError) as info:
        load_join_file(out)
    err = info.value
    assert err.file == out and err.field == field and err.line is not None
    assert message in err.problem
    assert good.token not in str(err)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_join_file_readable_by_others_is_refused(ca_dir: Path, tmp_path: Path, mode: int) -> None:
    out = tmp_path / "h2.join"
    make_join(ca_dir, out)
    out.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_join_file(out)


def test_missing_join_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_join_file(tmp_path / "nope.join")
