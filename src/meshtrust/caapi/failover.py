"""Which CA replica to ask, and when a failure means "ask another one" (pure).

Theory of operation. An agent may know several CA addresses (``--ca-address`` repeated), and
each may be a DNS name with several addresses (a Kubernetes headless Service, a round-robin
record). At every request the client resolves them all into :class:`Endpoint`\\ s, and
:meth:`FailoverPolicy.order` says in which order to try them:

- **sticky**: the endpoint that answered last comes first, as gRPC's ``pick_first`` stays on
  the subchannel it connected to. A CA replica that works keeps its clients; there is no
  fail-back when an earlier one returns (it would only move load for nothing);
- then the others, in the order configured (and, within a name, the resolver's order), as
  ``pick_first`` walks its address list. No shuffling: an operator reading the config can tell
  where an agent goes; spreading load is the Service's (or the DNS record's) business;
- at most :attr:`FailoverPolicy.max_tries` of them, so one attempt is bounded.

:meth:`FailoverPolicy.fails_over` judges each failure. Nothing answered, or the replica
said it is not serving (a :class:`FailureKind` or gRPC status in :data:`FAILS_OVER`, the
codes istio-agent retries): try the next endpoint. An *answer* about the request
(UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, and any code not known to be
transient) ends the attempt at once: replicas share one ledger and one signing CA and would
answer the same, and hopping would only send the token to every replica and multiply the
refusal.

All of this is one *attempt* in the rotator's sense (:mod:`meshtrust.agent.rotation`): the
rotation schedule and its backoff see a failure only when every endpoint tried failed, so a
replica dying costs no failed renewal.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FAILS_OVER", "Endpoint", "FailoverPolicy", "FailureKind"]


class FailureKind(enum.StrEnum):
    """Failures that are not a gRPC status: nothing answered."""

    RESOLVE = "RESOLVE"  # the name does not resolve
    CONNECTION = "CONNECTION"  # refused, reset, lost mid-call, HTTP/2 broken
    TLS = "TLS"  # handshake failed, or the certificate did not verify (no token was sent)
    TIMEOUT = "TIMEOUT"  # no answer within the per-try timeout


#: What makes the client try the next endpoint: every :class:`FailureKind`, and the gRPC
#: codes istio-agent retries (``security/pkg/nodeagent/caclient/retry.go``).
FAILS_OVER: frozenset[str] = frozenset(
    {
        *(k.value for k in FailureKind),
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "INTERNAL",
        "CANCELLED",
    }
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place to send a request: ``address`` as configured (``ca.mesh.test:15012``) and
    the ``host`` (an IP once resolved) and ``port`` to connect to."""

    address: str
    host: str
    port: int

    @property
    def name(self) -> str:
        """The host as configured: the name TLS verifies (or the IP literal given)."""
        return self.address.rpartition(":")[0].strip("[]")

    def __str__(self) -> str:
        return self.address if self.name == self.host else f"{self.address} ({self.host})"


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """Order of endpoints within one attempt, and which failures move on to the next."""

    max_tries: int = 8

    def __post_init__(self) -> None:
        if self.max_tries < 1:
            raise ValueError("max_tries must be at least 1")

    def order(self, candidates: Sequence[Endpoint], sticky: Endpoint | None) -> list[Endpoint]:
        """The endpoints to try, in order: ``sticky`` first if it is still a candidate, then
        the others as given; duplicates (same host and port) once; at most ``max_tries``."""
        seen: set[tuple[str, int]] = set()
        out: list[Endpoint] = []
        first = [sticky] if sticky is not None and sticky in candidates else []
        for ep in [*first, *candidates]:
            if (ep.host, ep.port) not in seen:
                seen.add((ep.host, ep.port))
                out.append(ep)
        return out[: self.max_tries]

    @staticmethod
    def fails_over(kind: str) -> bool:
        """True if a failure of ``kind`` (a :class:`FailureKind` or a gRPC status name) means
        "try the next endpoint"; False for an answer that would be the same anywhere."""
        return kind in FAILS_OVER
