"""The CA directory: creating one (``ca init``) and loading one (``ca serve``).

Two layouts are understood, both from Istio's plugged-in CA:

* ``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem``, ``root-cert.pem`` (Istio ``cacerts``);
* ``tls.crt``, ``tls.key``, ``ca.crt`` (a cert-manager / Kubernetes TLS secret).

``ca init`` also writes ``root-key.pem`` (move it offline once the CA runs) and the CA's own
token-issuer key pair ``token-key.pem`` / ``token-jwks.json``. Private keys are 0600.
Loading checks everything a CA needs and stops with one clear message per problem.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification as xv

from meshtrust.errors import CADirectoryError, InvalidCertificate, InvalidSpiffeId
from meshtrust.fileio import (
    PUBLIC_FILE_MODE,
    check_not_writable_by_others,
    ensure_private_dir,
    write_file_atomic,
    write_private_file,
)
from meshtrust.pki import (
    KeyType,
    Signer,
    ca_extension_policy,
    cas_without_key_usage,
    certs_pem,
    generate_key,
    load_certs_pem,
    load_private_key_pem,
    make_intermediate,
    make_root,
    private_key_pem,
)
from meshtrust.spiffe import TrustDomain

__all__ = [
    "ISTIO_FILES",
    "TLS_FILES",
    "CaMaterial",
    "TokenSigningKey",
    "ensure_token_signing_key",
    "init_ca_dir",
    "load_ca_dir",
    "load_root_signer",
    "load_token_signing_key",
    "token_issuer_for",
]

ISTIO_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
TLS_FILES = ("tls.crt", "tls.key", "ca.crt")
TOKEN_KEY = "token-key.pem"
TOKEN_JWKS = "token-jwks.json"
ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=365)


def token_issuer_for(trust_domain: TrustDomain) -> str:
    """The ``iss`` of tokens minted by the CA of ``trust_domain``."""
    return f"meshtrust://{trust_domain.name}/ca"


@dataclass(frozen=True, slots=True)
class TokenSigningKey:
    key: ec.EllipticCurvePrivateKey
    kid: str
    jwks: dict[str, object]


@dataclass(frozen=True, slots=True)
class CaMaterial:
    """A loaded, checked CA: the signing certificate and key, intermediates, trusted roots."""

    signer: Signer
    intermediates: tuple[x509.Certificate, ...]  # signing cert first, up to (not incl.) the root
    roots: tuple[x509.Certificate, ...]
    layout: str
    # Things that work but deserve a word at start-up (a CA without KeyUsage).
    warnings: tuple[str, ...] = ()

    @property
    def root_bundle_pem(self) -> str:
        return certs_pem(self.roots).decode()

    def trust_domain_hint(self) -> TrustDomain | None:
        """The trust domain named by the signing CA's O, else the root's (how ``ca init``
        records it; under a shared root each cluster's intermediate names its own), if valid."""
        for root in (self.signer.cert, *self.roots):
            for attr in root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME):
                try:
                    return TrustDomain.parse(str(attr.value))
                except InvalidSpiffeId:
                    continue
        return None


def _jwk_for(key: ec.EllipticCurvePrivateKey) -> tuple[str, dict[str, object]]:
    numbers = key.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:12]).rstrip(b"=").decode()
    jwk: dict[str, object] = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x),
        "y": b64(numbers.y),
        "use": "sig",
        "alg": "ES256",
        "kid": kid,
    }
    return kid, jwk


def init_ca_dir(
    directory: Path,
    trust_domain: TrustDomain,
    now: dt.datetime,
    key_type: KeyType = KeyType.EC_P256,
    *,
    force: bool = False,
    intermediate_lifetime: dt.timedelta = INTERMEDIATE_LIFETIME,
) -> None:
    """Create a root, an intermediate signing CA and a token-issuer key in ``directory``.

    The intermediate lives ``intermediate_lifetime`` (a year by default); ``ca serve``
    rotates it from the ledger's slots (:mod:`meshtrust.ca.signing`) while it holds
    ``root-key.pem``.

    Refuses (:class:`CADirectoryError`) when a CA is already there, unless ``force``; a
    directory it makes is 0700, an existing one that others could write to or that another
    user owns is refused (:class:`~meshtrust.fileio.UnsafeDirectory`).
    """
    ensure_private_dir(directory)
    ours = (*ISTIO_FILES, *TLS_FILES, "root-key.pem", TOKEN_KEY, TOKEN_JWKS)
    existing = [n for n in ours if (directory / n).exists()]
    if existing and not force:
        raise CADirectoryError(
            f"{directory} already holds a CA ({', '.join(existing)}); "
            "refusing to overwrite it (use --force to replace it)"
        )
    root_key = generate_key(key_type)
    root = make_root(root_key, trust_domain.name, now, ROOT_LIFETIME)
    ca_key = generate_key(key_type)
    ca_cert = make_intermediate(
        ca_key, Signer(root, root_key), trust_domain.name, now, intermediate_lifetime
    )
    token_key = ec.generate_private_key(ec.SECP256R1())
    _, jwk = _jwk_for(token_key)

    write_private_file(directory / "root-key.pem", private_key_pem(root_key))
    write_private_file(directory / "ca-key.pem", private_key_pem(ca_key))
    write_private_file(directory / TOKEN_KEY, private_key_pem(token_key))
    public = PUBLIC_FILE_MODE
    write_file_atomic(directory / "root-cert.pem", certs_pem([root]), public)
    write_file_atomic(directory / "ca-cert.pem", certs_pem([ca_cert]), public)
    write_file_atomic(directory / "cert-chain.pem", certs_pem([ca_cert, root]), public)
    write_file_atomic(
        directory / TOKEN_JWKS, json.dumps({"keys": [jwk]}, indent=2).encode(), public
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CADirectoryError(f"cannot read {path}: {exc.strerror}") from exc


def _certs(path: Path) -> list[x509.Certificate]:
    try:
        return load_certs_pem(_read(path), source=str(path))
    except InvalidCertificate as exc:
        raise CADirectoryError(str(exc)) from exc


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, Exception):
        return False
    return True


