"""Where the Kubernetes API server is and how to prove who we are to it.

Two sources, as client-go has them: the *in-cluster* config (the pod's service-account token
and cluster CA under ``/var/run/secrets/kubernetes.io/serviceaccount``, the server from
``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``), and a *kubeconfig* file, read
through the one config layer (:mod:`meshtrust.config`) so a mistake names file, line and
field. Only bearer-token users are supported (``token`` or ``tokenFile``): that is what a
service account has. TLS is always verified; ``insecure-skip-tls-verify`` is refused.

The token is never kept in a message, and a token *file* is re-read for every request: the
kubelet rotates projected tokens in place.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from meshtrust.config import check_path, check_string, line_for, load_yaml_mapping
from meshtrust.errors import ConfigError

__all__ = [
    "IN_CLUSTER_DIR",
    "KubeConfig",
    "in_cluster_config",
    "load_kube_source",
    "load_kubeconfig",
    "parse_server_url",
]

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class KubeConfig:
    """An API server and our credential for it (nothing read yet but the CA)."""

    host: str
    port: int
    ca_pem: str = field(repr=False)
    token_file: Path | None = None
    token: str | None = field(default=None, repr=False)
    source: str = ""  # "in-cluster" or the kubeconfig path, for messages

    @property
    def server(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def read_token(self) -> str:
        """The bearer token, re-read from its file each time. Raises :class:`ConfigError`."""
        if self.token is not None:
            return self.token
        assert self.token_file is not None
        try:
            text = self.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the Kubernetes token file: {exc.strerror}", file=self.token_file
            ) from exc
        if not text:
            raise ConfigError("the Kubernetes token file is empty", file=self.token_file)
        return text


def parse_server_url(text: str, *, field: str) -> tuple[str, int]:
    """``https://host[:port]`` (no path) -> ``(host, port)``; raises :class:`ConfigError`."""
    parts = urlsplit(text)
    if parts.scheme != "https":
        raise ConfigError(f"server {text!r} must be an https:// URL", field=field)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"server {text!r} must be https://HOST[:PORT] only", field=field)
    try:
        port = parts.port or 443
    except ValueError:
        raise ConfigError(f"server {text!r} has an invalid port", field=field) from None
    if not parts.hostname:
        raise ConfigError(f"server {text!r} has no host", field=field)
    return parts.hostname, port


def in_cluster_config(environ: Mapping[str, str], directory: Path = IN_CLUSTER_DIR) -> KubeConfig:
    """The pod's own config. Raises :class:`ConfigError` saying what is missing."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port_text = environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port_text:
        raise ConfigError(
            "not running in a Kubernetes pod: KUBERNETES_SERVICE_HOST/PORT are not set "
            "(pass a kubeconfig file instead of in-cluster)"
        )
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"KUBERNETES_SERVICE_PORT {port_text[:20]!r} is not a port")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        check_string(host, "KUBERNETES_SERVICE_HOST")
    ca_file = directory / "ca.crt"
    try:
        ca_pem = ca_file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster CA: {exc.strerror}", file=ca_file) from exc
    token_file = directory / "token"
    if not token_file.exists():
        raise ConfigError("no service-account token (is it mounted?)", file=token_file)
    return KubeConfig(host, int(port_text), ca_pem, token_file=token_file, source="in-cluster")


def _named(items: object, kind: str, name: str, file: Path) -> tuple[int, Mapping[str, object]]:
    if not isinstance(items, list):
        raise ConfigError(f"expected a list of {kind}s", file=file, field=f"{kind}s")
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == name:
            body = item.get(kind)
            if not isinstance(body, dict):
                raise ConfigError("expected a mapping", file=file, field=f"{kind}s[{i}].{kind}")
            return i, body
    raise ConfigError(f"no {kind} named {name!r}", file=file, field=f"{kind}s")


def _ca_pem(cluster: Mapping[str, object], where: str, base: Path) -> str:
    if cluster.get("insecure-skip-tls-verify"):
        raise ConfigError("insecure-skip-tls-verify is not supported: TLS is always verified",
                          field=f"{where}.insecure-skip-tls-verify")  # fmt: skip
    if "certificate-authority-data" in cluster:
        data = check_string(cluster["certificate-authority-data"],
                            f"{where}.certificate-authority-data")  # fmt: skip
        try:
            return base64.b64decode(data, validate=True).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError("is not base64 of a PEM bundle",
                              field=f"{where}.certificate-authority-data") from None  # fmt: skip
    if "certificate-authority" in cluster:
        path = check_path(cluster["certificate-authority"], f"{where}.certificate-authority", base)
        try:
            return path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}",
                              field=f"{where}.certificate-authority") from exc  # fmt: skip
    raise ConfigError("needs certificate-authority or certificate-authority-data", field=where)


def load_kubeconfig(path: Path, context: str | None = None) -> KubeConfig:
    """The cluster and user of ``context`` (default: ``current-context``) in a kubeconfig.

    Raises :class:`ConfigError` naming the file, line and field.
    """
    doc = load_yaml_mapping(path)
    base = path.parent
    try:
        name = context or check_string(doc.get("current-context"), "current-context")
        _, ctx = _named(doc.get("contexts"), "context", name, path)
        cluster_name = check_string(ctx.get("cluster"), f"context {name}.cluster")
        user_name = check_string(ctx.get("user"), f"context {name}.user")
        ci, cluster = _named(doc.get("clusters"), "cluster", cluster_name, path)
        where = f"clusters[{ci}].cluster"
        host, port = parse_server_url(
            check_string(cluster.get("server"), f"{where}.server"), field=f"{where}.server"
        )
        ca_pem = _ca_pem(cluster, where, base)
        ui, user = _named(doc.get("users"), "user", user_name, path)
        uwhere = f"users[{ui}].user"
        if "token" in user:
            token = check_string(user["token"], f"{uwhere}.token")
            return KubeConfig(host, port, ca_pem, token=token, source=str(path))
        if "tokenFile" in user:
            token_file = check_path(user["tokenFile"], f"{uwhere}.tokenFile", base)
            return KubeConfig(host, port, ca_pem, token_file=token_file, source=str(path))
        raise ConfigError(
            "only bearer-token users (token or tokenFile) are supported", field=uwhere
        )
    except ConfigError as exc:
        raise exc.located(path, line_for(doc, exc.field)) from None


def load_kube_source(source: str, environ: Mapping[str, str]) -> KubeConfig:
    """``"in-cluster"`` -> :func:`in_cluster_config`; anything else is a kubeconfig path."""
    if source == "in-cluster":
        return in_cluster_config(environ)
    return load_kubeconfig(Path(source))
