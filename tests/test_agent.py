"""The agent against the real CA on loopback: first certificate, files, CA outages."""

from __future__ import annotations

import datetime as dt
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.agent.build import build_agent
from meshtrust.agent.cache import WorkloadSecret
from meshtrust.agent.config import AgentConfig, identity_from_token, resolve_identity
from meshtrust.agent.files import NAMES, CertificateFiles
from meshtrust.agent.rotation import SlotState
from meshtrust.errors import ConfigError
from meshtrust.pki import format_serial
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests import badcerts
from tests.conftest import TD, RunningCa, serve_ca
from tests.processes import free_port
from tests.waiting import async_until

WEB = SpiffeId.for_workload(TD, "default", "web")


def _config(ca_dir: Path, tmp_path: Path, address: str, **extra: object) -> AgentConfig:
    settings: dict[str, object] = {
        "ca_root": ca_dir / "root-cert.pem",
        "ca_address": address,
        "token_file": tmp_path / "token",
        "output_dir": tmp_path / "certs",
        "status_listen": None,
        **extra,
    }
    return AgentConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_first_certificate_is_verified_recorded_and_written(
    running_ca: RunningCa, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text(running_ca.token())
    agent = build_agent(_config(running_ca.ca_dir, tmp_path, running_ca.address))
    assert agent.identity == WEB  # taken from the token's claims
    await agent.start()
    try:
        await async_until(agent.ready)
        secret = agent.cache.current
        assert secret is not None
        out = tmp_path / "certs"
        await async_until(lambda: all((out / name).exists() for name in NAMES))
        assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
        leaf = x509.load_pem_x509_certificates((out / "cert-chain.pem").read_bytes())[0]
        key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
        assert leaf.public_key() == key.public_key()
        assert (out / "root-cert.pem").read_bytes() == running_ca.root_pem
        assert format_serial(leaf.serial_number) == secret.serial_hex
        assert secret.serial_hex in running_ca.ledger.serials()
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_ca_down_at_start_then_ready_when_it_appears(ca_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "token").write_text(_token(ca_dir))
    agent = build_agent(_config(ca_dir, tmp_path, f"127.0.0.1:{port}"))
    await agent.start()
    try:
        await async_until(lambda: agent.metrics.rotations_failed >= 2)
        assert not agent.ready()
        assert agent.rotator.state == SlotState.ISSUING
        async with serve_ca(ca_dir, port):
            await async_until(agent.ready)
        assert agent.metrics.rotations_ok == 1
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_ca_down_during_rotation_keeps_serving_then_recovers(
    ca_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    (tmp_path / "token").write_text(_token(ca_dir))
    # 8 s certificates: renewal due 4 s after receipt.
    agent = build_agent(
        _config(ca_dir, tmp_path, f"127.0.0.1:{port}", cert_ttl=dt.timedelta(seconds=8))
    )
    await agent.start()
    try:
        async with serve_ca(ca_dir, port):
            await async_until(agent.ready)
        first = agent.cache.current
        assert first is not None
        # CA gone: the deadline passes, renewals fail, the certificate is still served.
        await async_until(lambda: agent.metrics.rotations_failed >= 2)
        assert agent.cache.current is first and agent.ready()
        assert agent.rotator.state == SlotState.ROTATING
        async with serve_ca(ca_dir, port):
            await async_until(lambda: agent.cache.current is not first)
        current = agent.cache.current
        assert current is not None and current.serial_hex != first.serial_hex
        assert agent.rotator.state.value == SlotState.VALID.value  # (no stale narrowing)
    finally:
        await agent.stop()


def _token(ca_dir: Path) -> str:
    from meshtrust.ca import load_token_signing_key, mint_token, token_issuer_for
    from meshtrust.clock import SystemClock

    key = load_token_signing_key(ca_dir)
    assert key is not None
    return mint_token(
        key, token_issuer_for(TD), "default", "web", SystemClock().now(), dt.timedelta(hours=1)
    )


# --- identity and configuration ------------------------------------------------------------


def test_identity_from_flags_token_and_root(ca_dir: Path) -> None:
    token = _token(ca_dir)
    assert identity_from_token(token) == ("default", "web")
    cfg = AgentConfig(ca_root=ca_dir / "root-cert.pem", output_dir=Path("x"))
    assert resolve_identity(cfg, token, TD) == WEB
    flags = AgentConfig(
        ca_root=Path("r"),
        output_dir=Path("x"),
        namespace="shop",
        service_account="db",
        trust_domain=TrustDomain.parse("corp.example"),
    )
    assert str(resolve_identity(flags, None, None)) == "spiffe://corp.example/ns/shop/sa/db"


@pytest.mark.parametrize(
    ("settings", "token", "message"),
    [
        ({"namespace": "default", "service_account": "db"}, "valid", "the token is for"),
        ({}, None, "which workload is this?"),
        ({}, "opaque-token", "not a JWT"),
        ({"namespace": "a/b", "service_account": "x"}, None, "namespace"),
    ],
)
def test_identity_problems_are_clear(
    ca_dir: Path, settings: dict[str, str], token: str | None, message: str
) -> None:
    cfg = AgentConfig(ca_root=Path("r"), output_dir=Path("x"), **settings)  # type: ignore[arg-type]
    real = _token(ca_dir) if token == "valid" else token
    with pytest.raises(ConfigError, match=message):
        resolve_identity(cfg, real, TD)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "nothing to serve"),
        ({"output_dir": Path("x"), "rotation_ratio": 1.5}, "rotation-ratio"),
        ({"output_dir": Path("x"), "rotation_jitter": 0.6}, "rotation-jitter"),
        ({"output_dir": Path("x"), "ca_address": "nowhere"}, "HOST:PORT"),
        ({"output_dir": Path("x"), "cert_ttl": dt.timedelta(0)}, "cert-ttl"),
    ],
)
def test_bad_agent_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig(ca_root=Path("r"), **settings)  # type: ignore[arg-type]


