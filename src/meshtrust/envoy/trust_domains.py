"""Envoy validation contexts for several trust domains (SPIFFE federation): pure functions.

A plain ``trusted_ca`` with the roots of several trust domains lets any of those roots vouch
for any identity: east's root could sign ``spiffe://west.test/...``. Envoy's SPIFFE
certificate validator (``envoy.tls.cert_validator.spiffe``) instead takes one trust bundle
per trust domain and accepts a peer only if its chain leads to the bundle of the trust
domain its SPIFFE ID names. These functions build that ``CertificateValidationContext``,
for a listener's or a cluster's TLS context, or for an SDS validation-context secret.

Envoy's SPIFFE validator ignores ``crl`` (REFERENCE.md), so the sidecars do not use it:
they validate each peer trust domain with Envoy's default validator, which honours CRLs, in
its own filter chain, chosen by the SNI the calling sidecar sends (:class:`PeerDomains`).

Peer trust domains by SNI
-------------------------
A sidecar calling an upstream of another trust domain sends SNI ``<own td>.peer.meshtrust``
(:func:`peer_sni`) and validates the upstream with SDS ``ROOTCA:<upstream td>``
(:func:`peer_root_secret`). The inbound listener has, for its TLS chains:

* the mesh chain (no SNI, or any other SNI): SDS ``ROOTCA`` -- the mesh's roots and CRLs.
  When federated bundles are held, the chain refuses callers of a federated trust domain:
  the mesh's roots never vouch for those.
* one chain per federated trust domain B (SNI ``B.peer.meshtrust``): SDS ``ROOTCA:B`` --
  B's roots and the CRLs B's CA publishes; the caller must be of B: B's roots never vouch
  for the mesh, an alias or another federated trust domain.
* one chain for other trust domains under the mesh's roots (shared root; SNI
  ``*.peer.meshtrust``): SDS ``ROOTCA~shared-root`` -- the mesh's roots, no CRL (the mesh
  does not hold the CRLs of another mesh's CA, and Envoy refuses a leaf whose issuer has
  no CRL once it has any); the caller must not be of the mesh's own trust domain, an alias
  or a federated one, so a revoked certificate of the mesh cannot pass here.

"Refuses" is twice over: at the handshake, by a URI SAN matcher on the chain's validation
context (a prefix, or for "none of these" an RE2 regex spelling out the complement,
:func:`not_trust_domains_regex`), which passes a certificate when *any* of its SANs
matches; and, for a forged certificate with several SANs, by a network RBAC DENY before
every other filter, which closes the connection when any SAN is of a refused trust domain
(:func:`deny_trust_domains_filter`; on a TCP chain Envoy has connected to the app by then,
so a server-first app may have sent its greeting).

A certificate is thus checked against a CRL whenever its issuer publishes one to the mesh,
whichever chain the caller picks by its SNI.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.errors import InvalidSpiffeId
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "PEER_ROOT_SECRET",
    "PEER_SNI_SUFFIX",
    "PeerDomains",
    "ROOT_SECRET",
    "SPIFFE_VALIDATOR",
    "deny_trust_domains_filter",
    "not_trust_domains_regex",
    "peer_root_secret",
    "peer_sni",
    "spiffe_validation_context",
    "trust_domain_of_root_secret",
]

#: SDS name of the mesh's own validation context (roots + CRLs), as istio-agent names it.
ROOT_SECRET = "ROOTCA"
#: SDS name of the validation context for other trust domains under the mesh's roots
#: (``~``: never the ``ROOTCA:<td>`` of a trust domain, whatever its name).
PEER_ROOT_SECRET = "ROOTCA~shared-root"
#: The SNI a calling sidecar sends is ``<its trust domain>.`` + this.
PEER_SNI_SUFFIX = "peer.meshtrust"


def peer_sni(caller: TrustDomain) -> str:
    """The SNI a sidecar of ``caller`` sends to an upstream of another trust domain."""
    return f"{caller.name}.{PEER_SNI_SUFFIX}"


def peer_root_secret(td: TrustDomain) -> str:
    """SDS name of the validation context for peers of ``td`` (``ROOTCA:<td>``)."""
    return f"{ROOT_SECRET}:{td.name}"


def trust_domain_of_root_secret(name: str) -> TrustDomain | None:
    """The trust domain a ``ROOTCA:<td>`` name is for; None for any other name (``ROOTCA``,
    :data:`PEER_ROOT_SECRET`, or a name that is not a trust domain)."""
    prefix = f"{ROOT_SECRET}:"
    if not name.startswith(prefix):
        return None
    try:
        return TrustDomain.parse(name[len(prefix) :])
    except InvalidSpiffeId:
        return None


@dataclass(frozen=True)
class PeerDomains:
    """Who a sidecar's peers may be: its own trust domain, that domain's aliases (treated as
    its own), and the federated trust domains whose bundles its agent holds."""

    own: TrustDomain
    aliases: tuple[TrustDomain, ...] = ()
    federated: tuple[TrustDomain, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "aliases", _unique(self.aliases))
        mine = {self.own, *self.aliases}
        object.__setattr__(
            self, "federated", _unique(td for td in self.federated if td not in mine)
        )

    def is_own(self, td: TrustDomain) -> bool:
        return td == self.own or td in self.aliases


def _unique(tds: Iterable[TrustDomain]) -> tuple[TrustDomain, ...]:
    return tuple(sorted(set(tds), key=lambda t: t.name))


_NETWORK_RBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"


def not_trust_domains_regex(tds: Sequence[TrustDomain]) -> str:
    """An RE2 regex (Envoy's ``safe_regex``, a whole-string match) for a SPIFFE ID whose
    trust domain is none of ``tds``: RE2 has no negative look-ahead, so the complement of
    the finite set of names is spelled out over their trie."""
    trie: dict[str, Any] = {}
    for td in tds:
        node = trie
        for char in td.name:
            node = node.setdefault(char, {})
        node[""] = {}  # the end of a name
    return f"spiffe://(?:{_not_in(trie, root=True)})/.*"


def _not_in(node: dict[str, Any], *, root: bool = False) -> str:
    """The names that leave the trie at ``node`` or end where no name of the set ends."""
    children = sorted(c for c in node if c)
    alternatives = []
    if not root and "" not in node:
        alternatives.append("")  # ends here: a proper prefix of a name, not a name
    excluded = "".join(re.escape(c) for c in children)
    alternatives.append(f"[^/{excluded}][^/]*")
    alternatives += [f"{re.escape(c)}(?:{_not_in(node[c])})" for c in children]
    return "|".join(alternatives)


def deny_trust_domains_filter(
    tds: Sequence[TrustDomain], *, stat_prefix: str
) -> dict[str, Any]:
    """A network RBAC filter that closes a connection whose peer's URI SAN is in one of
    ``tds`` (raises :class:`ValueError` for none)."""
    if not tds:
        raise ValueError("a trust-domain deny filter needs at least one trust domain")
    principals = [
        {"authenticated": {"principal_name": {"prefix": f"spiffe://{td.name}/"}}} for td in tds
    ]
    return {
        "name": "envoy.filters.network.rbac",
        "typed_config": {
            "@type": _NETWORK_RBAC,
            "stat_prefix": stat_prefix,
            "rules": {
                "action": "DENY",
                "policies": {
                    "foreign-trust-domain": {
                        "permissions": [{"any": True}],
                        "principals": principals,
                    }
                },
            },
        },
    }

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
