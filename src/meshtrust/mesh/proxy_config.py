"""``meshtrust proxy-config secret``: what a workload's Envoy holds, like
``istioctl proxy-config secret``.

:func:`proxy_secrets` reads Envoy's admin API once (``/config_dump`` of the active and the
warming secrets, ``/certs``); :func:`secret_rows` turns that into rows without I/O.

Validity is computed here from the certificate's own NotBefore/NotAfter against the current
time: Envoy's ``days_until_expiration`` is a whole number of days that reads ``"0"`` both
for a certificate with seconds left and for one that expired (istio#44929 is ``istioctl
proxy-config secret`` trusting such figures).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from meshtrust.clock import SystemClock
from meshtrust.errors import MeshTrustError
from meshtrust.mesh.probes import (
    WorkloadUnavailable,
    admin_json,
    admin_unreachable,
    certs_entries,
    require_admin,
    serial_text,
)
from meshtrust.mesh.state import MeshState
from meshtrust.mesh.timestamps import format_timestamp, parse_timestamp
from meshtrust.pki import format_serial, load_certs_pem

__all__ = ["SecretRow", "proxy_secrets", "secret_rows", "uri_sans"]


@dataclass
class SecretRow:
    """One row of ``proxy-config secret``: istioctl's columns, plus a few more in JSON."""

    resource_name: str
    type: str  # "Cert Chain" | "CA" | the Secret's field name for anything else
    status: str  # "ACTIVE" | "WARMING"
    valid_cert: bool  # NotBefore <= now < NotAfter, computed here
    serial_number: str  # format_serial ("" when there is no certificate)
    not_after: str  # 2006-01-02T15:04:05Z ("" when there is no certificate)
    not_before: str
    version_info: str | None = None
    last_updated: str | None = None
    subject_alt_names: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _secret_pem(source: object) -> bytes | None:
    """The bytes of an Envoy DataSource (inline_bytes, inline_string or filename)."""
    if not isinstance(source, dict):
        return None
    if isinstance(source.get("inline_bytes"), str):
        try:
            return base64.b64decode(source["inline_bytes"], validate=True)
        except (binascii.Error, ValueError):
            return None
    if isinstance(source.get("inline_string"), str):
        return str(source["inline_string"]).encode()
    if isinstance(source.get("filename"), str):
        try:
            return Path(source["filename"]).read_bytes()
        except OSError:
            return None
    return None


_Row = Callable[..., SecretRow]


def _rows_from_pem(
    kind: str, certs: list[x509.Certificate], row: _Row, now: dt.datetime
) -> list[SecretRow]:
    if kind == "Cert Chain":
        certs = certs[:1]  # the leaf is what the row describes; the rest is its chain
    return [
        row(
            kind,
            valid=cert.not_valid_before_utc <= now < cert.not_valid_after_utc,
            serial=format_serial(cert.serial_number),
            not_after=format_timestamp(cert.not_valid_after_utc),
            not_before=format_timestamp(cert.not_valid_before_utc),
            sans=uri_sans(cert),
        )
        for cert in certs
    ]


def _rows_from_certs(
    kind: str, entries: list[dict[str, Any]], row: _Row, now: dt.datetime
) -> list[SecretRow]:
    """Rows from Envoy's ``/certs`` entries (which carry no resource names)."""
    if kind == "Cert Chain":
        entries = entries[:1]
    rows: list[SecretRow] = []
    seen: set[object] = set()
    for entry in entries:
        serial = entry.get("serial_number")
        if serial in seen:
            continue
        seen.add(serial)
        nb = parse_timestamp(entry.get("valid_from"))
        na = parse_timestamp(entry.get("expiration_time"))
        sans = [
            str(s["uri"])
            for s in entry.get("subject_alt_names") or []
            if isinstance(s, dict) and "uri" in s
        ]
        rows.append(
            row(
                kind,
                valid=nb is not None and na is not None and nb <= now < na,
                serial=serial_text(serial) or "",
                not_after=format_timestamp(na) if na else "",
                not_before=format_timestamp(nb) if nb else "",
                sans=sans,
            )
        )
    return rows