# --- files ---------------------------------------------------------------------------------


def _secret(ca: badcerts.CaFixture, generation: int) -> WorkloadSecret:
    leaf = badcerts.svid_leaf(ca.signer, WEB)
    return WorkloadSecret(
        spiffe_id=WEB,
        key=leaf.key,
        chain=tuple(leaf.chain),
        roots=(ca.root,),
        received_at=badcerts.NOW,
        generation=generation,
    )


def test_file_rotation_is_atomic_for_readers(tmp_path: Path) -> None:
    ca = badcerts.make_ca("example.org")
    secrets = [_secret(ca, n) for n in range(1, 41)]
    files = CertificateFiles(tmp_path / "out")
    files.prepare()
    files.write(secrets[0])
    problems: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        out = tmp_path / "out"
        while not stop.is_set():
            # A pair through one resolution of ..data always matches ...
            data = out / os.readlink(out / "..data")
            try:
                chain = (data / "cert-chain.pem").read_bytes()
                key = (data / "key.pem").read_bytes()
            except FileNotFoundError:
                continue  # a generation two swaps old was removed; try again
            leaf = x509.load_pem_x509_certificates(chain)[0]
            private = serialization.load_pem_private_key(key, None)
            if leaf.public_key() != private.public_key():
                problems.append("mismatched pair")
            # ... and the plain names never show a partial file.
            plain = (out / "cert-chain.pem").read_bytes()
            if not plain.rstrip().endswith(b"-----END CERTIFICATE-----"):
                problems.append("partial file")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for secret in secrets[1:]:
            files.write(secret)
    finally:
        stop.set()
        thread.join()
    assert problems == []
    out = tmp_path / "out"
    gens = sorted(p.name for p in out.iterdir() if p.name.startswith("..gen-"))
    assert len(gens) == 2  # the current and the previous generation only
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    final = x509.load_pem_x509_certificates((out / "cert-chain.pem").read_bytes())[0]
    assert final == secrets[-1].leaf
