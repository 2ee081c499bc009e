"""Who is calling the CA: bearer tokens, client certificates, TTLs and the identity decision.

Tokens come from two issuers, as in a real deployment: the CA's own token issuer (ES256, key
made by ``init_ca_dir``) and a "Kubernetes cluster" with an RSA service-account signing key
(RS256/PS256), each trusted through its JWKS file. Time is always the ``now`` argument.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from meshtrust.ca import (
    Caller,
    CaPolicy,
    ClientCertAuthenticator,
    InvalidTTL,
    JwtAuthenticator,
    check_ttl,
    decide_identity,
    load_jwks_file,
)
from meshtrust.errors import AuthenticationError, InvalidCSR, PermissionDenied
from meshtrust.pki import format_serial, parse_csr
from meshtrust.spiffe import SpiffeId
from tests import badcerts
from tests.badcerts import NOW, CaFixture
from tests.jwt_issuers import (
    HOUR,
    LEEWAY,
    OTHER,
    SECOND,
    TD,
    WEB,
    Issuers,
    auth,
    intruder_key,
    issuers,
    sa_claims,
    ts,
)

__all__ = ["auth", "intruder_key", "issuers"]  # fixtures, from tests.jwt_issuers

# --- accepted tokens ------------------------------------------------------------------------

PROD_API = SpiffeId.for_workload(TD, "prod", "api")
SHOP_CART = SpiffeId.for_workload(TD, "shop", "cart")

ACCEPTED: list[tuple[str, Callable[[Issuers], str], SpiffeId, dt.datetime]] = [
    ("ES256-own-issuer", lambda i: i.own("default", "web"), WEB, NOW + HOUR),
    ("ES256-own-issuer-other-sa", lambda i: i.own("shop", "cart"), SHOP_CART, NOW + HOUR),
    ("RS256-cluster", lambda i: i.k8s(sa_claims("prod", "api")), PROD_API, NOW + HOUR),
    ("PS256-cluster", lambda i: i.k8s(sa_claims("prod", "api"), "PS256"), PROD_API, NOW + HOUR),
    ("RS512-cluster", lambda i: i.k8s(sa_claims(), "RS512"), WEB, NOW + HOUR),
    ("no-kid", lambda i: i.k8s(sa_claims(), kid=None), WEB, NOW + HOUR),
    ("aud-string", lambda i: i.k8s(sa_claims(aud="istio-ca")), WEB, NOW + HOUR),
    ("aud-among-others", lambda i: i.k8s(sa_claims(aud=["api", "istio-ca"])), WEB, NOW + HOUR),
    ("no-kubernetes.io-claim", lambda i: i.k8s(sa_claims(kubernetes_io=None)), WEB, NOW + HOUR),
    ("no-nbf", lambda i: i.k8s(sa_claims(nbf=None)), WEB, NOW + HOUR),
    ("short-lived", lambda i: i.k8s(sa_claims(ttl=600 * SECOND)), WEB, NOW + 600 * SECOND),
]


@pytest.mark.parametrize(
    ("make", "identity", "expires"),
    [pytest.param(make, ident, exp, id=name) for name, make, ident, exp in ACCEPTED],
)
def test_valid_tokens_authenticate_as_their_service_account(
    issuers: Issuers,
    auth: JwtAuthenticator,
    make: Callable[[Issuers], str],
    identity: SpiffeId,
    expires: dt.datetime,
) -> None:
    caller = auth.authenticate(make(issuers), NOW)
    assert caller.identity == identity
    assert caller.authenticator == "jwt"
    ns, sa = identity.istio_namespace, identity.istio_service_account
    assert caller.subject == f"system:serviceaccount:{ns}:{sa}"
    assert caller.expires == expires


# --- refused tokens -------------------------------------------------------------------------

REFUSED: list[tuple[str, Callable[[Issuers, rsa.RSAPrivateKey], str], str]] = [
    (
        "expired-beyond-leeway",
        lambda i, x: i.own(now=NOW - HOUR - LEEWAY - SECOND, ttl=HOUR),
        "token has expired",
    ),
    (
        "nbf-beyond-leeway",
        lambda i, x: i.k8s(sa_claims(nbf=ts(NOW + LEEWAY + SECOND))),
        r"not valid yet \(nbf in the future\)",
    ),
    (
        "minted-in-the-future",
        lambda i, x: i.own(now=NOW + HOUR),
        "not valid yet",
    ),
    ("wrong-audience", lambda i, x: i.own(audience="someone-else"), "audience is not 'istio-ca'"),
    ("no-audience", lambda i, x: i.k8s(sa_claims(aud=None)), "lacks the 'aud' claim"),
    ("no-exp", lambda i, x: i.k8s(sa_claims(exp=None)), "lacks the 'exp' claim"),
    (
        "unknown-issuer",
        lambda i, x: i.k8s(sa_claims(iss="https://evil.example.com"), key=x),
        "issuer 'https://evil.example.com' is not trusted",
    ),
    (
        "sub-not-a-service-account",
        lambda i, x: i.k8s(sa_claims(sub="system:node:worker-1", kubernetes_io=None)),
        "subject is not a service account",
    ),
    (
        "sub-user",
        lambda i, x: i.k8s(sa_claims(sub="alice@example.com", kubernetes_io=None)),
        "subject is not a service account",
    ),
    (
        "sub-without-sa",
        lambda i, x: i.k8s(sa_claims(sub="system:serviceaccount:default", kubernetes_io=None)),
        "subject is not system:serviceaccount:<ns>:<sa>",
    ),
    (
        "sub-with-extra-part",
        lambda i, x: i.k8s(sa_claims(sub="system:serviceaccount:a:b:c", kubernetes_io=None)),
        "subject is not system:serviceaccount:<ns>:<sa>",
    ),
    (
        "sub-names-an-invalid-identity",
        lambda i, x: i.k8s(sa_claims(sub="system:serviceaccount:default:we/b", kubernetes_io=None)),
        "names an invalid identity",
    ),
    (
        "kubernetes.io-namespace-disagrees",
        lambda i, x: i.k8s(
            sa_claims(kubernetes_io={"namespace": "kube-system", "serviceaccount": {"name": "web"}})
        ),
        "kubernetes.io claim disagrees with its subject",
    ),
    (
        "kubernetes.io-serviceaccount-disagrees",
        lambda i, x: i.k8s(
            sa_claims(kubernetes_io={"namespace": "default", "serviceaccount": {"name": "admin"}})
        ),
        "kubernetes.io claim disagrees with its subject",
    ),
]


@pytest.mark.parametrize(
    ("make", "keyword"),
    [pytest.param(make, keyword, id=name) for name, make, keyword in REFUSED],
)
def test_bad_tokens_are_refused_saying_why(
    issuers: Issuers,
    intruder_key: rsa.RSAPrivateKey,
    auth: JwtAuthenticator,
    make: Callable[[Issuers, rsa.RSAPrivateKey], str],
    keyword: str,
) -> None:
    token = make(issuers, intruder_key)
    with pytest.raises(AuthenticationError, match=keyword) as info:
        auth.authenticate(token, NOW)
    message = str(info.value)
    for part in token.split("."):
        if len(part) > 8:
            assert part not in message, "a refusal must not echo the token"


# --- time: the 30 s leeway, against the injected `now` --------------------------------------


@pytest.mark.parametrize(
    ("at", "accepted"),
    [
        (NOW + HOUR, True),
        (NOW + HOUR + LEEWAY, True),
        (NOW + HOUR + LEEWAY + SECOND, False),
        (NOW - LEEWAY, True),
        (NOW - LEEWAY - SECOND, False),
    ],
    ids=["at-exp", "exp-plus-leeway", "beyond-exp-leeway", "nbf-minus-leeway", "before-nbf-leeway"],
)
def test_token_validity_window_has_a_30s_leeway(
    issuers: Issuers, auth: JwtAuthenticator, at: dt.datetime, accepted: bool
) -> None:
    token = issuers.own(now=NOW, ttl=HOUR)  # nbf = NOW, exp = NOW + 1h
    if accepted:
        assert auth.authenticate(token, at).identity == WEB
    else:
        with pytest.raises(AuthenticationError, match="expired|not valid yet"):
            auth.authenticate(token, at)


# --- the verified-token cache ---------------------------------------------------------------


def test_cached_token_authenticates_again_until_it_expires(
    issuers: Issuers, auth: JwtAuthenticator
) -> None:
    token = issuers.k8s(sa_claims(ttl=HOUR))
    first = auth.authenticate(token, NOW)
    assert auth.authenticate(token, NOW) == first
    assert auth.authenticate(token, NOW + HOUR + LEEWAY) == first

    with pytest.raises(AuthenticationError, match="expired"):
        auth.authenticate(token, NOW + HOUR + LEEWAY + SECOND)
    # ... and stays refused.
    with pytest.raises(AuthenticationError, match="expired"):
        auth.authenticate(token, NOW + 2 * HOUR)


def test_refusals_are_not_cached(issuers: Issuers, auth: JwtAuthenticator) -> None:
    """A token presented too early is refused, and accepted once it becomes valid."""
    token = issuers.own(now=NOW + HOUR)
    with pytest.raises(AuthenticationError, match="not valid yet"):
        auth.authenticate(token, NOW)
    assert auth.authenticate(token, NOW + HOUR).identity == WEB


def test_a_full_cache_still_authenticates_every_token(issuers: Issuers) -> None:
    auth = issuers.authenticator(cache_size=1)
    web, db = issuers.own("default", "web"), issuers.own("default", "db")
    for token, identity in [(web, WEB), (db, OTHER), (web, WEB), (db, OTHER)]:
        assert auth.authenticate(token, NOW).identity == identity


def test_tokens_of_one_issuer_are_refused_by_an_authenticator_not_trusting_it(
    issuers: Issuers,
) -> None:
    only_own = JwtAuthenticator(TD, [load_jwks_file(issuers.own_issuer, issuers.own_jwks)])
    assert only_own.authenticate(issuers.own(), NOW).identity == WEB
    with pytest.raises(AuthenticationError, match="is not trusted"):
        only_own.authenticate(issuers.k8s(sa_claims()), NOW)


# --- client certificates --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CaFixture:
    return badcerts.make_ca(TD)


@pytest.fixture
def cert_auth(ca: CaFixture) -> ClientCertAuthenticator:
    return ClientCertAuthenticator(ca.bundle, ca.intermediates)


def test_a_valid_svid_authenticates_as_its_spiffe_id(
    ca: CaFixture, cert_auth: ClientCertAuthenticator
) -> None:
    leaf = badcerts.svid_leaf(ca.signer, WEB, ttl=HOUR)
    caller = cert_auth.authenticate(leaf.der, NOW)
    assert caller == Caller(
        identity=WEB,
        authenticator="client-cert",
        subject=f"serial {format_serial(leaf.cert.serial_number)}",
        expires=NOW + HOUR,
    )


BAD_CLIENT_CERTS: list[tuple[str, Callable[[CaFixture], bytes], str]] = [
    ("expired", lambda ca: badcerts.expired_leaf(ca.signer, WEB).der, "expired at"),
    ("not-yet-valid", lambda ca: badcerts.not_yet_valid_leaf(ca.signer, WEB).der, "not yet valid"),
    ("another-root", lambda ca: badcerts.leaf_from_another_root(WEB).der, "does not verify"),
    (
        "another-trust-domain",
        lambda ca: badcerts.leaf_in_another_trust_domain(ca.signer).der,
        "not in trust domain example.org",
    ),
    ("ca-true", lambda ca: badcerts.leaf_with_ca_true(ca.signer, WEB).der, "CA certificate"),
    (
        "two-uri-sans",
        lambda ca: badcerts.leaf_with_two_uri_sans(ca.signer, WEB, OTHER).der,
        "exactly one URI SAN",
    ),
    ("garbage-der", lambda ca: b"\x30\x03\x02\x01\x00", "cannot be parsed"),
    ("empty", lambda ca: b"", "cannot be parsed"),
]


@pytest.mark.parametrize(
    ("make", "keyword"),
    [pytest.param(make, kw, id=name) for name, make, kw in BAD_CLIENT_CERTS],
)
def test_bad_client_certificates_are_refused(
    ca: CaFixture,
    cert_auth: ClientCertAuthenticator,
    make: Callable[[CaFixture], bytes],
    keyword: str,
) -> None:
    with pytest.raises(AuthenticationError, match=r"^client certificate .*" + keyword):
        cert_auth.authenticate(make(ca), NOW)


def test_a_client_certificate_expires_with_the_clock(
    ca: CaFixture, cert_auth: ClientCertAuthenticator
) -> None:
    leaf = badcerts.svid_leaf(ca.signer, WEB, ttl=HOUR)
    assert cert_auth.authenticate(leaf.der, NOW + HOUR).identity == WEB
    with pytest.raises(AuthenticationError, match="expired"):
        cert_auth.authenticate(leaf.der, NOW + HOUR + SECOND)


# --- check_ttl ------------------------------------------------------------------------------

DEFAULT_POLICY = CaPolicy(TD)
TIGHT_POLICY = CaPolicy(TD, default_ttl=HOUR, max_ttl=2 * HOUR)
DAY_S = 86400


@pytest.mark.parametrize(
    ("requested", "policy", "expected"),
    [
        (0, DEFAULT_POLICY, dt.timedelta(hours=24)),
        (1, DEFAULT_POLICY, SECOND),
        (3600, DEFAULT_POLICY, HOUR),
        (90 * DAY_S, DEFAULT_POLICY, dt.timedelta(days=90)),
        (0, TIGHT_POLICY, HOUR),
        (7200, TIGHT_POLICY, 2 * HOUR),
    ],
    ids=["zero-is-default", "one-second", "one-hour", "exact-max", "tight-default", "tight-max"],
)
def test_check_ttl_accepts(requested: int, policy: CaPolicy, expected: dt.timedelta) -> None:
    assert check_ttl(requested, policy) == expected


@pytest.mark.parametrize(
    ("requested", "policy", "message"),
    [
        (-1, DEFAULT_POLICY, "requested TTL -1s is negative"),
        (-DAY_S, DEFAULT_POLICY, "is negative"),
        (90 * DAY_S + 1, DEFAULT_POLICY, "requested TTL 90d1s is above the maximum 90d"),
        (365 * DAY_S, DEFAULT_POLICY, "requested TTL 365d is above the maximum 90d"),
        (7201, TIGHT_POLICY, "requested TTL 2h1s is above the maximum 2h"),
    ],
    ids=["minus-one", "minus-a-day", "max-plus-one", "a-year", "tight-max-plus-one"],
)
def test_check_ttl_refuses_rather_than_clamps(
    requested: int, policy: CaPolicy, message: str
) -> None:
    with pytest.raises(InvalidTTL, match=re.escape(message)):
        check_ttl(requested, policy)


@pytest.mark.parametrize("requested", [10**14, 2**63 - 1], ids=["1e14", "int64-max"])
def test_check_ttl_refuses_huge_int64_ttls(requested: int) -> None:
    with pytest.raises(InvalidTTL, match="above the maximum"):
        check_ttl(requested, DEFAULT_POLICY)


# --- decide_identity ------------------------------------------------------------------------

CALLER = Caller(
    identity=WEB,
    authenticator="jwt",
    subject="system:serviceaccount:default:web",
    expires=NOW + HOUR,
)


@pytest.mark.parametrize(
    "make_csr",
    [
        pytest.param(lambda: badcerts.csr_for(WEB), id="own-id"),
        pytest.param(badcerts.csr_without_san, id="no-san"),
    ],
)
def test_decide_identity_certifies_the_caller(make_csr: Callable[[], str]) -> None:
    assert decide_identity(parse_csr(make_csr()), CALLER) == WEB


DECISIONS: list[tuple[str, Callable[[], str], type[Exception], str]] = [
    (
        "other-id",
        lambda: badcerts.csr_for(OTHER),
        PermissionDenied,
        f"CSR asks for {OTHER} but the caller is authenticated as {WEB}",
    ),
    (
        "other-trust-domain",
        lambda: badcerts.csr_for("spiffe://other.org/ns/default/sa/web"),
        PermissionDenied,
        "CSR asks for spiffe://other.org/ns/default/sa/web",
    ),
    (
        "dns-san",
        lambda: badcerts.csr_with_dns_san(WEB),
        PermissionDenied,
        "SANs other than a SPIFFE ID (1 extra)",
    ),
    ("ca-true", lambda: badcerts.csr_with_ca_true(WEB), PermissionDenied, "CA certificate"),
    (
        "key-cert-sign",
        lambda: badcerts.csr_with_key_cert_sign(WEB),
        PermissionDenied,
        "CA certificate",
    ),
    (
        "two-uri-sans",
        lambda: badcerts.csr_with_two_uri_sans(WEB, OTHER),
        InvalidCSR,
        "CSR has 2 URI SANs; an SVID has exactly one",
    ),
    (
        "own-id-twice",
        lambda: badcerts.csr_with_two_uri_sans(WEB, WEB),
        InvalidCSR,
        "CSR has 2 URI SANs",
    ),
    (
        "non-spiffe-uri",
        lambda: badcerts.csr_for("https://example.org/web"),
        InvalidCSR,
        "CSR URI SAN is not a valid SPIFFE ID",
    ),
]


@pytest.mark.parametrize(
    ("make_csr", "error", "message"),
    [pytest.param(make, err, msg, id=name) for name, make, err, msg in DECISIONS],
)
def test_decide_identity_refuses_anything_but_the_callers_own_identity(
    make_csr: Callable[[], str], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        decide_identity(parse_csr(make_csr()), CALLER)
