"""``meshtrust agent``: keep one workload's certificate fresh and hand it out."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import click

from meshtrust.cli.options import DURATION
from meshtrust.config import as_trust_domain
from meshtrust.errors import ConfigError
from meshtrust.pki import KeyType

__all__ = ["agent"]


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML file with any of the settings below (flags override it).",
)
@click.option(
    "--ca-address",
    multiple=True,
    metavar="HOST:PORT",
    help="The CA's gRPC address. Repeatable: the agent fails over between CA replicas "
    "(and between the addresses of a name).  [default: 127.0.0.1:15012]",
)
@click.option(
    "--ca-root",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Root certificate(s) that verify the CA and every certificate it returns "
    "(root-cert.pem).  [required]",
)
@click.option(
    "--ca-server-name",
    help="Name to expect in the CA's certificate, if not the host of --ca-address.",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Bearer token file, re-read for every request (Kubernetes projected "
    "token, or `meshtrust token create -o FILE`).",
)
@click.option("--trust-domain", help="Trust domain.  [default: the CA root's O]")
@click.option("--namespace", help="Workload namespace.  [default: from the token]")
@click.option("--service-account", help="Workload service account.  [default: from the token]")
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    help="Workload key algorithm.  [default: ec-p256]",
)
@click.option("--cert-ttl", type=DURATION, help="Certificate lifetime to ask for.  [default: 24h]")
@click.option(
    "--rotation-ratio",
    type=float,
    help="Renew when this fraction of the lifetime is left.  [default: 0.5]",
)
@click.option(
    "--rotation-jitter", type=float, help="± spread of the ratio across a fleet.  [default: 0.01]"
)
@click.option(
    "--sds-socket",
    type=click.Path(path_type=Path),
    help="Serve Envoy SDS (secrets 'default' and 'ROOTCA') on this Unix socket.",
)
@click.option(
    "--workload-socket",
    type=click.Path(path_type=Path),
    help="Serve the SPIFFE Workload API on this Unix socket "
    "(SPIFFE_ENDPOINT_SOCKET=unix://PATH for clients).",
)
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write cert-chain.pem, key.pem (0600) and root-cert.pem here, replaced "
    "atomically on every rotation.",
)
@click.option(
    "--status-listen",
    help="HTTP address for /healthz/ready, /metrics and /stats/prometheus (with "
    "--sidecar: the agent's metrics and its Envoy's); 'off' to disable.  "
    "[default: 127.0.0.1:15021]",
)
@click.option(
    "--sidecar",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Sidecar YAML (app port, inbound port, protocol, upstreams): launch and "
    "supervise an Envoy sidecar fed by this agent. Needs --sds-socket.",
)
@click.option(
    "--policy",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Istio policy YAML (PeerAuthentication, AuthorizationPolicy) for the "
    "sidecar. Repeatable; edits apply live, a bad edit is refused.",
)
@click.option(
    "--root-namespace", help="Namespace whose policies apply mesh-wide.  [default: istio-system]"
)
@click.option(
    "--trust-domain-alias",
    "trust_domain_aliases",
    multiple=True,
    help="A former or other name of this mesh's trust domain (Istio's trustDomainAliases): "
    "AuthorizationPolicy principals naming it match the mesh's own identities. Repeatable.",
)
@click.option(
    "--envoy-workdir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the sidecar's generated Envoy files and log go.  [default: beside the SDS socket]",
)
@click.option(
    "--join",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Join file (`meshtrust join create`): trust bundle, CA address and the token for "
    "the first certificate, in place of --ca-root/--token-file.",
)
def agent(config_file: Path | None, **flags: Any) -> None:
    """Keep a workload's key and certificate fresh (the istio-agent role).

    The key is generated here and never leaves the process; the agent sends a CSR with
    the token (and, once it has one, its current certificate), verifies the answer
    against --ca-root, and renews at half the lifetime (--rotation-ratio). It serves the
    certificate to Envoy over SDS, to SPIFFE clients over the Workload API, and as files
    — any of the three. With --sidecar it also runs the Envoy sidecar (restarting it if
    it dies) and applies Istio policies to it. If the CA is away it keeps serving the
    current certificate while it is valid and retries with backoff. Stop with Ctrl-C or
    SIGTERM.
    """
    from meshtrust.agent.build import build_agent
    from meshtrust.agent.config import AgentConfig, load_agent_settings

    settings: dict[str, Any] = load_agent_settings(config_file) if config_file else {}
    for key, value in flags.items():
        if value is None or value == ():
            continue
        if key == "policy":
            key = "policy_files"
        elif key == "ca_address" and len(value) == 1:
            value = value[0]  # one address, as a config file or mesh plan writes it
        if key == "trust_domain":
            value = as_trust_domain(value, "--trust-domain", Path())
        elif key == "trust_domain_aliases":
            value = tuple(as_trust_domain(v, "--trust-domain-alias", Path()) for v in value)
        elif key == "key_type":
            value = KeyType(value)
        settings[key] = value
    if "join" in settings and "ca_address" in settings:
        raise ConfigError("--join gives the CA's address; drop --ca-address")
    if str(settings.get("status_listen", "")).lower() == "off":
        settings["status_listen"] = None
    config = AgentConfig(**settings)

    async def main() -> None:
        the_agent = build_agent(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await the_agent.run_until(stop)

    asyncio.run(main())
