"""Rotation timing and the rotator loop, on a fake clock: days of renewals in milliseconds."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from meshtrust.agent.cache import SecretCache
from meshtrust.agent.issuance import TokenFile
from meshtrust.agent.metrics import AgentMetrics
from meshtrust.agent.rotation import (
    SlotEvent,
    SlotState,
    backoff_delay,
    next_state,
    rotation_deadline,
)
from meshtrust.agent.rotator import RotationPolicy, Rotator
from meshtrust.clock import FakeClock
from meshtrust.errors import CAUnavailable
from meshtrust.metrics_text import TextRegistry
from meshtrust.pki import CLOCK_SKEW
from meshtrust.spiffe import SpiffeId
from tests import badcerts
from tests.fake_ca import signed_chain

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")


# --- the pure schedule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "ttl_s", "expected_after_receipt_s"),
    [(0.5, 86400, 43200), (0.5, 20, 10), (0.2, 3600, 2880), (0.8, 3600, 720)],
)
def test_deadline_is_ratio_of_the_lifetime_left_at_receipt(
    ratio: float, ttl_s: int, expected_after_receipt_s: int
) -> None:
    received = T0
    not_after = received + dt.timedelta(seconds=ttl_s)
    deadline = rotation_deadline(not_after, received, ratio=ratio, jitter=0.0)
    assert deadline == received + dt.timedelta(seconds=expected_after_receipt_s)


def test_backdated_not_before_does_not_shorten_the_schedule() -> None:
    # A 20 s certificate, NotBefore backdated 2 minutes: measured from NotBefore the agent
    # would renew immediately; measured from receipt it renews after 10 s.
    received = T0
    not_after = received + dt.timedelta(seconds=20)
    not_before = received - CLOCK_SKEW
    from_receipt = rotation_deadline(not_after, received, jitter=0.0)
    from_not_before = rotation_deadline(not_after, not_before, jitter=0.0)
    assert from_receipt == received + dt.timedelta(seconds=10)
    assert from_not_before < received  # what the rule avoids


@given(
    ratio=st.floats(0.05, 0.95),
    jitter=st.floats(0.0, 0.04),
    rand=st.floats(-1.0, 1.0),
    ttl=st.integers(1, 90 * 86400),
)
def test_jitter_stays_within_its_bounds(ratio: float, jitter: float, rand: float, ttl: int) -> None:
    not_after = T0 + dt.timedelta(seconds=ttl)
    deadline = rotation_deadline(not_after, T0, ratio, jitter, rand)
    lifetime = dt.timedelta(seconds=ttl)
    lo = not_after - lifetime * min(1.0, ratio + jitter) - dt.timedelta(microseconds=2)
    hi = not_after - lifetime * max(0.0, ratio - jitter) + dt.timedelta(microseconds=2)
    assert lo <= deadline <= hi
    assert T0 - dt.timedelta(microseconds=2) <= deadline <= not_after


def test_backoff_doubles_from_half_a_second_to_a_minute() -> None:
    assert [backoff_delay(n, jitter=0.0) for n in range(10)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        32.0,
        60.0,
        60.0,
        60.0,
    ]
    assert backoff_delay(10_000, jitter=0.0) == 60.0
    assert backoff_delay(3, jitter=0.1, rand=1.0) == pytest.approx(4.4)
    assert backoff_delay(3, jitter=0.1, rand=-1.0) == pytest.approx(3.6)


@pytest.mark.parametrize(
    ("state", "event", "after"),
    [
        (SlotState.NONE, SlotEvent.START, SlotState.ISSUING),
        (SlotState.ISSUING, SlotEvent.FAILED, SlotState.ISSUING),
        (SlotState.ISSUING, SlotEvent.ISSUED, SlotState.VALID),
        (SlotState.VALID, SlotEvent.DEADLINE, SlotState.ROTATING),
        (SlotState.ROTATING, SlotEvent.FAILED, SlotState.ROTATING),
        (SlotState.ROTATING, SlotEvent.EXPIRED, SlotState.EXPIRED),
        (SlotState.EXPIRED, SlotEvent.ISSUED, SlotState.VALID),
    ],
)
def test_slot_transitions(state: SlotState, event: SlotEvent, after: SlotState) -> None:
    assert next_state(state, event) == after


def test_impossible_transition_is_an_error() -> None:
    with pytest.raises(ValueError, match="no transition from none"):
        next_state(SlotState.NONE, SlotEvent.ISSUED)


# --- the rotator loop against a scripted CA -------------------------------------------------


@dataclass
class Call:
    at: dt.datetime
    token: str | None
    with_client_cert: bool


@dataclass
class ScriptedCa:
    """A CertificateSource that signs with a test CA, or misbehaves on request."""

    clock: FakeClock
    ca: badcerts.CaFixture
    mode: str = "ok"  # ok | down | wrong-identity | foreign-root
    calls: list[Call] = field(default_factory=list)

    async def sign(
        self,
        csr_pem: str,
        *,
        ttl_seconds: int,
        token: str | None,
        client_cert: tuple[bytes, bytes] | None,
    ) -> list[str]:
        now = self.clock.now()
        self.calls.append(Call(now, token, client_cert is not None))
        if self.mode == "down":
            raise CAUnavailable("CA at test unavailable (UNAVAILABLE): connection refused")
        ca, identity = self.ca, WEB
        if self.mode == "wrong-identity":
            identity = SpiffeId.parse("spiffe://example.org/ns/default/sa/admin")
        elif self.mode == "foreign-root":
            ca = badcerts.make_ca("example.org", now=now)
        return signed_chain(ca, csr_pem, identity, now, ttl_seconds)


@dataclass
class Harness:
    clock: FakeClock
    ca: ScriptedCa
    cache: SecretCache
    rotator: Rotator
    metrics: AgentMetrics
    token_path: Path
    task: asyncio.Task[None]

    async def settle(self) -> None:
        await self.clock.wait_for_sleepers(1)


def state_of(h: Harness) -> SlotState:
    # A call, so the type checker does not carry one assert's narrowing to the next.
    return h.rotator.state


@pytest_asyncio.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    clock = FakeClock(T0)
    test_ca = badcerts.make_ca("example.org", now=T0, lifetime=dt.timedelta(days=3650))
    ca = ScriptedCa(clock, test_ca)
    cache = SecretCache()
    metrics = AgentMetrics(TextRegistry(), lambda: None)
    token_path = tmp_path / "token"
    token_path.write_text("token-1\n")
    rotator = Rotator(
        identity=WEB,
        source=ca,
        token=TokenFile(token_path),
        anchors=test_ca.bundle,
        cache=cache,
        clock=clock,
        metrics=metrics,
        policy=RotationPolicy(cert_ttl=dt.timedelta(hours=24), ratio=0.5, jitter=0.01),
        rng=random.Random(7),
    )
    task = asyncio.create_task(rotator.run())
    h = Harness(clock, ca, cache, rotator, metrics, token_path, task)
    await h.settle()
    try:
        yield h
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_renews_at_half_life_for_days_of_simulated_time(harness: Harness) -> None:
    h = harness
    first = h.cache.current
    assert first is not None and state_of(h) == SlotState.VALID
    serials = [first.serial_hex]
    for _ in range(6):  # three simulated days
        await h.clock.advance(12 * 3600 + 15 * 60)
        await h.settle()
        current = h.cache.current
        assert current is not None
        serials.append(current.serial_hex)
    assert len(set(serials)) == 7
    times = [c.at for c in h.ca.calls]
    gaps = [(b - a).total_seconds() / 3600 for a, b in zip(times, times[1:], strict=False)]
    # Each renewal 12 h (± 1 % of 24 h) after the previous certificate arrived.
    assert all(11.75 <= g <= 12.25 for g in gaps), gaps
    assert h.metrics.rotations_ok == 7


@pytest.mark.asyncio
async def test_token_is_reread_and_current_cert_authenticates_renewals(harness: Harness) -> None:
    h = harness
    h.token_path.write_text("token-2\n")
    await h.clock.advance(13 * 3600)
    await h.settle()
    assert [c.token for c in h.ca.calls] == ["token-1", "token-2"]
    assert [c.with_client_cert for c in h.ca.calls] == [False, True]
    # A host whose one-time token is gone keeps its identity with its certificate.
    h.token_path.unlink()
    before = h.cache.current
    await h.clock.advance(13 * 3600)
    await h.settle()
    assert h.ca.calls[-1].token is None and h.ca.calls[-1].with_client_cert
    assert h.cache.current is not None and h.cache.current is not before


@pytest.mark.asyncio
async def test_ca_outage_keeps_serving_backs_off_and_recovers(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness
    first = h.cache.current
    assert first is not None
    h.ca.mode = "down"
    await h.clock.advance(12 * 3600 + 15 * 60)  # past the deadline: retries begin
    await h.clock.advance(130)
    await h.settle()
    assert state_of(h) == SlotState.ROTATING
    assert h.cache.current is first  # still served while valid
    failed = [c.at for c in h.ca.calls[1:]]
    gaps = [(b - a).total_seconds() for a, b in zip(failed, failed[1:], strict=False)]
    # 0.5, 1, 2, 4, ... seconds (± 10 %), capped at 60.
    expected = [0.5, 1, 2, 4, 8, 16, 32, 60]
    for gap, want in zip(gaps, expected, strict=False):
        assert want * 0.9 <= gap <= want * 1.1, gaps
    assert h.metrics.rotations_failed == len(failed)

    h.ca.mode = "ok"
    await h.clock.advance(61)
    await h.settle()
    assert state_of(h) == SlotState.VALID
    assert h.cache.current is not None and h.cache.current.serial_hex != first.serial_hex
    assert "still serving serial" in caplog.text


@pytest.mark.asyncio
async def test_expiry_is_loud_and_recovery_is_automatic(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness
    first = h.cache.current
    assert first is not None
    h.ca.mode = "down"
    caplog.set_level(logging.ERROR, logger="meshtrust.agent")
    await h.clock.advance(25 * 3600)  # the whole remaining lifetime and more
    await h.settle()
    assert state_of(h) == SlotState.EXPIRED
    assert h.cache.current is first  # still there (Envoy keeps it), but flagged
    assert first.expired(h.clock.now())
    expired_logs = [r for r in caplog.records if "CERTIFICATE EXPIRED" in r.getMessage()]
    assert len(expired_logs) == 1  # once, not on every retry
    h.ca.mode = "ok"
    await h.clock.advance(61)
    await h.settle()
    assert state_of(h) == SlotState.VALID
    current = h.cache.current
    assert current is not None and not current.expired(h.clock.now())


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["wrong-identity", "foreign-root"])
async def test_bad_ca_answers_are_refused_and_never_served(
    harness: Harness, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness
    first = h.cache.current
    assert first is not None
    h.ca.mode = mode
    await h.clock.advance(12 * 3600 + 15 * 60)
    await h.clock.advance(10)
    await h.settle()
    assert h.cache.current is first
    assert h.metrics.refused_responses >= 2
    assert state_of(h) == SlotState.ROTATING
    assert "refusing the CA's answer" in caplog.text
