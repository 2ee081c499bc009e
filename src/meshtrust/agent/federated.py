"""Federated trust domains' bundles in the agent: verified, then served as one generation.

Theory of operation. Every ``TrustUpdate`` on the CA's trust stream carries the
``federated`` map (:mod:`meshtrust.ca.federated_push`): trust domain name -> DER roots and
``spiffe_sequence``, whole each time. :func:`verify_federated` (pure) decides what the
agent holds next, trust domain by trust domain:

- the name must be a trust domain, and not the mesh's own (the mesh's roots come only
  from the mesh bundle);
- every root must be a parsable CA certificate, not expired, not repeated, and must not
  name another trust domain (a ``spiffe://`` URI SAN or a meshtrust root's O): a bundle
  for trust domain B only vouches for B. These are the bundle document's checks
  (:func:`meshtrust.spiffe.bundle.parse_bundle_document`), run again on what arrived.

A refused trust domain keeps the bundle held for it before (logged, counted); a trust
domain the CA no longer sends is dropped (``bundle delete``, or federation ended). When
the result differs from what is held, :meth:`SecretCache.publish_federated` makes it one
new generation: the Workload API's ``federated_bundles`` (and ``X509BundlesResponse``),
``federated/<td>.pem`` and SDS ``ROOTCA:<td>``, the validation context of the sidecar's
filter chain for callers of that trust domain (:mod:`meshtrust.envoy.trust_domains`).

Revocation. Envoy's ``envoy.tls.cert_validator.spiffe`` does not read the ``crl`` of the
validation context (REFERENCE.md), so it is not used: each trust domain is validated by
Envoy's default validator in its own filter chain, and ``ROOTCA`` (the mesh's own) keeps
the mesh CA's CRLs whatever federated bundles are held. A federated trust domain whose CA
publishes CRLs with its bundle (a meshtrust CA does) gets them in ``ROOTCA:<td>``, each
checked against its issuer and the issuer against the bundle; they are enforced only while
every root of the bundle has a CRL issuer under it (Envoy refuses a leaf whose issuer has
no CRL once it holds any), and one past its nextUpdate is left out.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshtrust.agent.cache import SecretCache
from meshtrust.errors import MeshTrustError, SvidVerificationError
from meshtrust.pki import certs_pem
from meshtrust.spiffe import TrustDomain
from meshtrust.spiffe.bundle import (
    SpiffeBundle,
    bundle_document,
    check_revocation,
    issuer_roots,
    parse_bundle_document,
)

__all__ = [
    "FEDERATED",
    "FederatedIntake",
    "FederatedRoots",
    "FederatedVerdict",
    "federated_der",
    "federated_pem",
    "nobody_root",
    "verify_federated",
    "write_federated_dir",
]

log = logging.getLogger("meshtrust.agent")

#: Trust domain -> its roots (possibly none: every authority of it revoked).
FederatedRoots = Mapping[TrustDomain, tuple[x509.Certificate, ...]]
_DER = serialization.Encoding.DER


#: Trust domain -> the CRLs its CA publishes with its bundle (verified).
FederatedCrls = Mapping[TrustDomain, tuple[x509.CertificateRevocationList, ...]]
#: What the CA sends per trust domain besides the roots: (CRLs, their issuers), DER.
SentRevocation = Mapping[str, tuple[Sequence[bytes], Sequence[bytes]]]


@dataclass(frozen=True)
class FederatedVerdict:
    """What to hold after one update, and what was refused (one message per trust domain)."""

    held: dict[TrustDomain, tuple[x509.Certificate, ...]]
    refused: tuple[str, ...]
    crls: dict[TrustDomain, tuple[x509.CertificateRevocationList, ...]] = field(
        default_factory=dict
    )


def _crls(
    td: TrustDomain,
    roots: Sequence[x509.Certificate],
    sent: tuple[Sequence[bytes], Sequence[bytes]] | None,
    now: dt.datetime,
) -> tuple[x509.CertificateRevocationList, ...]:
    """The CRLs sent for ``td``, each signed by a sent issuer that chains to ``roots``
    (:func:`~meshtrust.spiffe.bundle.check_revocation`); one past its nextUpdate is left
    out (Envoy would refuse every leaf of its issuer). Raises :class:`SvidVerificationError`."""
    if sent is None:
        return ()
    crl_ders, issuer_ders = sent
    try:
        issuers, crls = check_revocation(td, roots, issuer_ders, crl_ders)
    except MeshTrustError as exc:
        raise SvidVerificationError(f"its CRLs: {exc}") from None
    fresh = [c for c in crls if c.next_update_utc is None or c.next_update_utc > now]
    # Envoy refuses a leaf whose issuer has no CRL once it holds any: enforce them only
    # while every root has an issuer under it that has a fresh CRL (a new root whose CA has
    # not published yet, a CA outside meshtrust, an expired CRL: none, until covered).
    with_crl = [i for i in issuers if any(c.issuer == i.subject for c in fresh)]
    covered = {r for r in issuer_roots(roots, with_crl) if r is not None}
    if not fresh or any(root not in covered for root in roots):
        return ()
    return tuple(fresh)


def _roots(
    td: TrustDomain, roots_der: Sequence[bytes], now: dt.datetime
) -> tuple[x509.Certificate, ...]:
    certs: list[x509.Certificate] = []
    for i, der in enumerate(roots_der, 1):
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise SvidVerificationError(f"root {i} is not a DER certificate") from None
        if cert.not_valid_after_utc <= now:
            raise SvidVerificationError(
                f"root {i} ({cert.subject.rfc4514_string()}) expired at "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
            )
        if cert in certs:
            raise SvidVerificationError(f"root {i} is repeated")
        certs.append(cert)
    # The bundle document's checks: CA certificates, none naming another trust domain.
    try:
        parse_bundle_document(bundle_document(SpiffeBundle(td, tuple(certs))), td, source="it")
    except MeshTrustError as exc:
        raise SvidVerificationError(str(exc).removeprefix(f"it (trust domain {td}): ")) from None
    return tuple(certs)


def verify_federated(
    sent: Mapping[str, Sequence[bytes]],
    own: TrustDomain,
    held: FederatedRoots,
    now: dt.datetime,
    revocation: SentRevocation | None = None,
    held_crls: FederatedCrls | None = None,
) -> FederatedVerdict:
    """The federated bundles to hold after the CA sent ``sent`` (name -> DER roots) and
    ``revocation`` (name -> its CRLs and their issuers), given those ``held``: each trust
    domain checked alone (module docstring); a refused one keeps its held bundle and CRLs
    (or stays absent)."""
    out: dict[TrustDomain, tuple[x509.Certificate, ...]] = {}
    crls: dict[TrustDomain, tuple[x509.CertificateRevocationList, ...]] = {}
    refused: list[str] = []
    for name in sorted(sent):
        try:
            td = TrustDomain.parse(name)
        except MeshTrustError as exc:
            refused.append(f"federated bundle {name!r}: not a trust domain ({exc})")
            continue
        if td == own:
            refused.append(
                f"federated bundle for {td}: that is this mesh's own trust domain "
                "(its roots come from the mesh bundle only)"
            )
            continue
        try:
            roots = _roots(td, sent[name], now)
            crls[td] = _crls(td, roots, (revocation or {}).get(name), now)
            out[td] = roots
        except SvidVerificationError as exc:
            refused.append(f"federated bundle of {td}: {exc}")
            crls.pop(td, None)
            if td in held:
                out[td] = tuple(held[td])
                if held_crls and td in held_crls:
                    crls[td] = held_crls[td]
    return FederatedVerdict(out, tuple(refused), {td: c for td, c in crls.items() if c})


def same_roots(a: FederatedRoots, b: FederatedRoots) -> bool:
    """Whether ``a`` and ``b`` hold the same trust domains with the same roots (in order)."""
    return dict(a) == dict(b)


def federated_pem(roots: Sequence[x509.Certificate]) -> bytes:
    return certs_pem(roots) if roots else b""


def federated_der(federated: FederatedRoots) -> dict[str, bytes]:
    """The Workload API's map: ``spiffe://<td>`` -> DER roots concatenated."""
    return {
        td.id_string(): b"".join(c.public_bytes(_DER) for c in roots)
        for td, roots in sorted_items(federated)
    }


