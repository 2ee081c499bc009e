"""The ``federation`` settings of a CA (``ca serve --config``, mesh.yaml ``federation``).

::

    federation:
      bundleEndpoint:                  # serve this trust domain's bundle (optional)
        listen: 0.0.0.0:8443
        profile: https_spiffe          # or https_web (then certFile and keyFile)
        refreshHint: 5m                # spiffe_refresh_hint of the document
      federatesWith:                   # trust domains whose bundles the CA fetches
      - trustDomain: west.test
        bundleEndpointUrl: https://198.18.0.2:8443/
        profile: https_spiffe
        endpointSpiffeId: spiffe://west.test/meshtrust/bundle-endpoint
        bootstrapBundle: west-bundle.json   # PEM or bundle document, from an offline exchange

``https_web`` endpoints are checked against the system's Web PKI roots, or ``caFile`` when
given (a private Web PKI). Every problem is a :class:`ConfigError` with the field path
(``federation.federatesWith[0].endpointSpiffeId``); the settings loader adds file and line.
"""

from __future__ import annotations

import datetime as dt
import enum
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshtrust.config.validators import (
    check_duration,
    check_host_port,
    check_path,
    check_spiffe_id,
    check_string,
    check_trust_domain,
    describe,
)
from meshtrust.errors import ConfigError
from meshtrust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "DEFAULT_REFRESH_HINT",
    "BundleEndpointConfig",
    "EndpointProfile",
    "FederatedTrustDomain",
    "FederationConfig",
    "check_federation",
    "federation_settings",
]

DEFAULT_REFRESH_HINT = dt.timedelta(minutes=5)  # the standard's suggested default


class EndpointProfile(enum.StrEnum):
    """How a bundle endpoint is authenticated (SPIFFE Federation, section 5)."""

    HTTPS_SPIFFE = "https_spiffe"  # served with an SVID of its trust domain
    HTTPS_WEB = "https_web"  # served with a Web PKI certificate


@dataclass(frozen=True, slots=True)
class BundleEndpointConfig:
    listen: str
    profile: EndpointProfile = EndpointProfile.HTTPS_SPIFFE
    refresh_hint: dt.timedelta = DEFAULT_REFRESH_HINT
    cert_file: Path | None = None  # https_web
    key_file: Path | None = None  # https_web


@dataclass(frozen=True, slots=True)
class FederatedTrustDomain:
    trust_domain: TrustDomain
    bundle_endpoint_url: str
    profile: EndpointProfile
    endpoint_spiffe_id: SpiffeId | None = None  # https_spiffe
    bootstrap_bundle: Path | None = None  # https_spiffe
    ca_file: Path | None = None  # https_web: roots other than the system's

    @property
    def host_port_path(self) -> tuple[str, int, str]:
        """(host, port, path-and-query) of the endpoint URL."""
        url = urllib.parse.urlsplit(self.bundle_endpoint_url)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        return url.hostname or "", url.port or 443, path


@dataclass(frozen=True, slots=True)
class FederationConfig:
    bundle_endpoint: BundleEndpointConfig | None = None
    federates_with: tuple[FederatedTrustDomain, ...] = ()


def _mapping(value: object, field: str, allowed: set[str]) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {describe(value)}", field=field)
    for key in value:
        if key not in allowed:
            raise ConfigError(
                f"unknown key (known keys: {', '.join(sorted(allowed))})", field=f"{field}.{key}"
            )
    return value


def _profile(value: object, field: str) -> EndpointProfile:
    text = check_string(value, field)
    try:
        return EndpointProfile(text)
    except ValueError:
        choices = ", ".join(p.value for p in EndpointProfile)
        raise ConfigError(f"unknown profile {text!r} (one of: {choices})", field=field) from None


def _url(value: object, field: str) -> str:
    text = check_string(value, field)
    url = urllib.parse.urlsplit(text)
    if url.scheme != "https" or not url.hostname:
        raise ConfigError(f"{text!r} is not an https:// URL with a host", field=field)
    try:
        url.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"{text!r} has a bad port", field=field) from None
    if url.username or url.password or url.fragment:
        raise ConfigError(f"{text!r} may not have user info or a fragment", field=field)
    return text


def _endpoint(value: object, field: str, base: Path) -> BundleEndpointConfig:
    raw = _mapping(value, field, {"listen", "profile", "refreshHint", "certFile", "keyFile"})
    if "listen" not in raw:
        raise ConfigError("missing required key 'listen'", field=field)
    listen = check_host_port(raw["listen"], f"{field}.listen")
    profile = _profile(raw.get("profile", "https_spiffe"), f"{field}.profile")
    hint = DEFAULT_REFRESH_HINT
    if "refreshHint" in raw:
        hint = check_duration(raw["refreshHint"], f"{field}.refreshHint")
        if hint < dt.timedelta(seconds=1):
            raise ConfigError("must be at least 1s", field=f"{field}.refreshHint")
    files = {
        k: check_path(raw[k], f"{field}.{k}", base) for k in ("certFile", "keyFile") if k in raw
    }
    if profile is EndpointProfile.HTTPS_WEB and len(files) != 2:
        missing = next(k for k in ("certFile", "keyFile") if k not in files)
        raise ConfigError(
            f"the https_web profile needs certFile and keyFile (missing {missing})", field=field
        )
    if profile is EndpointProfile.HTTPS_SPIFFE and files:
        raise ConfigError(
            f"{next(iter(files))} is for https_web; https_spiffe serves an SVID the CA issues",
            field=f"{field}.{next(iter(files))}",
        )
    return BundleEndpointConfig(listen, profile, hint, files.get("certFile"), files.get("keyFile"))


