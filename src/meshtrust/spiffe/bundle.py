"""The SPIFFE bundle document (SPIFFE Trust Domain and Bundle, section 4): emit and parse.

A bundle document is a JWK Set with two more members::

    {"spiffe_sequence": 3, "spiffe_refresh_hint": 300,
     "keys": [{"kty": "EC", "crv": "P-256", "x": "...", "y": "...",
               "use": "x509-svid", "x5c": ["<base64 DER of one CA certificate>"]}]}

Parsing is strict, because a bundle decides whom a whole mesh trusts: a key whose ``use`` is
``x509-svid`` must carry exactly one certificate in ``x5c``, that certificate must be a CA,
its key must be the JWK's key, the key must have no ``kid`` (the X.509-SVID standard says
so), and nothing in the document may name another trust domain. ``jwt-svid`` keys need a
``kid``; keys of an unknown ``use`` are ignored, as the standard requires. A document larger
than :data:`MAX_DOCUMENT_BYTES` is refused before it is parsed. An empty ``keys`` list is a
valid bundle: every authority of that trust domain is revoked.

Revocation (not in the standard; JWK Set members a reader does not know are ignored, RFC
7517 section 5, so go-spiffe and py-spiffe read the document as before). meshtrust's CAs add
the CRLs of their live issuing CAs, for federated meshes' sidecars to check leaves against::

    "meshtrust_revocation": {"issuers": ["<base64 DER CA certificate>", ...],
                             "crls": ["<base64 DER CRL>", ...]}

Each issuer must be a CA certificate of the trust domain that chains to an authority of the
bundle (through other listed issuers at most); each CRL must be signed by a listed issuer
(its name and key), one per issuer. At most :data:`MAX_REVOCATION_ITEMS` of each. A
violation refuses the whole document, as any other.

Pure functions: no files, sockets or clocks. Errors are :class:`InvalidBundle` with one
message naming where in the document the problem is.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshtrust.errors import InvalidInput, InvalidSpiffeId
from meshtrust.spiffe.ids import SpiffeId, TrustDomain

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_REVOCATION_ITEMS",
    "REVOCATION_MEMBER",
    "InvalidBundle",
    "SpiffeBundle",
    "bundle_document",
    "check_revocation",
    "issuer_roots",
    "parse_bundle_document",
]

#: Bundles hold a handful of certificates (a few KB); anything this large is refused unread.
MAX_DOCUMENT_BYTES = 1024 * 1024
_MAX_UINT64 = 2**64 - 1
_X509_SVID = "x509-svid"
_JWT_SVID = "jwt-svid"
#: The document member carrying CRLs (module docstring), and its list bounds.
REVOCATION_MEMBER = "meshtrust_revocation"
MAX_REVOCATION_ITEMS = 32
_CURVES = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48), "secp521r1": ("P-521", 66)}


class InvalidBundle(InvalidInput):
    """A bundle document that is not JSON, too large, or breaks the SPIFFE rules."""


@dataclass(frozen=True, slots=True)
class SpiffeBundle:
    """The trust bundle of one trust domain: its X.509 authorities (and JWT keys, kept as
    their JWKs), with the document's sequence number and refresh hint when it has them."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...]
    sequence: int | None = None
    refresh_hint: dt.timedelta | None = None
    jwt_authorities: tuple[Mapping[str, Any], ...] = field(default=())
    #: The CRLs of the trust domain's live issuing CAs, and those CAs (module docstring).
    crls: tuple[x509.CertificateRevocationList, ...] = field(default=())
    crl_issuers: tuple[x509.Certificate, ...] = field(default=())

    def same_revocation(self, other: SpiffeBundle) -> bool:
        """True if both bundles carry the same CRLs and CRL issuers."""
        return _crl_ders(self.crls) == _crl_ders(other.crls) and _der_set(
            self.crl_issuers
        ) == _der_set(other.crl_issuers)

    def same_authorities(self, other: SpiffeBundle) -> bool:
        """True if both bundles trust the same X.509 authorities (order aside)."""
        return _der_set(self.x509_authorities) == _der_set(other.x509_authorities)


def _der_set(certs: Sequence[x509.Certificate]) -> frozenset[bytes]:
    return frozenset(c.public_bytes(serialization.Encoding.DER) for c in certs)


