"""What a host's join file grants, from the mesh file: the identities of the services placed
on that host, and where the CA is. The CA side (tokens, the file) is
:func:`meshtrust.ca.join.create_join_file`; this only decides its arguments."""

from __future__ import annotations

from dataclasses import dataclass

from meshtrust.errors import ConfigError
from meshtrust.mesh.config import MeshConfig
from meshtrust.spiffe import SpiffeId

__all__ = ["JoinGrantPlan", "plan_join"]


@dataclass(frozen=True)
class JoinGrantPlan:
    host: str
    identities: tuple[SpiffeId, ...]
    ca_addresses: tuple[str, ...]


def plan_join(config: MeshConfig, host: str) -> JoinGrantPlan:
    """The grant of ``host``'s join file. Raises ConfigError for a mesh without hosts, an
    unknown host, the CA's own host (its agents are credentialed from the CA directory), or
    a host with no services (a join file for it would grant nothing)."""
    names = [h.name for h in config.hosts]
    if not names:
        raise ConfigError(f"{config.path} has no hosts: there is no host to join")
    if host not in names:
        raise ConfigError(f"{config.path} has no host {host!r} (hosts: {', '.join(names)})")
    if host == config.ca_host:
        raise ConfigError(
            f"{host} runs the CA: `meshtrust up {config.path} --host {host}` needs no join file"
        )
    identities = tuple(dict.fromkeys(s.spiffe_id for s in config.services_on(host)))
    if not identities:
        raise ConfigError(f"no service of {config.path} is placed on {host}: nothing to join")
    return JoinGrantPlan(host=host, identities=identities, ca_addresses=(config.ca_address,))
