"""``meshtrust join create MESH_FILE --host NAME``: a host's join file, made from the mesh file.

The ``join`` group (:mod:`meshtrust.cli.join`) is the join credential's own CLI, where any
identities and CA addresses are given by hand; given a mesh file, its ``create`` calls
:func:`create_for_mesh`, which works out the host's identities and the CA from the file.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

__all__ = ["create_for_mesh"]


def create_for_mesh(
    mesh_file: Path, host: str, ttl: dt.timedelta, out: Path, max_ttl: dt.timedelta
) -> None:
    """On the CA's host: write a join file for ``host`` of ``mesh_file``, granting the
    identities of the services placed on it. Raises ConfigError (bad mesh file, a host
    that is unknown, the CA's own or without services, no CA directory yet)."""
    from meshtrust.ca.join import create_join_file
    from meshtrust.clock import SystemClock
    from meshtrust.errors import ConfigError
    from meshtrust.mesh.config import load_mesh_config
    from meshtrust.mesh.join import plan_join

    config = load_mesh_config(mesh_file)
    grant = plan_join(config, host)
    if not (config.ca_dir / "root-cert.pem").is_file():
        raise ConfigError(
            f"no CA in {config.ca_dir}: `join create` runs on the CA's host "
            f"({config.ca_host}), after `meshtrust up {config.path} --host {config.ca_host}`"
        )
    now = SystemClock().now()
    try:
        create_join_file(
            config.ca_dir,
            grant.identities,
            grant.ca_addresses,
            ttl,
            now,
            out,
            host=grant.host,
            max_ttl=max_ttl,
        )
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from exc
    ids = ", ".join(str(i) for i in grant.identities)
    click.echo(
        f"wrote {out} for host {host}: {ids}; valid until {(now + ttl):%Y-%m-%d %H:%M:%S} UTC"
    )
