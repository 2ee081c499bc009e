"""The agent's one in-memory secret cache, which every output (SDS, Workload API, files)
serves from.

A :class:`WorkloadSecret` is immutable; the cache swaps whole secrets and bumps a generation
number, so a reader always sees a key with its own certificate. Servers wait for the next
generation with :meth:`SecretCache.wait_newer` instead of polling.

The CA's CRLs (one per live issuing CA) travel with the secret: the cache holds the last
verified ones
(:meth:`SecretCache.publish_crl`, from :mod:`meshtrust.agent.crl`) and stamps it on every
secret it publishes, so a new CRL is a new generation that SDS (``ROOTCA``), the Workload API
and the files pick up like a rotation, and a rotation never drops the CRL.

The mesh's trust bundle travels the same way (:meth:`SecretCache.publish_bundle`, from
:mod:`meshtrust.agent.trust`): once the CA has sent a verified bundle, every secret carries
its roots and version instead of the root the CA answered with, so SDS ``ROOTCA``, the
Workload API bundle and ``root-cert.pem``/``bundle.pem`` change in one generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.pki import PrivateKey, certs_pem, format_serial, private_key_pem
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = ["SecretCache", "WorkloadSecret"]


@dataclass(frozen=True)
class WorkloadSecret:
    """A workload's key, its verified certificate chain, and the trusted roots."""

    spiffe_id: SpiffeId
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf first, then intermediates; no root
    roots: tuple[x509.Certificate, ...]
    received_at: dt.datetime
    generation: int = 0
    crl: x509.CertificateRevocationList | None = None  # the active issuing CA's, verified
    #: The CRLs of the other live issuing CAs (prepared and old signing slots, the other
    #: root's intermediate during a root rotation), verified: Envoy needs the CRL of every
    #: issuer whose leaves it may see.
    other_crls: tuple[x509.CertificateRevocationList, ...] = ()
    bundle_version: int = 0  # the mesh bundle ``roots`` come from (0: the root file's)
    # Federated trust domains' roots (agent/federated.py); never mixed into ``roots``.
    federated: Mapping[TrustDomain, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    #: The CRLs federated trust domains' CAs publish with their bundles (verified).
    federated_crls: Mapping[TrustDomain, tuple[x509.CertificateRevocationList, ...]] = field(
        default_factory=dict
    )
    #: Trust domains federated earlier in this agent's life and dropped since: their peers
    #: are trusted by nobody (not by the mesh's roots, as another trust domain would be).
    dropped_federated: frozenset[TrustDomain] = frozenset()
    _pem: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial_hex(self) -> str:
        return format_serial(self.leaf.serial_number)

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def trust_domain(self) -> TrustDomain:
        return self.spiffe_id.trust_domain

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.not_after

    @property
    def crls(self) -> tuple[x509.CertificateRevocationList, ...]:
        """Every CRL this secret carries, the active issuer's first."""
        return () if self.crl is None else (self.crl, *self.other_crls)

    @property
    def revoked(self) -> bool:
        """Whether a CRL this secret carries from its leaf's issuer lists its own leaf."""
        serial = self.leaf.serial_number
        return any(
            c.issuer == self.leaf.issuer
            and c.get_revoked_certificate_by_serial_number(serial) is not None
            for c in self.crls
        )

    # The CRLs are not cached in ``_pem``: a secret re-stamped with new CRLs shares that dict.
    def crl_pem(self) -> bytes | None:
        """Every CRL, PEM, concatenated (Envoy's ``crl`` and ``crl.pem`` may hold several)."""
        if self.crl is None:
            return None
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.crls)

    def crl_der(self) -> bytes | None:
        """The active issuer's CRL, DER."""
        return None if self.crl is None else self.crl.public_bytes(serialization.Encoding.DER)

    def crls_der(self) -> tuple[bytes, ...]:
        """Every CRL, DER, one per element (Workload API ``X509SVIDResponse.crl``)."""
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in self.crls)

    # PEM/DER renderings, computed once per secret.
    def chain_pem(self) -> bytes:
        """Leaf and intermediates (what ``cert-chain.pem`` holds)."""
        return self._cached("chain", lambda: certs_pem(self.chain))

    def chain_with_root_pem(self) -> bytes:
        """Leaf, intermediates and roots concatenated (Istio's SDS ``default`` chain)."""
        return self._cached("chain+root", lambda: certs_pem((*self.chain, *self.roots)))

    def key_pem(self) -> bytes:
        return self._cached("key", lambda: private_key_pem(self.key))

    def roots_pem(self) -> bytes:
        return self._cached("roots", lambda: certs_pem(self.roots))

    def chain_der(self) -> bytes:
        """The X.509-SVID as the Workload API wants it: DER certificates concatenated."""
        return self._cached(
            "chain-der",
            lambda: b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain),
        )

    def key_der(self) -> bytes:
        """PKCS#8 DER private key (Workload API ``x509_svid_key``)."""
        return self._cached(
            "key-der",
            lambda: self.key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    def roots_der(self) -> bytes:
        return self._cached(
            "roots-der",
            lambda: b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.roots),
        )

    def _cached(self, name: str, make: object) -> bytes:
        value = self._pem.get(name)
        if value is None:
            assert callable(make)
            value = make()
            self._pem[name] = value
        return value


