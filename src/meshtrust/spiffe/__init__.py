"""SPIFFE identities: IDs and trust domains, parsed as strictly as go-spiffe."""

from meshtrust.spiffe.ids import SpiffeId, TrustDomain

__all__ = ["SpiffeId", "TrustDomain"]
