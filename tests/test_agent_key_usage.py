"""The agent says once, at start, that its CA has no KeyUsage extension (issue 8, defect 16):
the article's root (``openssl req -x509``) plugged in as signing CA, or an intermediate made
without one. Accepted, as Istio, Envoy and OpenSSL accept it — one warning, not one per
rotation."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from meshtrust.agent.build import build_agent
from meshtrust.agent.config import AgentConfig
from meshtrust.clock import FakeClock
from meshtrust.spiffe import SpiffeId, TrustDomain
from tests import badcerts
from tests.fake_ca import FakeClockCa

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "default", "web")
TTL = dt.timedelta(hours=1)


def _article_ca() -> badcerts.CaFixture:
    return badcerts.root_without_key_usage(now=T0)


def _intermediate() -> badcerts.CaFixture:
    return badcerts.intermediate_without_key_usage(TD, now=T0)


def _with_key_usage() -> badcerts.CaFixture:
    return badcerts.make_ca(TD, now=T0)


async def _warnings_over_rotations(
    tmp_path: Path, ca: badcerts.CaFixture, caplog: pytest.LogCaptureFixture, rotations: int = 4
) -> list[str]:
    """Start an agent on ``ca``, let it rotate ``rotations`` times, stop it; the agent's
    warnings about KeyUsage."""
    (tmp_path / "root-cert.pem").write_bytes(badcerts.cert_pem(ca.root))
    config = AgentConfig(
        ca_root=tmp_path / "root-cert.pem",
        trust_domain=TD,  # the article's root names none in its O (My-Organization)
        namespace="default",
        service_account="web",
        cert_ttl=TTL,
        output_dir=tmp_path / "certs",
        status_listen=None,
    )
    clock = FakeClock(T0)
    source = FakeClockCa(clock, ca, WEB)
    agent = build_agent(config, clock=clock, source=source)
    caplog.set_level(logging.WARNING, logger="meshtrust.agent")
    await agent.start()
    try:
        secret = await agent.cache.wait_newer(0)
        for _ in range(rotations):
            await clock.wait_for_sleepers(1)
            await clock.advance(TTL.total_seconds() * 0.6)  # past the half-life deadline
            secret = await agent.cache.wait_newer(secret.generation)
    finally:
        await agent.stop()
    assert source.calls == rotations + 1
    return [r.getMessage() for r in caplog.records if "KeyUsage" in r.getMessage()]


CASES: list[tuple[str, Callable[[], badcerts.CaFixture], str]] = [
    ("article's root as signing CA", _article_ca, "trusted root"),
    ("intermediate without KeyUsage", _intermediate, "issuing CA"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("make", "role"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_a_ca_without_key_usage_is_one_warning_not_one_per_rotation(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[], badcerts.CaFixture],
    role: str,
) -> None:
    ca = make()
    without = ca.signer.cert  # the one without KeyUsage: the root itself, or the intermediate
    (warning,) = await _warnings_over_rotations(tmp_path, ca, caplog)
    assert warning.startswith(role)
    assert without.subject.rfc4514_string() in warning
    assert "has no KeyUsage extension" in warning and "keyCertSign" in warning


@pytest.mark.asyncio
async def test_the_articles_root_is_named_with_the_file_it_came_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (warning,) = await _warnings_over_rotations(tmp_path, _article_ca(), caplog, rotations=1)
    assert "O=My-Organization,CN=My-Cluster-CA" in warning
    assert str(tmp_path / "root-cert.pem") in warning


@pytest.mark.asyncio
async def test_a_ca_with_key_usage_gets_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert await _warnings_over_rotations(tmp_path, _with_key_usage(), caplog, rotations=1) == []
