"""``meshtrust cert``: get a workload certificate from a CA once (what the agent automates)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import click

from meshtrust.caapi import CaClient
from meshtrust.cli.options import DURATION
from meshtrust.errors import ConfigError, InvalidCertificate
from meshtrust.fileio import (
    PUBLIC_FILE_MODE,
    ensure_private_dir,
    write_file_atomic,
    write_private_file,
)
from meshtrust.pki import (
    KeyType,
    build_csr,
    format_serial,
    generate_key,
    load_certs_pem,
    private_key_pem,
)
from meshtrust.spiffe import SpiffeId

__all__ = ["cert"]


@click.group()
def cert() -> None:
    """One-off workload certificates (the agent keeps them fresh automatically)."""


@cert.command("request")
@click.option(
    "--ca-address", default="127.0.0.1:15012", show_default=True, help="The CA's gRPC address."
)
@click.option(
    "--ca-root",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Root certificate(s) to verify the CA with (root-cert.pem).",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File with the bearer token (from `meshtrust token create`).",
)
@click.option("--spiffe-id", required=True, help="The identity to ask for.")
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    default=KeyType.EC_P256.value,
    show_default=True,
)
@click.option(
    "--ttl", type=DURATION, default="0s", help="Requested lifetime (0 = the CA's default)."
)
@click.option(
    "--out-dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Where to write cert-chain.pem, key.pem (0600) and root-cert.pem.",
)
def request(
    ca_address: str,
    ca_root: Path,
    token_file: Path | None,
    spiffe_id: str,
    key_type: str,
    ttl: dt.timedelta,
    out_dir: Path,
) -> None:
    """Generate a key here, send a CSR to the CA, write the certificate files.

    The private key never leaves this machine: only the CSR is sent.
    """
    sid = SpiffeId.parse(spiffe_id)
    try:
        root_pem = ca_root.read_bytes()
        load_certs_pem(root_pem, source=str(ca_root))
    except OSError as exc:
        raise ConfigError(f"--ca-root {ca_root}: {exc.strerror}") from exc
    except InvalidCertificate as exc:
        raise ConfigError(f"--ca-root: {exc}") from exc
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: {exc.strerror}") from exc
    key = generate_key(KeyType(key_type))
    csr = build_csr(key, sid)

    client = CaClient(ca_address, root_pem, root_source=str(ca_root))
    chain = asyncio.run(client.sign(csr, token=token, ttl_seconds=int(ttl.total_seconds())))
    ensure_private_dir(out_dir)
    write_private_file(out_dir / "key.pem", private_key_pem(key))
    write_file_atomic(out_dir / "cert-chain.pem", "".join(chain[:-1]).encode(), PUBLIC_FILE_MODE)
    write_file_atomic(out_dir / "root-cert.pem", chain[-1].encode(), PUBLIC_FILE_MODE)
    leaf = load_certs_pem(chain[0].encode())[0]
    click.echo(
        f"issued {sid} serial {format_serial(leaf.serial_number)} valid until "
        f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}; files in {out_dir}"
    )
