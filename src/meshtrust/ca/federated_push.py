"""Federated bundles onto the trust stream: what every CA replica pushes to its agents.

Theory of operation. The federation poller (:mod:`meshtrust.ca.federation`, one per CA
process that serves federation) and ``meshtrust bundle set|delete`` keep the last good
bundle of each federated trust domain in the ledger (``federated_bundles``, migration 5).
Every CA process that serves the trust stream follows that table with
:class:`FederatedWatch`: one small ``SELECT`` every :data:`POLL_INTERVAL`, so a change made
by any replica, by the poller of a supervisor, or by hand reaches every replica's streams
within about a second. :func:`federated_field` turns what it holds into the ``federated``
map of ``TrustUpdate`` (trust domain -> DER roots and ``spiffe_sequence``).

A ledger row that no longer parses is skipped (logged), never trusted; a ledger that cannot
be read keeps the last map (logged once per failure streak). The CA's own trust domain is
never in the map: a row for it (hand-written) is skipped too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from meshtrust.ca.schema import federated_bundles
from meshtrust.caapi.trust import trust_pb2
from meshtrust.clock import Clock
from meshtrust.errors import LedgerError, MeshTrustError
from meshtrust.spiffe import TrustDomain
from meshtrust.spiffe.bundle import SpiffeBundle, parse_bundle_document

__all__ = [
    "EMPTY",
    "POLL_INTERVAL",
    "FederatedSet",
    "FederatedWatch",
    "federated_field",
    "read_federated",
]

log = logging.getLogger("meshtrust.ca")

#: How often a CA process reads the federated bundles from the ledger.
POLL_INTERVAL = 1.0


@dataclass(frozen=True)
class FederatedSet:
    """The federated bundles a CA process holds, and a digest that changes with them."""

    bundles: Mapping[TrustDomain, SpiffeBundle]
    digest: str

    @staticmethod
    def of(bundles: Mapping[TrustDomain, SpiffeBundle]) -> FederatedSet:
        digest = hashlib.sha256()
        for td in sorted(bundles, key=lambda t: t.name):
            bundle = bundles[td]
            digest.update(td.name.encode() + b"\0" + str(bundle.sequence).encode() + b"\0")
            for root in bundle.x509_authorities:
                digest.update(
                    hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).digest()
                )
            digest.update(b"\1")
            ders = [c.public_bytes(serialization.Encoding.DER) for c in bundle.crls]
            ders += [c.public_bytes(serialization.Encoding.DER) for c in bundle.crl_issuers]
            for item in ders:  # a revocation at the peer changes only these
                digest.update(hashlib.sha256(item).digest())
            digest.update(b"\2")
        return FederatedSet(dict(bundles), digest.hexdigest())


EMPTY = FederatedSet.of({})


def read_federated(
    engine: Engine, own: TrustDomain, now: dt.datetime | None = None
) -> FederatedSet:
    """Every federated bundle in the ledger that still passes the bundle document checks,
    except one for ``own``; with ``now``, without the CRLs past their nextUpdate (the
    periodic read is then what drops a CRL the peer stopped renewing, and the change
    reaches the agents). Raises :class:`LedgerError`."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(federated_bundles.c.trust_domain, federated_bundles.c.document)
            ).all()
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read federated bundles: {exc.__class__.__name__}") from exc
    found: dict[TrustDomain, SpiffeBundle] = {}
    for name, document in rows:
        try:
            td = TrustDomain.parse(name)
            if td == own:
                raise LedgerError(f"a federated bundle for {own}, the CA's own trust domain")
            bundle = parse_bundle_document(document.encode(), td, source=f"ledger row {name}")
            if now is not None:
                fresh = tuple(
                    c for c in bundle.crls if c.next_update_utc is None or c.next_update_utc > now
                )
                bundle = dataclasses.replace(bundle, crls=fresh)
            found[td] = bundle
        except MeshTrustError as exc:
            log.warning("not pushing a stored federated bundle: %s", exc)
    return FederatedSet.of(found)


def federated_field(held: FederatedSet) -> dict[str, trust_pb2.FederatedBundle]:
    """The ``TrustUpdate.federated`` map for ``held``."""
    der = serialization.Encoding.DER
    return {
        td.name: trust_pb2.FederatedBundle(
            roots=[r.public_bytes(der) for r in bundle.x509_authorities],
            sequence=bundle.sequence or 0,
            crls=[c.public_bytes(der) for c in bundle.crls],
            crl_issuers=[c.public_bytes(der) for c in bundle.crl_issuers],
        )
        for td, bundle in held.bundles.items()
    }


class FederatedWatch:
    """Keeps :attr:`held` at the ledger's federated bundles; run :meth:`run` as a task."""

    def __init__(
        self, engine: Engine, own: TrustDomain, clock: Clock, interval: float = POLL_INTERVAL
    ) -> None:
        self._engine = engine
        self._own = own
        self._clock = clock
        self._interval = interval
        self.held = EMPTY
        self._changed = asyncio.Condition()
        self._failing = False

    def load(self) -> None:
        """Read the ledger now (at start, so the first update carries them)."""
        self.held = read_federated(self._engine, self._own, self._clock.now())

    async def wait_newer(self, digest: str) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held.digest != digest)

    async def poll_once(self) -> bool:
        try:
            found = await asyncio.to_thread(
                read_federated, self._engine, self._own, self._clock.now()
            )
        except LedgerError as exc:
            if not self._failing:
                log.error("cannot read federated bundles (keeping the last ones): %s", exc)
            self._failing = True
            return False
        self._failing = False
        if found.digest == self.held.digest:
            return False
        async with self._changed:
            self.held = found
            self._changed.notify_all()
        log.info(
            "federated bundles pushed to agents: %s",
            ", ".join(
                f"{td} (sequence {b.sequence}, {len(b.x509_authorities)} root(s))"
                for td, b in sorted(found.bundles.items(), key=lambda i: i[0].name)
            )
            or "none",
        )
        return True

    async def run(self) -> None:
        while True:
            await self._clock.sleep(self._interval)
            await self.poll_once()
