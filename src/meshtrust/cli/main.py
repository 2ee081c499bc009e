"""Entry point: the ``meshtrust`` group, logging, and the one place errors become messages.

Every :class:`MeshTrustError` is printed as ``error: <message>`` with exit status 2 for bad
input and 1 otherwise; a user never sees a traceback for something we anticipated. An
:class:`OSError` that reaches this boundary (a directory below a regular file, a full disk, a
path we may not write) is the environment's fault: one line naming the path, exit status 1.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from meshtrust import __version__
from meshtrust.errors import InvalidInput, MeshTrustError, Refused

__all__ = ["cli", "describe_os_error", "main"]


class MeshTrustGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = _COMMANDS.get(cmd_name)
        if spec is None:
            return super().get_command(ctx, cmd_name)
        module, _, attr = spec.partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MeshTrustError as exc:
            click.echo(f"error: {exc}", err=True)
            code = 2 if isinstance(exc, InvalidInput | Refused) else 1
            raise SystemExit(code) from None
        except OSError as exc:
            click.echo(f"error: {describe_os_error(exc)}", err=True)
            raise SystemExit(1) from None


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: what failed and on which path, never a traceback."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    if not paths:
        return reason
    return f"{reason}: {' -> '.join(paths)}"


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
    level = getattr(logging, log_level.upper())
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The HTTP/2 libraries log what they parse at DEBUG: hpack every header it decodes,
    # bearer tokens included. Secrets never reach a log, so they stay at INFO or above
    # whatever --log-level says (forked CA workers inherit this).
    for library in ("hpack", "h2"):
        logging.getLogger(library).setLevel(max(level, logging.INFO))


# Subcommands load on first use: `meshtrust agent` must not import the CA's server, rich's
# tables or grpcio just to start (the agent's memory is measured).
_COMMANDS = {
    "ca": "meshtrust.cli.ca:ca",
    "agent": "meshtrust.cli.agent:agent",
    "bundle": "meshtrust.cli.bundle:bundle",
    "token": "meshtrust.cli.token:token",
    "join": "meshtrust.cli.join:join",
    "cert": "meshtrust.cli.cert:cert",
    "up": "meshtrust.cli.mesh:up",
    "status": "meshtrust.cli.mesh:status",
    "down": "meshtrust.cli.mesh:down",
    "dashboard": "meshtrust.cli.mesh:dashboard",
    "proxy-config": "meshtrust.cli.tools:proxy_config",
    "check": "meshtrust.cli.tools:check",
    "analyze": "meshtrust.cli.analyze:analyze",
    "describe": "meshtrust.cli.analyze:describe",
    "certs": "meshtrust.cli.tools:certs",
    "injector": "meshtrust.cli.injector:injector",
}


def main() -> None:
    cli(prog_name="meshtrust")