def load_ca_dir(
    directory: Path, now: dt.datetime, *, signer_may_expire: bool = False
) -> CaMaterial:
    """Load and check the CA in ``directory`` (either layout).

    Raises :class:`CADirectoryError` when the directory is missing, incomplete (names the
    missing files), or inconsistent: key does not match certificate, signing certificate is
    not a CA, chain does not lead to a root of the bundle, or something has expired.
    ``signer_may_expire``: a CA holding the root key signs with the ledger's active slot
    (:mod:`meshtrust.ca.signing`), so an expired ``ca-cert.pem`` (generation 1, long
    rotated away) is then checked as of its last valid moment instead of refused.
    """
    if not directory.is_dir():
        raise CADirectoryError(
            f"CA directory {directory} does not exist (create one with `meshtrust ca init`)"
        )
    check_not_writable_by_others(directory)  # or another user could swap root-cert.pem
    istio = [n for n in ISTIO_FILES if (directory / n).exists()]
    tls = [n for n in TLS_FILES if (directory / n).exists()]
    if istio:
        missing = [n for n in ISTIO_FILES if n not in istio]
        if missing:
            raise CADirectoryError(
                f"CA directory {directory} is incomplete: has {', '.join(istio)} "
                f"but is missing {', '.join(missing)}"
            )
        layout = "istio"
        cert_path, key_path = directory / "ca-cert.pem", directory / "ca-key.pem"
        chain_path, root_path = directory / "cert-chain.pem", directory / "root-cert.pem"
    elif tls:
        missing = [n for n in TLS_FILES if n not in tls]
        if missing:
            raise CADirectoryError(
                f"CA directory {directory} is incomplete: has {', '.join(tls)} "
                f"but is missing {', '.join(missing)}"
            )
        layout = "tls"
        cert_path = chain_path = directory / "tls.crt"
        key_path, root_path = directory / "tls.key", directory / "ca.crt"
    else:
        raise CADirectoryError(
            f"no CA found in {directory}: expected {', '.join(ISTIO_FILES)} "
            f"or {', '.join(TLS_FILES)} (create one with `meshtrust ca init`)"
        )

    ca_cert = _certs(cert_path)[0]
    try:
        ca_key = load_private_key_pem(_read(key_path), source=str(key_path))
    except InvalidCertificate as exc:
        raise CADirectoryError(str(exc)) from exc
    roots = _certs(root_path)
    chain = _certs(chain_path)

    if ca_key.public_key() != ca_cert.public_key():
        raise CADirectoryError(f"{key_path} does not match the certificate in {cert_path}")
    _check_is_ca(ca_cert, cert_path)
    for root in roots:
        if not _is_self_signed(root):
            raise CADirectoryError(
                f"{root_path} holds a certificate that is not a self-signed root"
            )
        _check_is_ca(root, root_path)

    # Intermediates: the chain file minus roots; the signing cert first.
    root_ders = {r.public_bytes(serialization.Encoding.DER) for r in roots}
    inters = [
        c
        for c in chain
        if c.public_bytes(serialization.Encoding.DER) not in root_ders and not _is_self_signed(c)
    ]
    if not inters or inters[0] != ca_cert:
        inters = [ca_cert, *[c for c in inters if c != ca_cert]]
    if _is_self_signed(ca_cert):
        inters = []  # the signing CA is itself a root (allowed: Istio's self-signed mode)
        if ca_cert.public_bytes(serialization.Encoding.DER) not in root_ders:
            raise CADirectoryError(f"{cert_path} is a self-signed CA that is not in {root_path}")

    check_at = now
    if signer_may_expire and now > ca_cert.not_valid_after_utc:
        check_at = ca_cert.not_valid_after_utc
    for cert, path in [(ca_cert, cert_path), *((r, root_path) for r in roots)]:
        if check_at > cert.not_valid_after_utc:
            raise CADirectoryError(
                f"{path}: certificate expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
            )
        if now < cert.not_valid_before_utc:
            raise CADirectoryError(f"{path}: certificate is not valid yet")

    verifier = (
        xv.PolicyBuilder()
        .store(xv.Store(list(roots)))
        .time(check_at)
        .extension_policies(
            ca_policy=ca_extension_policy(),
            ee_policy=ca_extension_policy(),  # the "leaf" verified here is the signing CA
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(ca_cert, inters[1:])
    except xv.VerificationError as exc:
        raise CADirectoryError(
            f"the chain of {cert_path} does not lead to a root in {root_path}: {exc}"
        ) from exc
    unique = {c.public_bytes(serialization.Encoding.DER): c for c in (*inters, *roots, ca_cert)}
    warnings = tuple(
        f"CA certificate {cert.subject.rfc4514_string()} has no KeyUsage extension "
        "(as `openssl req -x509` makes them); accepted, but a CA certificate should say "
        "keyCertSign, cRLSign"
        for cert in cas_without_key_usage(list(unique.values()))
    )
    return CaMaterial(
        signer=Signer(ca_cert, ca_key),
        intermediates=tuple(inters),
        roots=tuple(roots),
        layout=layout,
        warnings=warnings,
    )


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CADirectoryError(f"{path}: certificate is not a CA (no BasicConstraints)") from None
    if not bc.ca:
        raise CADirectoryError(f"{path}: certificate is not a CA (BasicConstraints CA=false)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CADirectoryError(
                f"{path}: certificate may not sign certificates (no keyCertSign)"
            )
    except x509.ExtensionNotFound:
        pass


def load_root_signer(directory: Path, roots: tuple[x509.Certificate, ...]) -> Signer | None:
    """The root's signer when ``root-key.pem`` is in ``directory`` (``ca init`` mode: the CA
    may rotate its own intermediate), else None (a plugged-in CA). Raises
    :class:`CADirectoryError` when the key is unreadable or matches none of ``roots``."""
    path = directory / "root-key.pem"
    if not path.exists():
        return None
    try:
        key = load_private_key_pem(_read(path), source=str(path))
    except InvalidCertificate as exc:
        raise CADirectoryError(str(exc)) from exc
    for root in roots:
        if root.public_key() == key.public_key():
            return Signer(root, key)
    raise CADirectoryError(f"{path} does not match any root in the CA directory's root bundle")


def load_token_signing_key(directory: Path) -> TokenSigningKey | None:
    """The CA's own token-issuer key, or None when the directory has none."""
    path = directory / TOKEN_KEY
    if not path.exists():
        return None
    try:
        key = load_private_key_pem(_read(path), source=str(path))
    except InvalidCertificate as exc:
        raise CADirectoryError(str(exc)) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CADirectoryError(f"{path}: the token key must be an ECDSA P-256 key")
    kid, jwk = _jwk_for(key)
    return TokenSigningKey(key=key, kid=kid, jwks={"keys": [jwk]})


def ensure_token_signing_key(directory: Path) -> TokenSigningKey:
    """The CA's own token-issuer key, made on first use when the directory has none.

    A plugged-in CA (Istio ``cacerts``, a cert-manager secret) comes without one; hosts
    outside Kubernetes need it for ``meshtrust token create``. The key is written 0600 beside
    the CA key, with ``token-jwks.json`` (0644). Two first uses at once agree on one key: it
    is linked into place only if no other is there yet. Raises :class:`CADirectoryError` when
    the directory cannot take it (a read-only secret mount, say).
    """
    existing = load_token_signing_key(directory)
    if existing is not None:
        return existing
    path = directory / TOKEN_KEY
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{TOKEN_KEY}.")  # 0600
        tmp = Path(tmp_name)
        won = False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(private_key_pem(key))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # fails if another first use got there first
            won = True
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        ours = load_token_signing_key(directory)  # ours, or the other first use's
        if ours is None:
            raise CADirectoryError(f"{path} vanished while it was being created")
        if won:  # the public half, for other verifiers (the CA derives it from the key)
            jwks = json.dumps(ours.jwks, indent=2).encode()
            write_file_atomic(directory / TOKEN_JWKS, jwks, PUBLIC_FILE_MODE)
    except OSError as exc:
        raise CADirectoryError(
            f"cannot create the CA's token issuer key {path}: {exc.strerror}"
        ) from exc
    return ours
