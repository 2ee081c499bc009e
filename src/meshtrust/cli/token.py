"""``meshtrust token``: bearer tokens for workloads outside Kubernetes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from meshtrust.ca.cadir import ensure_token_signing_key, load_ca_dir, token_issuer_for
from meshtrust.cli.options import DURATION
from meshtrust.clock import SystemClock
from meshtrust.config import as_trust_domain
from meshtrust.errors import ConfigError, InvalidSpiffeId
from meshtrust.spiffe import SpiffeId

__all__ = ["token"]


@click.group()
def token() -> None:
    """Bearer tokens for workloads outside Kubernetes."""


@token.command("create")
@click.option(
    "--ca-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="CA directory (its token issuer key token-key.pem is made on first use).",
)
@click.option("--namespace", required=True, help="Namespace of the workload.")
@click.option("--service-account", required=True, help="Service account of the workload.")
@click.option(
    "--ttl", type=DURATION, default="24h", show_default=True, help="How long the token is valid."
)
@click.option("--audience", default="istio-ca", show_default=True, help="Token audience.")
@click.option("--trust-domain", help="Trust domain.  [default: the root certificate's O]")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the token to this file (mode 0600) instead of printing it.",
)
def create(
    ca_dir: Path,
    namespace: str,
    service_account: str,
    ttl: dt.timedelta,
    audience: str,
    trust_domain: str | None,
    output: Path | None,
) -> None:
    """Mint a service-account token the CA accepts.

    The token has Kubernetes' projected-token form (sub system:serviceaccount:NS:SA,
    audience istio-ca) and is signed by the CA's own issuer key, so a VM or laptop
    workload can get spiffe://TD/ns/NS/sa/SA without a Kubernetes cluster.
    """
    from meshtrust.ca.authn import mint_token

    clock = SystemClock()
    material = load_ca_dir(ca_dir, clock.now())  # a CA is there, and it is usable
    # A plugged-in CA gets its token issuer on first use (token-key.pem, 0600).
    key = ensure_token_signing_key(ca_dir)
    if trust_domain is not None:
        td = as_trust_domain(trust_domain, "--trust-domain", Path())
    else:
        hint = material.trust_domain_hint()
        if hint is None:
            raise ConfigError("cannot tell the trust domain from the root; pass --trust-domain")
        td = hint
    try:
        SpiffeId.for_workload(td, namespace, service_account)
    except InvalidSpiffeId as exc:
        raise ConfigError(str(exc)) from exc
    if ttl.total_seconds() <= 0:
        raise ConfigError("--ttl must be positive")
    jwt_text = mint_token(
        key, token_issuer_for(td), namespace, service_account, clock.now(), ttl, audience
    )
    if output is None:
        click.echo(jwt_text)
    else:
        from meshtrust.fileio import write_private_file

        write_private_file(output, jwt_text.encode() + b"\n")
        click.echo(
            f"wrote a token for spiffe://{td}/ns/{namespace}/sa/{service_account} to {output}",
            err=True,
        )
