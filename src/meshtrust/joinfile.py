"""The join file: what a new host needs to get its services' first certificates.

A join file (SPIRE's join token, Istio's VM onboarding bundle) carries the trust bundle, the
CA's address(es), and a join token: a credential of the CA's own token issuer that can obtain
only the SPIFFE IDs listed in it (the services placed on one host), until it expires. After
their first certificate the host's agents renew with that certificate, so the file is only
needed to start a host. See docs/join.md.

The document is JSON (so also YAML), read with the one config loader so every problem names
the file, line and field. Its format lives here, in a shared leaf, because both sides need
it: the CA writes it (:mod:`meshtrust.ca.join` mints the token and calls
:func:`render_join_document`), and the agent, which may not import the CA, reads it with
:func:`load_join_file`.

    {"kind": "MeshtrustJoin", "version": 1, "host": "h2",
     "identities": ["spiffe://example.org/ns/default/sa/web", ...],
     "caAddresses": ["198.18.0.1:15012"], "expiresAt": "2026-12-02T03:00:00Z",
     "trustBundle": "-----BEGIN CERTIFICATE-----...", "token": "eyJ..."}

The token is a bearer credential: the file is written 0600 and refused when others may read
it; no message here ever includes the token.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshtrust.config import LineMap, check_host_port, check_spiffe_id, check_string, line_for
from meshtrust.errors import ConfigError, InvalidCertificate
from meshtrust.pki import load_certs_pem
from meshtrust.spiffe import SpiffeId

__all__ = [
    "JOIN_FILE_VERSION",
    "JOIN_KIND",
    "JoinFile",
    "check_host_name",
    "load_join_file",
    "render_join_document",
]

JOIN_KIND = "MeshtrustJoin"
JOIN_FILE_VERSION = 1
_FIELDS = ("kind", "version", "host", "identities", "caAddresses", "expiresAt", "trustBundle")
_MAX_HOST = 253


@dataclass(frozen=True, slots=True)
class JoinFile:
    """A loaded, checked join file. ``token`` is a secret: never log or print it."""

    bundle_pem: bytes
    ca_addresses: tuple[str, ...]
    token: str
    expires_at: dt.datetime
    identities: tuple[SpiffeId, ...]
    host: str

    def __repr__(self) -> str:  # keep the token out of tracebacks and debug logs
        return (
            f"JoinFile(host={self.host!r}, identities={[str(i) for i in self.identities]}, "
            f"ca_addresses={self.ca_addresses}, expires_at={self.expires_at.isoformat()})"
        )

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.expires_at


def check_host_name(value: object, field: str) -> str:
    """A host name as mesh.yaml's ``hosts[].name``: letters, digits, ``-``, ``.`` and ``_``."""
    text = check_string(value, field)
    ok = len(text) <= _MAX_HOST and text.isascii() and text[0].isalnum()
    if not ok or not all(c.isalnum() or c in "-._" for c in text):
        raise ConfigError(
            "a host name is letters, digits, '-', '.' and '_', starting with a letter or digit",
            field=field,
        )
    return text


def _utc_text(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_join_document(
    *,
    host: str,
    identities: Sequence[SpiffeId],
    ca_addresses: Sequence[str],
    expires_at: dt.datetime,
    bundle_pem: bytes,
    token: str,
) -> bytes:
    """The join file's bytes (the inverse of :func:`load_join_file`)."""
    document = {
        "kind": JOIN_KIND,
        "version": JOIN_FILE_VERSION,
        "host": host,
        "identities": [str(i) for i in identities],
        "caAddresses": list(ca_addresses),
        "expiresAt": _utc_text(expires_at),
        "trustBundle": bundle_pem.decode("ascii"),
        "token": token,
    }
    return json.dumps(document, indent=2).encode() + b"\n"


def _check_mode(path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot be read: {exc.strerror or exc}", file=path) from exc
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError("is not a regular file", file=path)
    if st.st_mode & 0o077:
        raise ConfigError(
            f"has mode {stat.S_IMODE(st.st_mode):04o}: a join file holds a credential and "
            f"must be readable by its owner only (chmod 600 {path})",
            file=path,
        )


def _expiry(value: object, field: str) -> dt.datetime:
    if isinstance(value, dt.datetime):  # YAML reads an unquoted timestamp itself
        when = value
    else:
        text = check_string(value, field)
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(
                f"expected a UTC time such as 2026-12-02T03:00:00Z, got {text[:40]!r}",
                field=field,
            ) from None
    if when.tzinfo is None:
        raise ConfigError("the time needs a zone (end it with Z for UTC)", field=field)
    return when.astimezone(dt.UTC)


def _list(value: object, field: str) -> list[object]:
    if not isinstance(value, list) or not value:
        raise ConfigError("expected a non-empty list", field=field)
    return list(value)


def _parse(doc: LineMap) -> JoinFile:
    for name in (*_FIELDS, "token"):
        if name not in doc:
            raise ConfigError("is missing", field=name)
    unknown = sorted(str(k) for k in doc if k not in (*_FIELDS, "token"))
    if unknown:
        raise ConfigError("unknown field", field=unknown[0])
    if doc["kind"] != JOIN_KIND:
        raise ConfigError(f"expected {JOIN_KIND!r}", field="kind")
    version = doc["version"]
    if isinstance(version, bool) or version != JOIN_FILE_VERSION:
        raise ConfigError(
            f"join file version {str(version)[:20]} is not supported (this meshtrust reads "
            f"version {JOIN_FILE_VERSION}); make the file with this meshtrust's join create",
            field="version",
        )
    host = check_host_name(doc["host"], "host")
    identities = tuple(
        check_spiffe_id(v, f"identities[{i}]")
        for i, v in enumerate(_list(doc["identities"], "identities"))
    )
    domains = {i.trust_domain for i in identities}
    if len(domains) > 1:
        raise ConfigError("every identity must be in one trust domain", field="identities")
    addresses = tuple(
        check_host_port(v, f"caAddresses[{i}]", zero=False)
        for i, v in enumerate(_list(doc["caAddresses"], "caAddresses"))
    )
    expires_at = _expiry(doc["expiresAt"], "expiresAt")
    bundle = check_string(doc["trustBundle"], "trustBundle").encode("utf-8")
    try:
        load_certs_pem(bundle, source="trust bundle")
    except InvalidCertificate as exc:
        raise ConfigError(str(exc), field="trustBundle") from exc
    token = doc["token"]
    if not isinstance(token, str) or not token.strip():
        raise ConfigError("expected the join token (a non-empty string)", field="token")
    token = token.strip()
    if not token.isascii() or token.count(".") != 2 or any(c.isspace() for c in token):
        raise ConfigError("is not a JWT (the value is not shown: it is a secret)", field="token")
    return JoinFile(
        bundle_pem=bundle,
        ca_addresses=addresses,
        token=token,
        expires_at=expires_at,
        identities=identities,
        host=host,
    )


def load_join_file(path: Path) -> JoinFile:
    """Read and check the join file at ``path``.

    Raises :class:`ConfigError` naming the file, line and field: unreadable, readable by
    group or others (``chmod 600``), not the join document, an unknown version, a missing or
    bad field (PEM, address, SPIFFE ID, time). Expiry is not checked here: the caller knows
    the time and whether it still has a certificate.
    """
    from meshtrust.config.yaml import load_yaml_mapping

    path = Path(path)
    _check_mode(path)
    doc = load_yaml_mapping(path)
    try:
        return _parse(doc)
    except ConfigError as exc:
        raise exc.located(path, line_for(doc, exc.field) if exc.field else None) from None