_PEER_KEYS = {
    "trustDomain",
    "bundleEndpointUrl",
    "profile",
    "endpointSpiffeId",
    "bootstrapBundle",
    "caFile",
}


def _peer(value: object, field: str, base: Path) -> FederatedTrustDomain:
    raw = _mapping(value, field, _PEER_KEYS)
    for key in ("trustDomain", "bundleEndpointUrl", "profile"):
        if key not in raw:
            raise ConfigError(f"missing required key {key!r}", field=field)
    td = check_trust_domain(raw["trustDomain"], f"{field}.trustDomain")
    url = _url(raw["bundleEndpointUrl"], f"{field}.bundleEndpointUrl")
    profile = _profile(raw["profile"], f"{field}.profile")
    if profile is EndpointProfile.HTTPS_SPIFFE:
        for key in ("endpointSpiffeId", "bootstrapBundle"):
            if key not in raw:
                raise ConfigError(f"the https_spiffe profile needs {key!r}", field=field)
        if "caFile" in raw:
            raise ConfigError("caFile is for https_web", field=f"{field}.caFile")
        spiffe_id = check_spiffe_id(raw["endpointSpiffeId"], f"{field}.endpointSpiffeId")
        if spiffe_id.trust_domain != td:
            raise ConfigError(
                f"{spiffe_id} is not in trust domain {td}: the endpoint serves with an SVID of "
                "the trust domain whose bundle it serves",
                field=f"{field}.endpointSpiffeId",
            )
        bootstrap = check_path(raw["bootstrapBundle"], f"{field}.bootstrapBundle", base)
        return FederatedTrustDomain(td, url, profile, spiffe_id, bootstrap)
    for key in ("endpointSpiffeId", "bootstrapBundle"):
        if key in raw:
            raise ConfigError(f"{key} is for https_spiffe", field=f"{field}.{key}")
    ca_file = check_path(raw["caFile"], f"{field}.caFile", base) if "caFile" in raw else None
    return FederatedTrustDomain(td, url, profile, ca_file=ca_file)


def check_federation(value: object, field: str, base: Path) -> FederationConfig:
    """The ``federation`` mapping, checked; relative paths are resolved against ``base``.

    Raises :class:`ConfigError` naming the field path of the first problem.
    """
    raw = _mapping(value, field, {"bundleEndpoint", "federatesWith"})
    endpoint = (
        _endpoint(raw["bundleEndpoint"], f"{field}.bundleEndpoint", base)
        if raw.get("bundleEndpoint") is not None
        else None
    )
    peers_raw = raw.get("federatesWith") or []
    if not isinstance(peers_raw, list):
        raise ConfigError(
            f"expected a list, got {describe(peers_raw)}", field=f"{field}.federatesWith"
        )
    peers: list[FederatedTrustDomain] = []
    for i, item in enumerate(peers_raw):
        peer = _peer(item, f"{field}.federatesWith[{i}]", base)
        if any(p.trust_domain == peer.trust_domain for p in peers):
            raise ConfigError(
                f"trust domain {peer.trust_domain} is listed twice",
                field=f"{field}.federatesWith[{i}].trustDomain",
            )
        peers.append(peer)
    return FederationConfig(endpoint, tuple(peers))


def _seconds(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds():g}s"


def federation_settings(config: FederationConfig) -> dict[str, object]:
    """``config`` as the ``federation`` mapping :func:`check_federation` reads (paths
    absolute): how ``meshtrust up`` hands mesh.yaml's section to ``ca serve --config``."""
    out: dict[str, object] = {}
    endpoint = config.bundle_endpoint
    if endpoint is not None:
        raw: dict[str, object] = {
            "listen": endpoint.listen,
            "profile": endpoint.profile.value,
            "refreshHint": _seconds(endpoint.refresh_hint),
        }
        if endpoint.cert_file is not None:
            raw["certFile"] = str(endpoint.cert_file.resolve())
        if endpoint.key_file is not None:
            raw["keyFile"] = str(endpoint.key_file.resolve())
        out["bundleEndpoint"] = raw
    peers: list[dict[str, object]] = []
    for peer in config.federates_with:
        item: dict[str, object] = {
            "trustDomain": peer.trust_domain.name,
            "bundleEndpointUrl": peer.bundle_endpoint_url,
            "profile": peer.profile.value,
        }
        if peer.endpoint_spiffe_id is not None:
            item["endpointSpiffeId"] = str(peer.endpoint_spiffe_id)
        if peer.bootstrap_bundle is not None:
            item["bootstrapBundle"] = str(peer.bootstrap_bundle.resolve())
        if peer.ca_file is not None:
            item["caFile"] = str(peer.ca_file.resolve())
        peers.append(item)
    if peers:
        out["federatesWith"] = peers
    return out
