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
the mesh CA's CRLs whatever federated bundles are held.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshtrust.agent.cache import SecretCache
from meshtrust.errors import MeshTrustError, SvidVerificationError
from meshtrust.pki import certs_pem
from meshtrust.spiffe import TrustDomain
from meshtrust.spiffe.bundle import SpiffeBundle, bundle_document, parse_bundle_document

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


@dataclass(frozen=True)
class FederatedVerdict:
    """What to hold after one update, and what was refused (one message per trust domain)."""

    held: dict[TrustDomain, tuple[x509.Certificate, ...]]
    refused: tuple[str, ...]


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
) -> FederatedVerdict:
    """The federated bundles to hold after the CA sent ``sent`` (name -> DER roots), given
    those ``held``: each trust domain checked alone (module docstring); a refused one keeps
    its held bundle (or stays absent)."""
    out: dict[TrustDomain, tuple[x509.Certificate, ...]] = {}
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
            out[td] = _roots(td, sent[name], now)
        except SvidVerificationError as exc:
            refused.append(f"federated bundle of {td}: {exc}")
            if td in held:
                out[td] = tuple(held[td])
    return FederatedVerdict(out, tuple(refused))


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

    async def offer(self, sent: Mapping[str, Sequence[bytes]], now: dt.datetime) -> bool:
        """True when the federated bundles served changed (a new generation)."""
        secret = self._cache.current
        if secret is None:  # the follower starts after the first certificate
            return False
        verdict = verify_federated(sent, secret.trust_domain, self._cache.federated, now)
        if verdict.refused:
            self.refused += 1
            if verdict.refused != self._problems:
                for problem in verdict.refused:
                    log.error("refusing %s; keeping the last good one", problem)
        self._problems = verdict.refused
        if same_roots(verdict.held, self._cache.federated):
            return False
        await self._cache.publish_federated(verdict.held)
        log.info(
            "federated bundles: %s",
            ", ".join(f"{td} ({len(r)} root(s))" for td, r in sorted_items(verdict.held)) or "none",
        )
        return True


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
