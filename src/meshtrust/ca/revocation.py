"""Revocation: what is revoked and blocked, as every CA replica sees it.

Theory of operation. ``meshtrust ca revoke`` and ``ca unblock`` write straight into the
shared ledger (:meth:`meshtrust.ca.ledger.SqlLedger.revoke_serial` and friends), one
transaction holding both the audit line (who, when, why) and the revocation or block rows.
Nothing takes effect before that commit: a CA replica acts only on what it read from the
ledger. Every CA process (the single-process CA, or each worker) keeps a
:class:`RevocationState` and replaces it when the ledger's revision changes
(:class:`RevocationWatch`, one cheap ``SELECT`` every :data:`POLL_INTERVAL`): so a
revocation written by any replica, or by the CLI on any machine, is honoured by all within
that interval. Why the ledger rather than an admin API on the CA: PostgreSQL replicas share
it already, the CLI needs no credentials for a running CA, and a CA that was down when the
revocation was made still learns it at start.

The revision is a count of changes (revocation rows + block rows + lifted blocks): every
operation only adds rows or lifts a block once, so it only grows, with no counter row for
replicas to fight over.

The revoked set is the revocation rows plus every unexpired certificate of a blocked
identity. A replica that had not yet read the block may have signed one, or signed before
the block and committed after ``ca revoke`` looked; no revision change would ever bring
such a certificate into a CRL, so while a block is in force every replica's watch also
writes revocation rows for them (:meth:`~meshtrust.ca.ledger.SqlLedger.revoke_late`), and
the revision moves.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509

from meshtrust.clock import Clock
from meshtrust.errors import InvalidInput, LedgerError
from meshtrust.pki import format_serial
from meshtrust.spiffe import SpiffeId

__all__ = [
    "POLL_INTERVAL",
    "REASONS",
    "Block",
    "Revocation",
    "RevocationSource",
    "RevocationState",
    "RevocationWatch",
    "parse_reason",
    "parse_serial",
]

log = logging.getLogger("meshtrust.ca")

#: How often a CA process looks for a new revision in the ledger: the bound on how long a
#: revocation made elsewhere takes to be enforced by this process (and pushed to its agents).
POLL_INTERVAL = 1.0

#: RFC 5280 CRLReason names a leaf certificate may be revoked for. ``removeFromCRL`` is only
#: for delta CRLs and ``cACompromise``/``aACompromise`` name CA keys, so they are refused.
REASONS: Mapping[str, x509.ReasonFlags] = {
    flag.value: flag
    for flag in x509.ReasonFlags
    if flag
    not in (
        x509.ReasonFlags.remove_from_crl,
        x509.ReasonFlags.ca_compromise,
        x509.ReasonFlags.aa_compromise,
    )
}


def parse_reason(text: str) -> x509.ReasonFlags:
    """An RFC 5280 reason by its name (``keyCompromise``; also ``key-compromise`` and any
    case). Raises :class:`InvalidInput` naming the accepted ones."""
    wanted = text.replace("-", "").replace("_", "").lower()
    for name, flag in REASONS.items():
        if name.lower() == wanted:
            return flag
    raise InvalidInput(f"unknown revocation reason {text!r}; use one of: {', '.join(REASONS)}")


_HEX = re.compile(r"[0-9a-f]+")


def parse_serial(text: str) -> str:
    """A serial number in hex (``0x`` prefix, ``:`` separators and upper case accepted), in
    the ledger's form (:func:`meshtrust.pki.format_serial`). Raises :class:`InvalidInput`."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or len(cleaned) > 40 or not _HEX.fullmatch(cleaned):
        raise InvalidInput(
            f"serial {text[:60]!r} is not a hexadecimal serial number (up to 20 bytes), "
            "as `meshtrust ca certs list` shows it"
        )
    return format_serial(int(cleaned, 16))


@dataclass(frozen=True, slots=True)
class Revocation:
    serial: str
    spiffe_id: str
    reason: x509.ReasonFlags
    revoked_at: dt.datetime
    actor: str = ""
    why: str = ""


@dataclass(frozen=True, slots=True)
class Block:
    spiffe_id: str
    blocked_at: dt.datetime
    actor: str
    why: str


@dataclass(frozen=True)
class RevocationState:
    """What is revoked and blocked at one ledger revision. Pure: no I/O."""

    revision: int = 0
    revoked: Mapping[str, Revocation] = field(default_factory=dict)  # by serial
    blocked: Mapping[str, Block] = field(default_factory=dict)  # active blocks by SPIFFE ID

    def revocation(self, serial: str) -> Revocation | None:
        return self.revoked.get(serial)

    def block(self, identity: SpiffeId | str) -> Block | None:
        return self.blocked.get(str(identity))


class RevocationSource(Protocol):
    """What :class:`RevocationWatch` reads (a :class:`~meshtrust.ca.ledger.SqlLedger`)."""

    def revocation_revision(self) -> int: ...

    def revocation_state(self, now: dt.datetime) -> RevocationState: ...

    def revoke_late(self, now: dt.datetime) -> list[Revocation]: ...


class RevocationWatch:
    """Keeps :attr:`state` at the ledger's latest revision; run :meth:`run` as a task.

    ``on_change`` listeners are called (in the loop) with each new state, e.g. to re-sign
    the CRL. A ledger that cannot be read leaves the last state in force (logged once per
    failure streak): refusing every renewal because the ledger blinked would be worse.
    """

    def __init__(
        self, source: RevocationSource, clock: Clock, interval: float = POLL_INTERVAL
    ) -> None:
        self._source = source
        self._clock = clock
        self._interval = interval
        self.state = RevocationState()
        self._listeners: list[asyncio.Queue[RevocationState]] = []
        self._failing = False

    def load(self) -> RevocationState:
        """Read the current state now (synchronously: at start, before serving)."""
        self.state = self._source.revocation_state(self._clock.now())
        return self.state

    def subscribe(self) -> asyncio.Queue[RevocationState]:
        queue: asyncio.Queue[RevocationState] = asyncio.Queue()
        self._listeners.append(queue)
        return queue

    async def poll_once(self) -> bool:
        """Look for a new revision; True when the state changed."""
        try:
            if self.state.blocked:
                late = await asyncio.to_thread(self._source.revoke_late, self._clock.now())
                for r in late:
                    log.warning(
                        "revoked %s (serial %s): issued while its identity was blocked",
                        r.spiffe_id,
                        r.serial,
                    )
            revision = await asyncio.to_thread(self._source.revocation_revision)
            if revision == self.state.revision:
                self._failing = False
                return False
            state = await asyncio.to_thread(self._source.revocation_state, self._clock.now())
        except LedgerError as exc:
            if not self._failing:
                log.error("cannot read revocations from the ledger (keeping the last): %s", exc)
            self._failing = True
            return False
        self._failing = False
        self.state = state
        log.info(
            "revocations at revision %d: %d certificates revoked, %d identities blocked",
            state.revision,
            len(state.revoked),
            len(state.blocked),
        )
        for queue in self._listeners:
            queue.put_nowait(state)
        return True

    async def run(self) -> None:
        while True:
            await self._clock.sleep(self._interval)
            await self.poll_once()