class FederatedIntake:
    """Hands the ``federated`` map of each trust-stream update on to ``cache`` (verified);
    a refusal is logged once while it repeats and counted in :attr:`refused`."""

    def __init__(self, cache: SecretCache) -> None:
        self._cache = cache
        self._problems: tuple[str, ...] = ()
        self.refused = 0

    async def offer(
        self,
        sent: Mapping[str, Sequence[bytes]],
        now: dt.datetime,
        revocation: SentRevocation | None = None,
    ) -> bool:
        """True when the federated bundles served changed (a new generation)."""
        secret = self._cache.current
        if secret is None:  # the follower starts after the first certificate
            return False
        verdict = verify_federated(
            sent,
            secret.trust_domain,
            self._cache.federated,
            now,
            revocation,
            self._cache.federated_crls,
        )
        if verdict.refused:
            self.refused += 1
            if verdict.refused != self._problems:
                for problem in verdict.refused:
                    log.error("refusing %s; keeping the last good one", problem)
        self._problems = verdict.refused
        if same_roots(verdict.held, self._cache.federated) and _same_crls(
            verdict.crls, self._cache.federated_crls
        ):
            return False
        await self._cache.publish_federated(verdict.held, verdict.crls)
        log.info(
            "federated bundles: %s",
            ", ".join(
                f"{td} ({len(r)} root(s), {len(verdict.crls.get(td, ()))} CRL(s))"
                for td, r in sorted_items(verdict.held)
            )
            or "none",
        )
        return True


def _same_crls(a: FederatedCrls, b: FederatedCrls) -> bool:
    def ders(m: FederatedCrls) -> dict[TrustDomain, tuple[bytes, ...]]:
        return {td: tuple(c.public_bytes(_DER) for c in crls) for td, crls in m.items()}

    return ders(a) == ders(b)


def sorted_items(
    federated: FederatedRoots,
) -> list[tuple[TrustDomain, tuple[x509.Certificate, ...]]]:
    return sorted(federated.items(), key=lambda i: i[0].name)


#: The directory of federated bundles in the agent's output directory (``federated/<td>.pem``).
FEDERATED = "federated"


def write_federated_dir(
    directory: Path, federated: FederatedRoots, write: Callable[[Path, bytes, int], None]
) -> None:
    """Create ``directory`` (0700, as every directory meshtrust makes; the files in it are
    public certificates, 0644) with ``<td>.pem`` per federated trust domain (its roots, PEM;
    empty when it has none), each written by ``write(path, data, mode)``."""
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)
    for td, roots in sorted_items(federated):
        write(directory / f"{td.name}.pem", federated_pem(roots), 0o644)


@functools.cache
def nobody_root() -> x509.Certificate:
    """A CA certificate whose key was dropped the moment it was made: the roots of a
    validation context that must trust nobody (a federated trust domain held without
    roots). Envoy would read empty roots as "verify nothing"."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshtrust: trusts nobody")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=36500))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
