"""``meshtrust join``: join files, the credential that starts a host (docs/join.md)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import click

from meshtrust.cli.options import DURATION
from meshtrust.clock import SystemClock
from meshtrust.config import check_spiffe_id
from meshtrust.durations import format_duration
from meshtrust.errors import ConfigError
from meshtrust.spiffe import SpiffeId

__all__ = ["join"]


@click.group()
def join() -> None:
    """Join files: what a new host needs for its services' first certificates."""


def _identities(values: Sequence[str]) -> list[SpiffeId]:
    return [check_spiffe_id(v, "--identity") for v in values]


@join.command("create")
@click.argument("mesh_file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="CA directory (its token issuer key signs the join token).  [required]",
)
@click.option("--host", "host", required=True, help="Name of the host the file starts.")
@click.option(
    "--identity",
    "identities",
    multiple=True,
    help="SPIFFE ID the host may obtain (repeatable): its services'.  [required]",
)
@click.option(
    "--ca-address",
    "ca_addresses",
    multiple=True,
    help="HOST:PORT the host reaches the CA at (repeatable).  [required]",
)
@click.option(
    "--ttl",
    type=DURATION,
    default="1h",
    show_default=True,
    help="How long the join file may start agents (at most 24h without --max-ttl).",
)
@click.option(
    "--max-ttl",
    type=DURATION,
    default="24h",
    show_default=True,
    help="Raise the bound on --ttl (a join file is a bearer credential: keep it short).",
)
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the join file here (mode 0600).",
)
def create(
    mesh_file: Path | None,
    ca_dir: Path | None,
    host: str,
    identities: tuple[str, ...],
    ca_addresses: tuple[str, ...],
    ttl: dt.timedelta,
    max_ttl: dt.timedelta,
    output: Path,
) -> None:
    """Write a join file for HOST: the trust bundle, the CA's address(es) and a token that
    obtains only the given identities, until --ttl runs out. Copy it to the host (it is a
    credential) and start its agents with `meshtrust agent --join FILE`; they renew with
    their certificates after that, so the file is needed only to start the host.

    With MESH_FILE (on the CA's host of a mesh across hosts: `meshtrust join create
    mesh.yaml --host h2 -o h2.join`), the identities are those of the services placed on
    HOST and the CA directory and address are the mesh's; start the host with `meshtrust up
    mesh.yaml --host h2 --join h2.join`.
    """
    from meshtrust.ca.join import create_join_file

    if mesh_file is not None:
        from meshtrust.cli.join_mesh import create_for_mesh

        if ca_dir is not None or identities or ca_addresses:
            raise ConfigError(
                "with a mesh file, the CA directory, the identities and the CA's address "
                "come from it: drop --ca-dir, --identity and --ca-address"
            )
        create_for_mesh(mesh_file, host, ttl, output, max_ttl)
        return

    if ca_dir is None:
        raise ConfigError("--ca-dir is required")
    if not identities:
        raise ConfigError("give at least one --identity (the SPIFFE IDs placed on the host)")
    if not ca_addresses:
        raise ConfigError("give --ca-address HOST:PORT (how the host reaches the CA)")
    now = SystemClock().now()
    try:
        create_join_file(
            ca_dir,
            _identities(identities),
            ca_addresses,
            ttl,
            now,
            output,
            host=host,
            max_ttl=max_ttl,
        )
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc
    click.echo(
        f"wrote a join file for host {host} ({len(set(identities))} identities, valid for "
        f"{format_duration(ttl)}) to {output}",
        err=True,
    )


@join.command("show")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def show(file: Path) -> None:
    """What the join FILE grants and until when (never the token)."""
    from cryptography import x509

    from meshtrust.joinfile import load_join_file

    joined = load_join_file(file)
    now = SystemClock().now()
    if joined.expired(now):
        state = f"EXPIRED {format_duration(now - joined.expires_at)} ago"
    else:
        state = f"valid for {format_duration(joined.expires_at - now)}"
    click.echo(f"host:        {joined.host}")
    click.echo(f"expires:     {joined.expires_at:%Y-%m-%d %H:%M:%SZ} ({state})")
    click.echo(f"CA:          {', '.join(joined.ca_addresses)}")
    click.echo("identities:")
    for identity in joined.identities:
        click.echo(f"  {identity}")
    click.echo("trusted roots:")
    for root in x509.load_pem_x509_certificates(joined.bundle_pem):
        click.echo(f"  {root.subject.rfc4514_string()} (until {root.not_valid_after_utc:%Y-%m-%d})")
