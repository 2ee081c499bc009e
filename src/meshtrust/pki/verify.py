"""X.509-SVID verification against a trust bundle.

Path building and signature checks are ``cryptography.x509.verification``'s (the client
verifier, which accepts a leaf whose only SAN is a URI); on top of it we apply the X.509-SVID
rules of the SPIFFE standard that a general-purpose verifier does not know.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509 import verification as xv

from meshtrust.errors import InvalidSpiffeId, SvidVerificationError
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "TrustBundle",
    "VerifiedSvid",
    "ca_extension_policy",
    "check_svid_leaf",
    "cas_without_key_usage",
    "verify_svid",
]


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The root certificates trusted for one trust domain."""

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.roots:
            raise ValueError("a trust bundle needs at least one root certificate")


@dataclass(frozen=True, slots=True)
class VerifiedSvid:
    spiffe_id: SpiffeId
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # leaf first, trust anchor last


def check_svid_leaf(leaf: x509.Certificate) -> SpiffeId:
    """Apply the X.509-SVID leaf rules and return the leaf's SPIFFE ID.

    Exactly one URI SAN that is a valid SPIFFE ID; BasicConstraints CA=false; KeyUsage with
    digitalSignature and without keyCertSign/cRLSign. Raises :class:`SvidVerificationError`.
    """
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SvidVerificationError(
            "leaf has no subjectAltName (an SVID needs one URI SAN)"
        ) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SvidVerificationError(f"leaf must have exactly one URI SAN, has {len(uris)}")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise SvidVerificationError(f"leaf URI SAN is not a SPIFFE ID: {exc}") from exc
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise SvidVerificationError("leaf is a CA certificate (BasicConstraints CA=true)")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise SvidVerificationError("leaf has no KeyUsage extension") from None
    if not ku.digital_signature:
        raise SvidVerificationError("leaf KeyUsage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise SvidVerificationError("leaf KeyUsage must not include keyCertSign or cRLSign")
    return spiffe_id


def _key_usage_allows_signing(
    _policy: xv.Policy, _cert: x509.Certificate, key_usage: x509.KeyUsage | None
) -> None:
    if key_usage is not None and not key_usage.key_cert_sign:
        raise ValueError("the CA's KeyUsage does not allow keyCertSign")


def ca_extension_policy() -> xv.ExtensionPolicy:
    """The Web PKI rules for CA certificates, except that KeyUsage may be absent.

    ``openssl req -x509`` makes a CA without KeyUsage (the custom CA of Istio's guides);
    Istio, Envoy and OpenSSL accept it, ``cryptography``'s defaults do not. When KeyUsage is
    present it must allow keyCertSign. :func:`cas_without_key_usage` finds such CAs, to warn.
    """
    return xv.ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.KeyUsage, xv.Criticality.AGNOSTIC, _key_usage_allows_signing
    )


def cas_without_key_usage(certs: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The CA certificates among ``certs`` that have no KeyUsage extension."""
    out = []
    for cert in certs:
        try:
            cert.extensions.get_extension_for_class(x509.KeyUsage)
        except x509.ExtensionNotFound:
            out.append(cert)
    return out


def _extension_policies() -> tuple[xv.ExtensionPolicy, xv.ExtensionPolicy]:
    ca = ca_extension_policy()
    # SVIDs carry EKU serverAuth+clientAuth; either is fine for either direction.
    ee = xv.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, None
    )
    return ca, ee


def verify_svid(
    chain: Sequence[x509.Certificate],
    bundle: TrustBundle,
    at: dt.datetime,
) -> VerifiedSvid:
    """Verify an X.509-SVID chain (leaf first) against ``bundle`` at time ``at``.

    The leaf must satisfy :func:`check_svid_leaf`, chain to one of the bundle's roots through
    the given intermediates, be valid at ``at``, and belong to the bundle's trust domain.
    Raises :class:`SvidVerificationError` saying what failed.
    """
    if not chain:
        raise SvidVerificationError("empty certificate chain")
    leaf, intermediates = chain[0], list(chain[1:])
    spiffe_id = check_svid_leaf(leaf)
    if not spiffe_id.member_of(bundle.trust_domain):
        raise SvidVerificationError(f"{spiffe_id} is not in trust domain {bundle.trust_domain}")
    if at < leaf.not_valid_before_utc:
        nb = leaf.not_valid_before_utc
        raise SvidVerificationError(
            f"certificate is not yet valid (NotBefore {nb:%Y-%m-%d %H:%M:%SZ})"
        )
    if at > leaf.not_valid_after_utc:
        raise SvidVerificationError(
            f"certificate expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    ca_policy, ee_policy = _extension_policies()
    verifier = (
        xv.PolicyBuilder()
        .store(xv.Store(list(bundle.roots)))
        .time(at)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except xv.VerificationError as exc:
        raise SvidVerificationError(
            f"chain does not verify against the trust bundle: {exc}"
        ) from exc
    return VerifiedSvid(spiffe_id=spiffe_id, leaf=leaf, chain=tuple(verified.chain))
