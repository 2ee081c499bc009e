"""``meshtrust join create MESH_FILE --host NAME``: a host's join file, made from the mesh file.

The ``join`` group's low-level commands (any identities, any CA) belong to the join
credential's own CLI; this is the mesh-level one, which works out the host's identities.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from meshtrust.cli.options import DURATION

__all__ = ["create", "join"]


@click.group()
def join() -> None:
    """Join files: what a new host of the mesh needs to get its first certificates."""


@join.command("create")
@click.argument("mesh_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--host", required=True, metavar="NAME", help="The host the file is for.")
@click.option(
    "--ttl",
    type=DURATION,
    default="1h",
    show_default=True,
    help="How long the file can be used to start the host.",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the join file (mode 0600).",
)
def create(mesh_file: Path, host: str, ttl: dt.timedelta, out: Path) -> None:
    """On the CA's host: write a join file for HOST of MESH_FILE.

    It holds the trust bundle, the CA's address and a credential that can obtain only the
    identities of the services placed on HOST, until it expires (--ttl). Copy it to HOST
    and start it with `meshtrust up MESH_FILE --host HOST --join FILE`. After their first
    certificate the host's agents renew with their certificate, so the file is needed only
    to start the host.
    """
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
    create_join_file(
        config.ca_dir, grant.identities, grant.ca_addresses, ttl, now, out, host=grant.host
    )
    ids = ", ".join(str(i) for i in grant.identities)
    click.echo(
        f"wrote {out} for host {host}: {ids}; valid until {(now + ttl):%Y-%m-%d %H:%M:%S} UTC"
    )
