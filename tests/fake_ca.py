"""A CA for agent tests: signs CSRs with a test CA (:mod:`tests.badcerts`) at a fake clock's
time, answering as meshtrust's CA does."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from meshtrust.clock import FakeClock
from meshtrust.pki import certs_pem, issue_leaf, parse_csr
from meshtrust.spiffe import SpiffeId
from tests.badcerts import CaFixture


def signed_chain(
    ca: CaFixture, csr_pem: str, identity: SpiffeId, now: dt.datetime, ttl_seconds: int
) -> list[str]:
    """The CA's answer to ``csr_pem``, one PEM string each: a leaf for ``identity`` valid from
    ``now``, the intermediates (none when the signer is the root itself), the root."""
    leaf = issue_leaf(
        ca.signer, parse_csr(csr_pem).public_key, identity, now, dt.timedelta(seconds=ttl_seconds)
    )
    between = [] if ca.signer.cert == ca.root else [ca.signer.cert]
    return [certs_pem([c]).decode() for c in (leaf, *between, ca.root)]


@dataclass
class FakeClockCa:
    """A :class:`~meshtrust.agent.issuance.CertificateSource` that signs every CSR for
    ``identity`` with ``ca`` at ``clock``'s time, counting its calls."""

    clock: FakeClock
    ca: CaFixture
    identity: SpiffeId
    calls: int = 0

    async def sign(
        self,
        csr_pem: str,
        *,
        ttl_seconds: int,
        token: str | None,
        client_cert: tuple[bytes, bytes] | None,
    ) -> list[str]:
        self.calls += 1
        return signed_chain(self.ca, csr_pem, self.identity, self.clock.now(), ttl_seconds)
