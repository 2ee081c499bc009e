"""Whether the agent may hand out what it holds: never an expired certificate anew.

Theory of operation
-------------------
The cache keeps the last certificate even after it expires (what Envoy already holds is
Envoy's; the agent does not take it back). But every output that hands a certificate out
*anew* -- a Workload API fetch, a new SDS subscription for ``default``, a file reader --
first asks :func:`handout`, a pure function of the secret and the time:

* the certificate is valid (``now < NotAfter``): hand it out;
* it has expired (``now >= NotAfter``; at NotAfter exactly it counts as expired, as for
  readiness and the rotator: a certificate handed out at its last instant is expired by
  the time anyone uses it): a :class:`Refusal` naming the identity, the serial, when it
  expired and why the agent has no newer one (the rotator's last error, or that the CA has
  not answered). The refusal's :attr:`~Refusal.message` is what the Workload API answers
  (UNAVAILABLE), what the ``EXPIRED`` marker file says and what ``/debug/status`` shows; it
  holds no key, token or certificate.

The trusted roots are not the workload's certificate: :func:`bundle_handout` serves them
while at least one root is valid, whatever the leaf's state, so a workload can keep
verifying its peers while its own certificate waits for the CA.

:class:`HandoutGate` binds the rule to the agent's clock and rotator, so the servers only
ask ``gate(secret)`` and move bytes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from meshtrust.agent.cache import WorkloadSecret
from meshtrust.clock import Clock, SystemClock

__all__ = ["HandoutGate", "Refusal", "bundle_handout", "handout"]

#: What the refusal says when the rotator has no error to report (e.g. a call still pending).
NO_ANSWER = "the CA has not answered"


def _utc(moment: dt.datetime) -> str:
    return f"{moment.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"


@dataclass(frozen=True)
class Refusal:
    """Why a certificate is not handed out: it expired and no fresh one has come."""

    what: str  # "certificate" or "trusted roots"
    spiffe_id: str
    serial_hex: str
    not_after: dt.datetime
    reason: str  # the rotator's last error, or NO_ANSWER

    @property
    def message(self) -> str:
        """One paragraph a person can act on (no secrets)."""
        if self.what == "trusted roots":
            return (
                f"every trusted root for {self.spiffe_id} expired (the last at "
                f"{_utc(self.not_after)}); the agent needs new roots from its CA "
                f"(last error: {self.reason})"
            )
        return (
            f"the certificate for {self.spiffe_id} (serial {self.serial_hex}) expired at "
            f"{_utc(self.not_after)} and the agent could not renew it: {self.reason}. "
            "It keeps retrying; check that the CA is reachable and the token valid"
        )

    def marker_text(self) -> str:
        """The ``EXPIRED`` marker file's content: the message, then one ``key: value`` per
        line for scripts."""
        return (
            f"{self.message}\n"
            f"spiffe_id: {self.spiffe_id}\n"
            f"serial: {self.serial_hex}\n"
            f"not_after: {_utc(self.not_after)}\n"
            f"reason: {self.reason}\n"
        )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def handout(
    secret: WorkloadSecret, now: dt.datetime, last_error: str | None = None
) -> WorkloadSecret | Refusal:
    """``secret`` if its certificate may be handed out at ``now``, else a :class:`Refusal`.

    Expired means ``now >= NotAfter``. ``last_error`` is why renewal failed (the rotator's
    last error); None says the CA has not answered.
    """
    if not secret.expired(now):
        return secret
    return Refusal(
        what="certificate",
        spiffe_id=str(secret.spiffe_id),
        serial_hex=secret.serial_hex,
        not_after=secret.not_after,
        reason=_one_line(last_error or NO_ANSWER),
    )


def bundle_handout(
    secret: WorkloadSecret, now: dt.datetime, last_error: str | None = None
) -> WorkloadSecret | Refusal:
    """``secret`` if its trusted roots may be handed out at ``now``: while any root is valid
    (an expired leaf does not matter). A :class:`Refusal` once every root has expired."""
    if not secret.roots or any(now < root.not_valid_after_utc for root in secret.roots):
        return secret
    return Refusal(
        what="trusted roots",
        spiffe_id=str(secret.spiffe_id),
        serial_hex=secret.serial_hex,
        not_after=max(root.not_valid_after_utc for root in secret.roots),
        reason=_one_line(last_error or NO_ANSWER),
    )


class HandoutGate:
    """:func:`handout` and :func:`bundle_handout` at ``clock``'s time, with the reason from
    ``last_error`` (the rotator's). What the servers are given instead of a clock."""

    def __init__(
        self,
        clock: Clock | None = None,
        last_error: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._clock = clock or SystemClock()
        self._last_error = last_error

    def now(self) -> dt.datetime:
        return self._clock.now()

    def __call__(self, secret: WorkloadSecret) -> WorkloadSecret | Refusal:
        return handout(secret, self._clock.now(), self._last_error())

    def bundle(self, secret: WorkloadSecret) -> WorkloadSecret | Refusal:
        return bundle_handout(secret, self._clock.now(), self._last_error())