def _crl_ders(crls: Sequence[x509.CertificateRevocationList]) -> frozenset[bytes]:
    return frozenset(c.public_bytes(serialization.Encoding.DER) for c in crls)


def _b64url_uint(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode()


def _public_jwk(cert: x509.Certificate) -> dict[str, str]:
    """The JWK members of ``cert``'s public key (RFC 7518 section 6)."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise InvalidBundle(f"unsupported elliptic curve {key.curve.name}")
        crv, size = _CURVES[key.curve.name]
        numbers = key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": _b64url_uint(numbers.x, size),
            "y": _b64url_uint(numbers.y, size),
        }
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return {"kty": "RSA", "n": _b64url_uint(rsa_numbers.n), "e": _b64url_uint(rsa_numbers.e)}
    raise InvalidBundle(f"unsupported key type {type(key).__name__}")


def bundle_document(bundle: SpiffeBundle) -> bytes:
    """The bundle document of ``bundle``: UTF-8 JSON, one ``x509-svid`` key per authority.

    Raises :class:`InvalidBundle` for an authority whose key type a JWK cannot carry.
    """
    keys: list[dict[str, Any]] = []
    for cert in bundle.x509_authorities:
        der = cert.public_bytes(serialization.Encoding.DER)
        keys.append(
            {**_public_jwk(cert), "use": _X509_SVID, "x5c": [base64.b64encode(der).decode()]}
        )
    keys.extend(dict(jwk) for jwk in bundle.jwt_authorities)
    doc: dict[str, Any] = {}
    if bundle.sequence is not None:
        doc["spiffe_sequence"] = bundle.sequence
    if bundle.refresh_hint is not None:
        doc["spiffe_refresh_hint"] = int(bundle.refresh_hint.total_seconds())
    doc["keys"] = keys
    if bundle.crls or bundle.crl_issuers:
        enc = serialization.Encoding.DER
        doc[REVOCATION_MEMBER] = {
            "issuers": [base64.b64encode(c.public_bytes(enc)).decode() for c in bundle.crl_issuers],
            "crls": [base64.b64encode(c.public_bytes(enc)).decode() for c in bundle.crls],
        }
    return json.dumps(doc, indent=2).encode() + b"\n"


# --- parsing -----------------------------------------------------------------------------------


def _no_duplicate_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise InvalidBundle(f"member {name!r} appears twice in one object")
        out[name] = value
    return out


def _no_constants(name: str) -> Any:
    raise InvalidBundle(f"{name} is not JSON")


def _uint(doc: Mapping[str, Any], name: str) -> int | None:
    if name not in doc:
        return None
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_UINT64:
        raise InvalidBundle(f"{name} must be a non-negative integer, not {value!r:.40}")
    return value


def parse_bundle_document(
    data: bytes, trust_domain: TrustDomain, *, source: str = "bundle document"
) -> SpiffeBundle:
    """Parse and check the bundle document of ``trust_domain``.

    Raises :class:`InvalidBundle` naming ``source`` and the offending key (``keys[2]``) when
    the document is larger than :data:`MAX_DOCUMENT_BYTES`, not a JSON object, or breaks a
    rule of the module docstring.
    """
    prefix = f"{source} (trust domain {trust_domain})"
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidBundle(
            f"{prefix}: larger than {MAX_DOCUMENT_BYTES // 1024} KiB; refused unread"
        )
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicate_members,
            parse_constant=_no_constants,
        )
        return _parse(doc, trust_domain)
    except InvalidBundle as exc:
        raise InvalidBundle(f"{prefix}: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidBundle(f"{prefix}: not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidBundle(f"{prefix}: not JSON ({str(exc)[:80]})") from None


def _parse(doc: Any, trust_domain: TrustDomain) -> SpiffeBundle:
    if not isinstance(doc, dict):
        raise InvalidBundle("the document must be a JSON object")
    sequence = _uint(doc, "spiffe_sequence")
    hint = _uint(doc, "spiffe_refresh_hint")
    if hint is not None and hint > 10 * 365 * 86400:
        raise InvalidBundle(f"spiffe_refresh_hint {hint} is longer than ten years")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise InvalidBundle("'keys' must be a list of JWKs")
    authorities: dict[bytes, x509.Certificate] = {}
    jwt: list[Mapping[str, Any]] = []
    for index, key in enumerate(keys):
        where = f"keys[{index}]"
        if not isinstance(key, dict):
            raise InvalidBundle(f"{where}: a JWK must be an object")
        use, kty = key.get("use"), key.get("kty")
        if not isinstance(use, str) or not use:
            raise InvalidBundle(f"{where}: 'use' must be set (x509-svid or jwt-svid)")
        if not isinstance(kty, str) or not kty:
            raise InvalidBundle(f"{where}: 'kty' must be set")
        if use == _X509_SVID:
            cert = _x509_authority(key, trust_domain, where)
            authorities.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
        elif use == _JWT_SVID:
            kid = key.get("kid")
            if not isinstance(kid, str) or not kid:
                raise InvalidBundle(f"{where}: a jwt-svid key needs a 'kid'")
            jwt.append(dict(key))
        # Any other use: the standard says to ignore the whole key.
    roots = tuple(authorities.values())
    issuers, crls = _revocation(doc.get(REVOCATION_MEMBER), trust_domain, roots)
    return SpiffeBundle(
        trust_domain=trust_domain,
        x509_authorities=roots,
        sequence=sequence,
        refresh_hint=dt.timedelta(seconds=hint) if hint is not None else None,
        jwt_authorities=tuple(jwt),
        crls=crls,
        crl_issuers=issuers,
    )


def _b64_list(value: Any, where: str) -> list[bytes]:
    if not isinstance(value, list):
        raise InvalidBundle(f"{where} must be a list of base64 DER strings")
    if len(value) > MAX_REVOCATION_ITEMS:
        raise InvalidBundle(f"{where} has {len(value)} items; at most {MAX_REVOCATION_ITEMS}")
    out = []
    for index, text in enumerate(value):
        try:
            if not isinstance(text, str):
                raise ValueError("not a string")
            out.append(base64.b64decode(text, validate=True))
        except (ValueError, binascii.Error) as exc:
            raise InvalidBundle(f"{where}[{index}]: not base64 ({exc})") from None
    return out


def _revocation(
    member: Any, trust_domain: TrustDomain, roots: Sequence[x509.Certificate]
) -> tuple[tuple[x509.Certificate, ...], tuple[x509.CertificateRevocationList, ...]]:
    """The issuers and CRLs of the revocation member (module docstring); () without one."""
    if member is None:
        return (), ()
    where = REVOCATION_MEMBER
    if not isinstance(member, dict):
        raise InvalidBundle(f"{where} must be an object with 'issuers' and 'crls'")
    return check_revocation(
        trust_domain,
        roots,
        _b64_list(member.get("issuers", []), f"{where}.issuers"),
        _b64_list(member.get("crls", []), f"{where}.crls"),
    )


def check_revocation(
    trust_domain: TrustDomain,
    roots: Sequence[x509.Certificate],
    issuer_ders: Sequence[bytes],
    crl_ders: Sequence[bytes],
) -> tuple[tuple[x509.Certificate, ...], tuple[x509.CertificateRevocationList, ...]]:
    """The CRL issuers and CRLs of ``trust_domain`` (DER), checked as the module docstring
    says against the bundle's ``roots``. Raises :class:`InvalidBundle` naming the item."""
    where = REVOCATION_MEMBER
    for what, items in (("issuers", issuer_ders), ("crls", crl_ders)):
        if len(items) > MAX_REVOCATION_ITEMS:
            raise InvalidBundle(
                f"{where}.{what} has {len(items)} items; at most {MAX_REVOCATION_ITEMS}"
            )
    issuers: list[x509.Certificate] = []
    for index, der in enumerate(issuer_ders):
        at = f"{where}.issuers[{index}]"
        try:
            cert = x509.load_der_x509_certificate(der)
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        except ValueError as exc:
            raise InvalidBundle(f"{at}: not a DER certificate ({exc})") from None
        if not is_ca:
            raise InvalidBundle(f"{at}: not a CA certificate")
        _check_trust_domain(cert, trust_domain, at.removesuffix(".x5c[0]"))
        issuers.append(cert)
    # Every issuer must chain to a root of the bundle, through other issuers at most.
    if len(roots) > MAX_REVOCATION_ITEMS:
        raise InvalidBundle(
            f"{where}: CRLs are read for bundles of at most {MAX_REVOCATION_ITEMS} "
            f"authorities, not {len(roots)}"
        )
    for index, found in enumerate(issuer_roots(roots, issuers)):
        if found is None:
            raise InvalidBundle(
                f"{where}.issuers[{index}]: not issued by an authority of the bundle"
            )
    crls: list[x509.CertificateRevocationList] = []
    seen: set[bytes] = set()
    for index, der in enumerate(crl_ders):
        at = f"{where}.crls[{index}]"
        try:
            crl = x509.load_der_x509_crl(der)
        except ValueError as exc:
            raise InvalidBundle(f"{at}: not a DER CRL ({exc})") from None
        signer = next(
            (
                c
                for c in issuers
                if c.subject == crl.issuer and crl.is_signature_valid(c.public_key())  # type: ignore[arg-type]
            ),
            None,
        )
        if signer is None:
            raise InvalidBundle(f"{at}: not signed by one of the listed issuers")
        key = signer.public_bytes(serialization.Encoding.DER)
        if key in seen:
            raise InvalidBundle(f"{at}: a second CRL of one issuer")
        seen.add(key)
        crls.append(crl)
    return tuple(issuers), tuple(crls)


def issuer_roots(
    roots: Sequence[x509.Certificate], issuers: Sequence[x509.Certificate]
) -> list[x509.Certificate | None]:
    """For each of ``issuers``, the root of ``roots`` it chains to through other
    ``issuers`` (None: none). Each issuer's parent is looked up once, by name and then
    signature, so the cost is at most ``len(issuers) * (len(roots) + len(issuers))``
    signature checks whatever the certificates are."""
    parent: list[tuple[str, int] | None] = []
    for cert in issuers:
        found: tuple[str, int] | None = None
        for i, root in enumerate(roots):
            if cert == root or _issued_by(cert, root):
                found = ("root", i)
                break
        if found is None:
            for j, other in enumerate(issuers):
                if other is not cert and _issued_by(cert, other):
                    found = ("issuer", j)
                    break
        parent.append(found)
    out: list[x509.Certificate | None] = []
    for start in range(len(issuers)):
        at, seen = parent[start], {start}
        while at is not None and at[0] == "issuer" and at[1] not in seen:
            seen.add(at[1])
            at = parent[at[1]]
        out.append(roots[at[1]] if at is not None and at[0] == "root" else None)
    return out


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _x509_authority(
    key: Mapping[str, Any], trust_domain: TrustDomain, where: str
) -> x509.Certificate:
    if "kid" in key:
        raise InvalidBundle(f"{where}: an x509-svid key must not have a 'kid'")
    x5c = key.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1:
        count = len(x5c) if isinstance(x5c, list) else "no"
        raise InvalidBundle(
            f"{where}: an x509-svid key carries exactly one certificate in 'x5c', not {count}"
        )
    (text,) = x5c
    try:
        if not isinstance(text, str):
            raise ValueError("not a string")
        cert = x509.load_der_x509_certificate(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise InvalidBundle(f"{where}.x5c[0]: not a base64 DER certificate ({exc})") from None
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = basic.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:  # a malformed extension
        raise InvalidBundle(f"{where}.x5c[0]: bad extensions ({exc})") from None
    if not is_ca:
        raise InvalidBundle(f"{where}.x5c[0]: not a CA certificate (BasicConstraints CA=false)")
    expected = _public_jwk(cert)
    for member, value in expected.items():
        if key.get(member) != value:
            raise InvalidBundle(f"{where}: '{member}' does not match the key of its certificate")
    _check_trust_domain(cert, trust_domain, where)
    return cert


def _check_trust_domain(cert: x509.Certificate, trust_domain: TrustDomain, where: str) -> None:
    """A CA certificate that names a trust domain must name this one.

    SPIFFE CAs carry ``spiffe://<td>`` as a URI SAN (SPIRE's do); meshtrust's roots name it
    in O (their CN says "meshtrust root CA (<td>)").
    """
    named: list[str] = []
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        if uri.startswith("spiffe://"):
            try:
                named.append(SpiffeId.parse(uri).trust_domain.name)
            except InvalidSpiffeId:
                named.append(uri)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if cn and str(cn[0].value).startswith("meshtrust "):
        for attr in cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME):
            named.append(str(attr.value))
    for name in named:
        if name != trust_domain.name:
            raise InvalidBundle(
                f"{where}.x5c[0]: the certificate belongs to trust domain {name!r}, "
                f"not {trust_domain.name!r}"
            )
