"""One offline root for several meshes (Istio's multi-primary ``cacerts``).

``ca root init`` makes a root directory: ``root-cert.pem`` (public) and ``root-key.pem``
(0600, to be kept offline). ``ca init --root`` makes a cluster's CA directory from it: a new
intermediate signed by the root, in Istio's plugged-in layout, exactly as Istio's
``tools/certs`` ``<cluster>-cacerts`` targets do::

    ca-cert.pem     the cluster's intermediate
    ca-key.pem      its key (0600)
    cert-chain.pem  intermediate + root
    root-cert.pem   the shared root

The root key is not copied into the cluster directory. Meshes made this way trust one root,
so each accepts the other's workloads without further configuration.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshtrust.ca.cadir import (
    INTERMEDIATE_LIFETIME,
    ISTIO_FILES,
    ROOT_LIFETIME,
    TLS_FILES,
    ensure_token_signing_key,
    load_ca_dir,
)
from meshtrust.errors import CADirectoryError, InvalidCertificate, InvalidSpiffeId
from meshtrust.fileio import (
    PUBLIC_FILE_MODE,
    ensure_private_dir,
    write_file_atomic,
    write_private_file,
)
from meshtrust.pki import (
    KeyType,
    PrivateKey,
    Signer,
    certs_pem,
    generate_key,
    load_certs_pem,
    load_private_key_pem,
    make_intermediate,
    make_root,
    private_key_pem,
)
from meshtrust.spiffe import TrustDomain

__all__ = ["ROOT_CERT", "ROOT_KEY", "init_ca_dir_under_root", "init_root_dir", "load_root_dir"]

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"


def init_root_dir(
    directory: Path,
    trust_domain: TrustDomain,
    now: dt.datetime,
    key_type: KeyType = KeyType.EC_P256,
    *,
    force: bool = False,
) -> None:
    """Create an offline root (``root-cert.pem``, ``root-key.pem`` 0600) in ``directory``.

    The root's O names ``trust_domain``: the default trust domain of the clusters made from
    it. Refuses (:class:`CADirectoryError`) to replace a root that is there, unless ``force``.
    """
    ensure_private_dir(directory)
    existing = [n for n in (ROOT_CERT, ROOT_KEY) if (directory / n).exists()]
    if existing and not force:
        raise CADirectoryError(
            f"{directory} already holds a root ({', '.join(existing)}); "
            "refusing to overwrite it (use --force to replace it)"
        )
    key = generate_key(key_type)
    root = make_root(key, trust_domain.name, now, ROOT_LIFETIME)
    write_private_file(directory / ROOT_KEY, private_key_pem(key))
    write_file_atomic(directory / ROOT_CERT, certs_pem([root]), PUBLIC_FILE_MODE)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CADirectoryError(
            f"{path} does not exist (create a root with `meshtrust ca root init --dir "
            f"{path.parent}`)"
        ) from None
    except OSError as exc:
        raise CADirectoryError(f"cannot read {path}: {exc.strerror}") from exc


def load_root_dir(directory: Path, now: dt.datetime) -> Signer:
    """The root certificate and key of a root directory, checked.

    Raises :class:`CADirectoryError` when a file is missing or unreadable, the key does not
    match, the certificate is not a self-signed CA, or it is outside its validity.
    """
    cert_path, key_path = directory / ROOT_CERT, directory / ROOT_KEY
    try:
        certs = load_certs_pem(_read(cert_path), source=str(cert_path))
        key = load_private_key_pem(_read(key_path), source=str(key_path))
    except InvalidCertificate as exc:
        raise CADirectoryError(str(exc)) from exc
    if len(certs) != 1:
        raise CADirectoryError(f"{cert_path} must hold exactly one certificate, has {len(certs)}")
    (root,) = certs
    if key.public_key() != root.public_key():
        raise CADirectoryError(f"{key_path} does not match the certificate in {cert_path}")
    try:
        bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca or root.issuer != root.subject:
        raise CADirectoryError(f"{cert_path} is not a self-signed CA certificate")
    if not root.not_valid_before_utc <= now <= root.not_valid_after_utc:
        raise CADirectoryError(
            f"{cert_path}: the root is valid only from {root.not_valid_before_utc:%Y-%m-%d} "
            f"to {root.not_valid_after_utc:%Y-%m-%d}"
        )
    return Signer(root, key)


def _root_trust_domain(root: x509.Certificate, path: Path) -> TrustDomain:
    for attr in root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME):
        try:
            return TrustDomain.parse(str(attr.value))
        except InvalidSpiffeId:
            continue
    raise CADirectoryError(f"{path}: the root's O names no trust domain; give --trust-domain")


def _key_type_of(key: PrivateKey) -> KeyType:
    """The :class:`KeyType` of ``key`` (the intermediate follows the root's by default)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return KeyType.EC_P384 if key.curve.name == "secp384r1" else KeyType.EC_P256
    return {3072: KeyType.RSA_3072, 4096: KeyType.RSA_4096}.get(key.key_size, KeyType.RSA_2048)


def init_ca_dir_under_root(
    directory: Path,
    root_dir: Path,
    now: dt.datetime,
    *,
    trust_domain: TrustDomain | None = None,
    key_type: KeyType | None = None,
    force: bool = False,
) -> TrustDomain:
    """Create a cluster CA in ``directory``: a new intermediate signed by ``root_dir``'s root.

    The trust domain defaults to the root's (Istio's clusters share one); the key type to the
    root's. The intermediate's L= is the directory's name, so clusters' intermediates differ
    by name. Returns the trust domain. Raises :class:`CADirectoryError` for a bad root or a CA
    already in ``directory`` (unless ``force``); nothing is written to ``directory`` then.
    """
    root = load_root_dir(root_dir, now)
    td = trust_domain or _root_trust_domain(root.cert, root_dir / ROOT_CERT)
    ensure_private_dir(directory)
    ours = (*ISTIO_FILES, *TLS_FILES, ROOT_KEY)
    existing = [n for n in ours if (directory / n).exists()]
    if existing and not force:
        raise CADirectoryError(
            f"{directory} already holds a CA ({', '.join(existing)}); "
            "refusing to overwrite it (use --force to replace it)"
        )
    ca_key = generate_key(key_type or _key_type_of(root.key))
    lifetime = min(INTERMEDIATE_LIFETIME, root.cert.not_valid_after_utc - now)
    ca_cert = make_intermediate(
        ca_key, root, td.name, now, lifetime, locality=directory.resolve().name
    )
    if force:
        (directory / ROOT_KEY).unlink(missing_ok=True)  # a replaced `ca init` CA's own root
    write_private_file(directory / "ca-key.pem", private_key_pem(ca_key))
    write_file_atomic(directory / "ca-cert.pem", certs_pem([ca_cert]), PUBLIC_FILE_MODE)
    write_file_atomic(directory / ROOT_CERT, certs_pem([root.cert]), PUBLIC_FILE_MODE)
    write_file_atomic(
        directory / "cert-chain.pem", certs_pem([ca_cert, root.cert]), PUBLIC_FILE_MODE
    )
    ensure_token_signing_key(directory)
    load_ca_dir(directory, now)  # what `ca serve` will check, checked now
    return td
