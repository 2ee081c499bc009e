"""When to renew, how long to back off, and what state a certificate slot is in.

Theory of operation. The agent holds one certificate slot::

    NONE --start--> ISSUING --issued--> VALID --deadline--> ROTATING --issued--> VALID
                      |  ^                                    |   ^
                      +--+ failed (back off, retry)           +---+ failed, still valid
                                                              |
                                                   NotAfter passed
                                                              v
                                   VALID <--issued-- EXPIRED --+ failed (retry, not ready)

While ROTATING the current certificate keeps being served: it is still valid, and traffic
must not stop because the CA is briefly away. Once it is EXPIRED the agent keeps it (what
Envoy or an open Workload API stream already holds is theirs: nothing is taken back) but
hands it out to nobody anew (:mod:`meshtrust.agent.handout`), and says so loudly:
readiness goes false, an error is logged once, the expiry metric turns negative and the
files are marked ``EXPIRED``.

All functions here are pure: time and randomness come in as arguments.
"""

from __future__ import annotations

import datetime as dt
import enum

__all__ = [
    "SlotEvent",
    "SlotState",
    "backoff_delay",
    "check_rotation",
    "next_state",
    "rotation_deadline",
]


class SlotState(enum.StrEnum):
    NONE = "none"
    ISSUING = "issuing"
    VALID = "valid"
    ROTATING = "rotating"
    EXPIRED = "expired"


class SlotEvent(enum.StrEnum):
    START = "start"
    ISSUED = "issued"
    FAILED = "failed"
    DEADLINE = "deadline"
    EXPIRED = "expired"


_TRANSITIONS: dict[tuple[SlotState, SlotEvent], SlotState] = {
    (SlotState.NONE, SlotEvent.START): SlotState.ISSUING,
    (SlotState.ISSUING, SlotEvent.ISSUED): SlotState.VALID,
    (SlotState.ISSUING, SlotEvent.FAILED): SlotState.ISSUING,
    (SlotState.VALID, SlotEvent.DEADLINE): SlotState.ROTATING,
    (SlotState.VALID, SlotEvent.EXPIRED): SlotState.EXPIRED,
    (SlotState.ROTATING, SlotEvent.ISSUED): SlotState.VALID,
    (SlotState.ROTATING, SlotEvent.FAILED): SlotState.ROTATING,
    (SlotState.ROTATING, SlotEvent.EXPIRED): SlotState.EXPIRED,
    (SlotState.EXPIRED, SlotEvent.ISSUED): SlotState.VALID,
    (SlotState.EXPIRED, SlotEvent.FAILED): SlotState.EXPIRED,
    (SlotState.EXPIRED, SlotEvent.DEADLINE): SlotState.EXPIRED,
}


def next_state(state: SlotState, event: SlotEvent) -> SlotState:
    """The slot's state after ``event``; raises ValueError for a transition that cannot be."""
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"no transition from {state} on {event}") from None


def check_rotation(ratio: float, jitter: float) -> None:
    """Refuse a ratio outside (0, 1) or a jitter that could push the fraction past 0 or 1.

    Raises ValueError whose message names the flags (``rotation-ratio``, ``rotation-jitter``).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"rotation-ratio must be between 0 and 1, got {ratio}")
    margin = min(ratio, 1.0 - ratio)
    if not 0.0 <= jitter < margin:
        raise ValueError(
            f"rotation-jitter must be >= 0 and below {margin:g} for ratio {ratio:g}, got {jitter}"
        )


def rotation_deadline(
    not_after: dt.datetime,
    received_at: dt.datetime,
    ratio: float = 0.5,
    jitter: float = 0.01,
    rand: float = 0.0,
) -> dt.datetime:
    """When to start renewing a certificate.

    ``NotAfter − (ratio + jitter × rand) × lifetime``, where lifetime is NotAfter minus the
    moment the agent *received* the certificate — not NotBefore, which the CA backdates by
    2 minutes (from NotBefore a 20-second certificate would look 140 s long, and be renewed
    without pause). ``rand`` in [-1, 1] spreads a fleet's renewals; the fraction is kept
    within [0, 1], so the deadline is never before receipt nor after expiry.
    """
    if not -1.0 <= rand <= 1.0:
        raise ValueError("rand must be within [-1, 1]")
    lifetime = max(not_after - received_at, dt.timedelta(0))
    fraction = min(1.0, max(0.0, ratio + jitter * rand))
    return not_after - lifetime * fraction


def backoff_delay(
    attempt: int,
    base: float = 0.5,
    cap: float = 60.0,
    jitter: float = 0.1,
    rand: float = 0.0,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    Exponential from ``base`` doubling up to ``cap`` (0.5, 1, 2, 4, ... 60 s, as istio-agent),
    spread by ``±jitter`` × ``rand`` (``rand`` in [-1, 1]) so agents that lost the CA together
    do not return together.
    """
    if attempt < 0:
        raise ValueError("attempt must not be negative")
    delay = min(cap, base * (2.0 ** min(attempt, 62)))
    return max(0.0, delay * (1.0 + jitter * rand))