class SecretCache:
    """Holds the current :class:`WorkloadSecret`; wakes waiters when it changes."""

    def __init__(self) -> None:
        self._secret: WorkloadSecret | None = None
        self._crl: x509.CertificateRevocationList | None = None
        self._other_crls: tuple[x509.CertificateRevocationList, ...] = ()
        self._bundle: tuple[int, tuple[x509.Certificate, ...]] | None = None
        self._federated: Mapping[TrustDomain, tuple[x509.Certificate, ...]] = {}
        self._federated_crls: Mapping[TrustDomain, tuple[x509.CertificateRevocationList, ...]] = {}
        self._dropped_federated: frozenset[TrustDomain] = frozenset()
        self._generation = 0
        self._changed = asyncio.Condition()

    @property
    def current(self) -> WorkloadSecret | None:
        return self._secret

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def crl(self) -> x509.CertificateRevocationList | None:
        """The active issuing CA's CRL held."""
        return self._crl

    @property
    def crls(self) -> tuple[x509.CertificateRevocationList, ...]:
        """Every CRL held, the active issuer's first."""
        return () if self._crl is None else (self._crl, *self._other_crls)

    @property
    def bundle(self) -> tuple[int, tuple[x509.Certificate, ...]] | None:
        """The mesh bundle held (version, roots), verified by the follower; None before."""
        return self._bundle

    async def publish_bundle(
        self, version: int, roots: tuple[x509.Certificate, ...]
    ) -> WorkloadSecret | None:
        """Hold the bundle ``roots`` at ``version`` (verified by the caller) and, when there is
        a secret, republish it with those roots as a new generation; returns that secret."""
        async with self._changed:
            self._bundle = (version, roots)
            if self._secret is None:
                return None
            self._generation += 1
            self._secret = _with_bundle(self._secret, self._bundle, self._generation)
            self._changed.notify_all()
            return self._secret

    @property
    def federated(self) -> Mapping[TrustDomain, tuple[x509.Certificate, ...]]:
        """The federated bundles held (verified by :mod:`meshtrust.agent.federated`)."""
        return self._federated

    @property
    def federated_crls(self) -> Mapping[TrustDomain, tuple[x509.CertificateRevocationList, ...]]:
        """The federated trust domains' CRLs held (verified)."""
        return self._federated_crls

    async def publish_federated(
        self,
        federated: Mapping[TrustDomain, tuple[x509.Certificate, ...]],
        crls: Mapping[TrustDomain, tuple[x509.CertificateRevocationList, ...]] | None = None,
    ) -> WorkloadSecret | None:
        """Hold ``federated`` and, when there is a secret, republish it carrying them as a
        new generation; returns that secret."""
        async with self._changed:
            self._dropped_federated = (
                self._dropped_federated | (set(self._federated) - set(federated))
            ) - set(federated)
            self._federated = dict(federated)
            self._federated_crls = {td: c for td, c in (crls or {}).items() if td in federated}
            if self._secret is None:
                return None
            self._generation += 1
            self._secret = dataclasses.replace(
                self._secret,
                generation=self._generation,
                federated=self._federated,
                federated_crls=self._federated_crls,
                dropped_federated=self._dropped_federated,
            )
            self._changed.notify_all()
            return self._secret

    async def publish_crl(
        self,
        crl: x509.CertificateRevocationList,
        others: tuple[x509.CertificateRevocationList, ...] = (),
    ) -> WorkloadSecret | None:
        """Hold ``crl`` (the active issuer's) and ``others`` (the other live issuers'), all
        verified by the caller, and, when there is a secret, republish it carrying them as a
        new generation; returns that secret."""
        async with self._changed:
            self._crl, self._other_crls = crl, others
            if self._secret is None:
                return None
            self._generation += 1
            self._secret = dataclasses.replace(
                self._secret, generation=self._generation, crl=crl, other_crls=others
            )
            self._changed.notify_all()
            return self._secret

    async def publish(self, secret: WorkloadSecret) -> WorkloadSecret:
        """Make ``secret`` current (stamped with the next generation and the CRL held) and
        wake every waiter."""
        async with self._changed:
            self._generation += 1
            stamped = dataclasses.replace(
                secret,
                generation=self._generation,
                crl=self._crl,
                other_crls=self._other_crls,
                federated=self._federated,
                federated_crls=self._federated_crls,
                dropped_federated=self._dropped_federated,
            )
            if self._bundle is not None:
                stamped = _with_bundle(stamped, self._bundle, self._generation)
            self._secret = stamped
            self._changed.notify_all()
        return stamped

    async def wait_newer(self, generation: int) -> WorkloadSecret:
        """Return the first secret whose generation is above ``generation`` (wait for it)."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._secret is not None and self._generation > generation
            )
            assert self._secret is not None
            return self._secret


def _with_bundle(
    secret: WorkloadSecret, bundle: tuple[int, tuple[x509.Certificate, ...]], generation: int
) -> WorkloadSecret:
    """``secret`` carrying ``bundle``'s roots; renderings that include roots are redone."""
    version, roots = bundle
    kept = {k: v for k, v in secret._pem.items() if "root" not in k}
    return dataclasses.replace(
        secret, generation=generation, roots=roots, bundle_version=version, _pem=kept
    )
