"""No expired certificate is handed out anew: the pure rule (handout), and SDS's use of it
(SdsStream, table-driven, no sockets)."""

from __future__ import annotations

import datetime as dt

import pytest

from meshtrust.agent.cache import WorkloadSecret
from meshtrust.agent.handout import NO_ANSWER, Refusal, bundle_handout, handout
from meshtrust.agent.sds import DEFAULT_SECRET, ROOT_SECRET, SdsRequest, SdsStream
from meshtrust.spiffe import SpiffeId
from tests.badcerts import NOW, make_ca, svid_leaf

WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
TTL = dt.timedelta(hours=1)
US = dt.timedelta(microseconds=1)
CA = make_ca("example.org", now=NOW, lifetime=dt.timedelta(days=2))


def secret(generation: int = 1, *, start: dt.datetime = NOW) -> WorkloadSecret:
    leaf = svid_leaf(CA.signer, WEB, now=start, ttl=TTL)
    return WorkloadSecret(
        spiffe_id=WEB,
        key=leaf.key,
        chain=tuple(leaf.chain),
        roots=(CA.root,),
        received_at=start,
        generation=generation,
    )


S1 = secret(1)
EXPIRY = S1.not_after
CA_DOWN = "CA at 127.0.0.1:15012 unavailable (UNAVAILABLE): connection refused"


@pytest.mark.parametrize(
    ("now", "handed_out"),
    [
        (NOW, True),
        (EXPIRY - dt.timedelta(seconds=1), True),
        (EXPIRY - US, True),  # the last microsecond it may go out
        (EXPIRY, False),  # NotAfter exactly: expired, as for readiness and the rotator
        (EXPIRY + US, False),
        (EXPIRY + dt.timedelta(seconds=49), False),  # the "49 s expired"
        (EXPIRY + dt.timedelta(days=30), False),
    ],
)
def test_handout_refuses_from_not_after_on(now: dt.datetime, handed_out: bool) -> None:
    decision = handout(S1, now, CA_DOWN)
    assert (decision is S1) == handed_out
    assert isinstance(decision, Refusal) == (not handed_out)


@pytest.mark.parametrize(
    ("last_error", "reason"),
    [
        (CA_DOWN, CA_DOWN),
        (None, NO_ANSWER),
        ("line one\n  line two", "line one line two"),  # one line: it goes into a status
    ],
)
def test_refusal_says_who_when_and_why_and_nothing_secret(
    last_error: str | None, reason: str
) -> None:
    refusal = handout(S1, EXPIRY + dt.timedelta(seconds=49), last_error)
    assert isinstance(refusal, Refusal)
    message = refusal.message
    assert str(WEB) in message
    assert S1.serial_hex in message
    assert f"{EXPIRY:%Y-%m-%dT%H:%M:%SZ}" in message
    assert reason in message
    marker = refusal.marker_text()
    assert marker.startswith(message + "\n")
    assert f"not_after: {EXPIRY:%Y-%m-%dT%H:%M:%SZ}\n" in marker
    assert f"reason: {reason}\n" in marker
    for text in (message, marker):
        assert "PRIVATE KEY" not in text and "CERTIFICATE" not in text
        assert S1.key_pem().decode() not in text


@pytest.mark.parametrize(
    ("now", "served"),
    [
        (EXPIRY + dt.timedelta(seconds=49), True),  # the leaf expired; the roots did not
        (CA.root.not_valid_after_utc - US, True),
        (CA.root.not_valid_after_utc, False),  # every root expired
    ],
)
def test_bundles_are_served_while_a_root_is_valid(now: dt.datetime, served: bool) -> None:
    decision = bundle_handout(S1, now, CA_DOWN)
    assert (decision is S1) == served
    if not served:
        assert isinstance(decision, Refusal)
        assert "every trusted root" in decision.message and CA_DOWN in decision.message


# --- SDS: the per-stream state with the time given ------------------------------------------

AFTER = EXPIRY + dt.timedelta(seconds=49)


def _names(push: object) -> tuple[str, ...] | None:
    return None if push is None else push.names  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("names", "now", "answered"),
    [
        ((DEFAULT_SECRET,), EXPIRY - US, (DEFAULT_SECRET,)),
        ((DEFAULT_SECRET,), EXPIRY, None),  # waits, as for a first certificate
        ((DEFAULT_SECRET,), AFTER, None),
        ((ROOT_SECRET,), AFTER, (ROOT_SECRET,)),  # the roots are still served
        ((DEFAULT_SECRET, ROOT_SECRET), AFTER, (ROOT_SECRET,)),
    ],
)
def test_new_subscription_gets_no_expired_certificate(
    names: tuple[str, ...], now: dt.datetime, answered: tuple[str, ...] | None
) -> None:
    stream = SdsStream()
    assert _names(stream.on_request(SdsRequest(names), S1, now)) == answered


def test_waiting_subscription_gets_the_fresh_certificate_when_it_arrives() -> None:
    stream = SdsStream()
    assert stream.on_request(SdsRequest((DEFAULT_SECRET,)), S1, AFTER) is None
    fresh = secret(2, start=AFTER)
    push = stream.on_secret(fresh, AFTER)
    assert push is not None and push.names == (DEFAULT_SECRET,)
    assert (push.serial_hex, push.version_info) == (fresh.serial_hex, "2")


def test_what_envoy_holds_is_left_alone_and_a_resubscription_waits() -> None:
    stream = SdsStream()
    push = stream.on_request(SdsRequest((DEFAULT_SECRET,)), S1, NOW)
    assert push is not None
    # Envoy ACKs after the expiry (or re-sends the ACK): nothing is pushed or taken back.
    ack = SdsRequest((DEFAULT_SECRET,), push.version_info, push.nonce)
    assert stream.on_request(ack, S1, AFTER) is None
    # The same stream subscribes anew (no nonce): it now waits like a new one.
    assert stream.on_request(SdsRequest((DEFAULT_SECRET,)), S1, AFTER) is None
    fresh = secret(2, start=AFTER)
    again = stream.on_secret(fresh, AFTER)
    assert again is not None and again.serial_hex == fresh.serial_hex


def test_an_already_expired_generation_is_not_pushed_but_its_roots_are() -> None:
    stream = SdsStream()
    assert stream.on_request(SdsRequest((DEFAULT_SECRET, ROOT_SECRET)), S1, NOW) is not None
    other_ca = make_ca("example.org", now=NOW)
    leaf = svid_leaf(other_ca.signer, WEB, now=NOW, ttl=TTL)
    stale = WorkloadSecret(WEB, leaf.key, tuple(leaf.chain), (other_ca.root,), NOW, generation=2)
    push = stream.on_secret(stale, AFTER)
    assert push is not None and push.names == (ROOT_SECRET,)
