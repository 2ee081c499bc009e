"""Entry point: the ``meshtrust`` group, logging, and the one place errors become messages.

Every :class:`MeshTrustError` is printed as ``error: <message>`` with exit status 2 for bad
input and 1 otherwise; a user never sees a traceback for something we anticipated.
"""

from __future__ import annotations

import logging
import sys

import click

from meshtrust import __version__
from meshtrust.errors import InvalidInput, MeshTrustError, Refused

__all__ = ["cli", "main"]


class MeshTrustGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MeshTrustError as exc:
            click.echo(f"error: {exc}", err=True)
            code = 2 if isinstance(exc, InvalidInput | Refused) else 1
            raise SystemExit(code) from None


@click.group(cls=MeshTrustGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshtrust")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="How much to log (to stderr).",
)
def cli(log_level: str) -> None:
    """meshtrust: zero-trust service identity and mutual TLS.

    A CA signs short-lived SPIFFE identities over Istio's own API; agents keep each
    workload's key and certificate fresh; Envoy sidecars enforce mTLS.

    \b
    Start here:
      meshtrust ca init --dir ./ca --trust-domain example.org
      meshtrust ca serve --ca-dir ./ca
      meshtrust token create --ca-dir ./ca --namespace default --service-account web
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _register() -> None:
    from meshtrust.cli.agent import agent
    from meshtrust.cli.ca import ca
    from meshtrust.cli.cert import cert
    from meshtrust.cli.mesh import down, status, up
    from meshtrust.cli.token import token
    from meshtrust.cli.tools import certs, check, proxy_config

    cli.add_command(ca)
    cli.add_command(agent)
    cli.add_command(up)
    cli.add_command(status)
    cli.add_command(down)
    cli.add_command(token)
    cli.add_command(cert)
    cli.add_command(proxy_config)
    cli.add_command(check)
    cli.add_command(certs)


_register()


def main() -> None:
    cli(prog_name="meshtrust")
