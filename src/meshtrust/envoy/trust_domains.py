"""Envoy validation contexts for several trust domains (SPIFFE federation): pure functions.

A plain ``trusted_ca`` with the roots of several trust domains lets any of those roots vouch
for any identity: east's root could sign ``spiffe://west.test/...``. Envoy's SPIFFE
certificate validator (``envoy.tls.cert_validator.spiffe``) instead takes one trust bundle
per trust domain and accepts a peer only if its chain leads to the bundle of the trust
domain its SPIFFE ID names. These functions build that ``CertificateValidationContext``,
for a listener's or a cluster's TLS context, or for an SDS validation-context secret.

Envoy's SPIFFE validator ignores ``crl`` (REFERENCE.md): revocation for federated peers has
to come another way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = ["SPIFFE_VALIDATOR", "spiffe_validation_context"]

SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
_CONFIG_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
)


def _pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def spiffe_validation_context(
    bundles: Mapping[TrustDomain, Sequence[x509.Certificate]],
    *,
    accept: Sequence[SpiffeId] = (),
) -> dict[str, Any]:
    """A ``CertificateValidationContext`` trusting each trust domain's roots for that trust
    domain only (one ``trust_domains`` entry each, sorted by name), and, when ``accept`` is
    given, only peers whose URI SAN is one of those IDs (an outbound upstream's identity).

    Raises :class:`ValueError` for no trust domains or a trust domain without roots.
    """
    if not bundles:
        raise ValueError("a SPIFFE validation context needs at least one trust domain")
    entries = []
    for td in sorted(bundles, key=lambda t: t.name):
        roots = bundles[td]
        if not roots:
            raise ValueError(f"trust domain {td} has no roots")
        entries.append({"name": td.name, "trust_bundle": {"inline_string": _pem(roots)}})
    context: dict[str, Any] = {
        "custom_validator_config": {
            "name": SPIFFE_VALIDATOR,
            "typed_config": {"@type": _CONFIG_TYPE, "trust_domains": entries},
        }
    }
    if accept:
        context["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": str(spiffe_id)}} for spiffe_id in accept
        ]
    return context