def _rows_for_secret(
    config: Mapping[str, Any],
    status: str,
    certs_json: Any,
    now: dt.datetime,
) -> list[SecretRow]:
    name = str(config.get("name", "?"))
    version = config.get("version_info")
    updated = config.get("last_updated")
    secret = config.get("secret")
    secret = secret if isinstance(secret, dict) else {}

    def row(
        kind: str,
        valid: bool = False,
        serial: str = "",
        not_after: str = "",
        not_before: str = "",
        sans: list[str] | None = None,
    ) -> SecretRow:
        return SecretRow(
            resource_name=name,
            type=kind,
            status=status,
            valid_cert=valid,
            serial_number=serial,
            not_after=not_after,
            not_before=not_before,
            version_info=str(version) if version is not None else None,
            last_updated=str(updated) if updated is not None else None,
            subject_alt_names=sans or [],
        )

    if "tls_certificate" in secret:
        kind, certs_key = "Cert Chain", "cert_chain"
        pem = _secret_pem((secret["tls_certificate"] or {}).get("certificate_chain"))
    elif "validation_context" in secret:
        kind, certs_key = "CA", "ca_cert"
        pem = _secret_pem((secret["validation_context"] or {}).get("trusted_ca"))
    else:
        kinds = [k for k in secret if k not in ("@type", "name")]
        return [row(kinds[0] if kinds else "-")]
    certs: list[x509.Certificate] = []
    if pem is not None:
        try:
            certs = load_certs_pem(pem, source=f"Envoy secret {name}")
        except MeshTrustError:
            certs = []
    # No PEM in the config dump (a future Envoy might redact it): fall back to /certs.
    rows = _rows_from_pem(kind, certs, row, now) or _rows_from_certs(
        kind, certs_entries(certs_json, certs_key), row, now
    )
    return rows or [row(kind)]


def _dump_configs(dump: Any) -> list[dict[str, Any]]:
    # With no secret of the kind, Envoy answers `{}` rather than `{"configs": []}`.
    if not isinstance(dump, dict):
        return []
    return [c for c in dump.get("configs") or [] if isinstance(c, dict)]


def secret_rows(active: Any, warming: Any, certs_json: Any, now: dt.datetime) -> list[SecretRow]:
    """The rows for Envoy's active and warming secrets (``/config_dump`` answers) and its
    ``/certs`` answer, at ``now``. Pure."""
    rows: list[SecretRow] = []
    for config in _dump_configs(active):
        rows += _rows_for_secret(config, "ACTIVE", certs_json, now)
    for config in _dump_configs(warming):
        rows += _rows_for_secret(config, "WARMING", certs_json, now)
    # Envoy's order varies: the certificate first, then the validation contexts by name.
    return sorted(rows, key=lambda r: (r.resource_name != "default", r.resource_name))


def proxy_secrets(
    state: MeshState, workload: str, now: dt.datetime | None = None
) -> list[SecretRow]:
    """``istioctl proxy-config secret``'s rows for ``workload``, from its live Envoy.

    Raises ConfigError for an unknown workload, WorkloadUnavailable when its agent or Envoy
    is down.
    """
    svc = state.service(workload)
    _, admin = require_admin(svc)
    active = admin_json(admin, "/config_dump?resource=dynamic_active_secrets")
    if active is None:
        raise WorkloadUnavailable(
            f"the Envoy of {workload} does not answer on {admin}: {admin_unreachable(admin)}"
        )
    warming = admin_json(admin, "/config_dump?resource=dynamic_warming_secrets")
    certs_json = admin_json(admin, "/certs")
    return secret_rows(active, warming, certs_json, now or SystemClock().now())
