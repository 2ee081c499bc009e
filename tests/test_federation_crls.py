"""CRLs across federation: the bundle document's ``meshtrust_revocation`` member (emitted by
a meshtrust CA's bundle endpoint, checked by the poller and again by the agent), and what
the agent hands Envoy for a federated trust domain (SDS ``ROOTCA:<td>``). End to end across
hosts: tests/test_federation_sidecars_netns.py."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust.agent.federated import verify_federated
from meshtrust.agent.sds import secret_resource
from meshtrust.ca.crl import build_crl
from meshtrust.ca.federated_push import read_federated
from meshtrust.ca.federation import FederationStore, bundle_changed
from meshtrust.ca.ledger import SqlLedger
from meshtrust.ca.revocation import Revocation, RevocationState
from meshtrust.pki import format_serial
from meshtrust.pki.profile import Signer
from meshtrust.spiffe import TrustDomain
from meshtrust.spiffe.bundle import (
    MAX_REVOCATION_ITEMS,
    REVOCATION_MEMBER,
    InvalidBundle,
    SpiffeBundle,
    bundle_document,
    parse_bundle_document,
)
from tests.badcerts import CaFixture, make_ca
from tests.test_workload_api import make_secret

EAST, WEST = TrustDomain.parse("east.test"), TrustDomain.parse("west.test")
NOW = dt.datetime(2026, 12, 2, 10, 0, tzinfo=dt.UTC)
DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def west() -> CaFixture:
    return make_ca(WEST, now=NOW)


@pytest.fixture(scope="module")
def east() -> CaFixture:
    return make_ca(EAST, now=NOW)


def crl(
    signer: Signer, *serials: int, next_update: dt.timedelta = dt.timedelta(hours=24)
) -> x509.CertificateRevocationList:
    """The CA's own CRL builder, signed a minute before NOW, next update ``next_update``
    after NOW (negative: stale)."""
    signed = NOW - dt.timedelta(minutes=1)
    revoked = {
        format_serial(n): Revocation(format_serial(n), "", x509.ReasonFlags.key_compromise, signed)
        for n in serials
    }
    return build_crl(signer, RevocationState(1, revoked), signed, next_update + (NOW - signed))


def bundle(ca: CaFixture, *crls: x509.CertificateRevocationList) -> SpiffeBundle:
    return SpiffeBundle(
        ca.trust_domain, (ca.root,), sequence=3, crls=crls, crl_issuers=(ca.signer.cert,)
    )


def b64(item: x509.Certificate | x509.CertificateRevocationList) -> str:
    return base64.b64encode(item.public_bytes(DER)).decode()


def test_the_document_carries_the_crls_and_reads_back_the_same(west: CaFixture) -> None:
    revoked = crl(west.signer, 7)
    made = bundle(west, revoked)
    doc = json.loads(bundle_document(made))
    assert set(doc[REVOCATION_MEMBER]) == {"issuers", "crls"}
    back = parse_bundle_document(bundle_document(made), WEST)
    assert back.crls == (revoked,) and back.crl_issuers == (west.signer.cert,)
    assert back.same_revocation(made) and back.same_authorities(made)
    # Without revocation the document is the standard one, as before.
    plain = SpiffeBundle(WEST, (west.root,), sequence=3)
    assert REVOCATION_MEMBER not in json.loads(bundle_document(plain))
    # A new revocation at the peer (same roots, same sequence) is a change to store and push.
    assert bundle_changed(made, bundle(west, crl(west.signer, 7, 8)))
    assert not bundle_changed(made, back)


def _with(doc_bundle: SpiffeBundle, member: object) -> bytes:
    doc = json.loads(bundle_document(doc_bundle))
    doc[REVOCATION_MEMBER] = member
    return json.dumps(doc).encode()


def test_bad_revocation_members_refuse_the_whole_document(
    west: CaFixture, east: CaFixture
) -> None:
    base = SpiffeBundle(WEST, (west.root,), sequence=3)
    good_issuer, good_crl = b64(west.signer.cert), b64(crl(west.signer))
    cases = {
        "must be an object": [],
        "must be a list": {"issuers": "x", "crls": []},
        "not base64": {"issuers": ["%%"], "crls": []},
        "not a DER certificate": {"issuers": [base64.b64encode(b"junk").decode()], "crls": []},
        # east's intermediate: not issued by west's root
        "issuers.0.: not issued by an authority": {"issuers": [b64(east.signer.cert)]},
        "not a DER CRL": {"issuers": [good_issuer], "crls": [good_issuer]},
        # a CRL made with east's key under west's issuer name
        "not signed by one of the listed issuers": {
            "issuers": [good_issuer],
            "crls": [b64(crl(Signer(west.signer.cert, east.signer.key)))],
        },
        "a second CRL of one issuer": {"issuers": [good_issuer], "crls": [good_crl, good_crl]},
        f"at most {MAX_REVOCATION_ITEMS}": {
            "issuers": [good_issuer] * (MAX_REVOCATION_ITEMS + 1),
            "crls": [],
        },
    }
    for message, member in cases.items():
        with pytest.raises(InvalidBundle, match=message):
            parse_bundle_document(_with(base, member), WEST)
    # West's root itself is not an issuer under west's root (a CA, but self-signed by
    # another key would not chain): a leaf-signing CA must chain to a bundle authority.
    stranger = make_ca(WEST, now=NOW)
    with pytest.raises(InvalidBundle, match="not issued by an authority of the bundle"):
        parse_bundle_document(_with(base, {"issuers": [b64(stranger.signer.cert)]}), WEST)


def test_the_agent_keeps_good_crls_drops_expired_ones_and_keeps_the_last_good_on_garbage(
    west: CaFixture, east: CaFixture
) -> None:
    roots = {"west.test": [west.root.public_bytes(DER)]}
    issuers = (west.signer.cert.public_bytes(DER),)
    good = crl(west.signer, 7)
    sent = {"west.test": ((good.public_bytes(DER),), issuers)}
    verdict = verify_federated(roots, EAST, {}, NOW, sent)
    assert verdict.refused == () and verdict.crls == {WEST: (good,)}
    # Past its nextUpdate: left out (Envoy would refuse every leaf of its issuer).
    stale = crl(west.signer, 7, next_update=dt.timedelta(seconds=-1))
    verdict = verify_federated(
        roots, EAST, {}, NOW, {"west.test": ((stale.public_bytes(DER),), issuers)}
    )
    assert verdict.refused == () and verdict.crls == {} and WEST in verdict.held
    # Signed by the wrong key: refused; the held roots and CRLs stay.
    forged = crl(Signer(west.signer.cert, east.signer.key), 7, 8)
    verdict = verify_federated(
        roots,
        EAST,
        {WEST: (west.root,)},
        NOW,
        {"west.test": ((forged.public_bytes(DER),), issuers)},
        {WEST: (good,)},
    )
    assert len(verdict.refused) == 1 and "its CRLs" in verdict.refused[0]
    assert verdict.held == {WEST: (west.root,)} and verdict.crls == {WEST: (good,)}


def test_sds_hands_envoy_the_federated_trust_domains_crls_in_its_own_context(
    west: CaFixture, east: CaFixture
) -> None:
    revoked = crl(west.signer, 7)
    secret = dataclasses.replace(
        make_secret(east), federated={WEST: (west.root,)}, federated_crls={WEST: (revoked,)}
    )
    context = secret_resource("ROOTCA:west.test", secret).validation_context
    assert x509.load_pem_x509_certificates(context.trusted_ca.inline_bytes) == [west.root]
    assert x509.load_pem_x509_crl(context.crl.inline_bytes) == revoked
    assert context.only_verify_leaf_cert_crl
    # Never in the mesh's own context.
    own = secret_resource("ROOTCA", secret).validation_context
    assert west.root.public_bytes(serialization.Encoding.PEM) not in own.trusted_ca.inline_bytes
    assert revoked.public_bytes(serialization.Encoding.PEM) not in own.crl.inline_bytes


def test_crls_are_not_enforced_while_a_root_has_no_crl_issuer_under_it(
    west: CaFixture,
) -> None:
    """A second root (west's rotation in its first phase, or a root added by hand) with no
    issuer publishing a CRL under it: Envoy would refuse every leaf it signs, so west's CRLs
    are left out until every root is covered."""
    other = make_ca(WEST, now=NOW)
    der = [west.root.public_bytes(DER), other.root.public_bytes(DER)]
    issuers = (west.signer.cert.public_bytes(DER),)
    sent = {"west.test": ((crl(west.signer, 7).public_bytes(DER),), issuers)}
    verdict = verify_federated({"west.test": der}, EAST, {}, NOW, sent)
    assert verdict.refused == () and verdict.crls == {}
    assert verdict.held == {WEST: (west.root, other.root)}
    # Its intermediate published (the rotation's next phase): enforced again.
    both = (*issuers, other.signer.cert.public_bytes(DER))
    crls = (crl(west.signer, 7).public_bytes(DER), crl(other.signer).public_bytes(DER))
    verdict = verify_federated({"west.test": der}, EAST, {}, NOW, {"west.test": (crls, both)})
    assert verdict.refused == () and len(verdict.crls[WEST]) == 2


def test_the_ca_stops_pushing_a_federated_crl_past_its_next_update(
    tmp_path: Path, west: CaFixture
) -> None:
    """The CA's periodic read of the ledger is the timer: a CRL the peer stopped renewing
    (its endpoint down) leaves the push at its nextUpdate, and the agents drop it."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    SqlLedger(url).close()
    store = FederationStore(url)
    try:
        store.save(bundle(west, crl(west.signer, 7)), "static: t", NOW)
        fresh = read_federated(store.engine, EAST, NOW)
        stale = read_federated(store.engine, EAST, NOW + dt.timedelta(hours=25))
    finally:
        store.close()
    assert len(fresh.bundles[WEST].crls) == 1 and stale.bundles[WEST].crls == ()
    assert fresh.digest != stale.digest  # a change: pushed to every agent
    assert stale.bundles[WEST].x509_authorities == (west.root,)
