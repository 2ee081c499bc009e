"""``meshtrust proxy-config secret``, ``check`` and ``certs monitor``: the operator's tools
over a running local mesh: options and tables here; what they observe and judge is in
:mod:`meshtrust.mesh.proxy_config`, :mod:`meshtrust.mesh.check` and
:mod:`meshtrust.mesh.certs_monitor`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table
from rich.text import Text

from meshtrust.cli.mesh import wide_console
from meshtrust.cli.options import DURATION
from meshtrust.cli.output import emit, output_option

if TYPE_CHECKING:
    from meshtrust.mesh.certs_monitor import CertExpiry
    from meshtrust.mesh.check import CheckStep, MeshCheck

__all__ = ["certs", "check", "proxy_config"]

_MESH_HELP = (
    "The mesh file of the mesh to inspect (default: the mesh started last on this machine)."
)
_STYLE = {
    "PASS": "green",
    "OK": "green",
    "WARN": "yellow",
    "FAIL": "red",
    "EXPIRED": "red",
    "MISSING": "red",
    "SKIP": "dim",
}


def _mesh_option(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option(
        "--host",
        metavar="NAME",
        help="The host of a mesh with hosts this runs on (needs --mesh).",
    )(f)
    return click.option(
        "--mesh",
        "mesh_file",
        type=click.Path(path_type=Path, dir_okay=False),
        metavar="FILE",
        help=_MESH_HELP,
    )(f)


def _styled(word: str) -> Text:
    return Text(word, style=_STYLE.get(word, ""))


@click.group("proxy-config")
def proxy_config() -> None:
    """Show what a workload's Envoy sidecar holds right now, like `istioctl proxy-config`.

    Read from the running Envoy's admin API, not from what meshtrust meant to send it.
    """


@proxy_config.command("secret")
@click.argument("workload")
@_mesh_option
@output_option()
def secret(workload: str, mesh_file: Path | None, host: str | None, output: str) -> None:
    """Show the certificates WORKLOAD's Envoy serves (WORKLOAD is a service name of the mesh
    file), with istioctl's columns.

    \b
    RESOURCE NAME  the SDS resource: `default` (the workload's certificate chain) or
                   `ROOTCA` (the roots it trusts peers against)
    TYPE           Cert Chain or CA
    STATUS         ACTIVE (in use) or WARMING (asked for, not received yet)
    VALID CERT     true only when now is between NOT BEFORE and NOT AFTER — an expired
                   certificate shows false (unlike istioctl, istio#44929)
    SERIAL NUMBER  as Envoy shows it (lower-case hex)

    Example: meshtrust proxy-config secret web
    """
    from meshtrust.mesh.probes import load_running_state
    from meshtrust.mesh.proxy_config import proxy_secrets

    rows = proxy_secrets(load_running_state(mesh_file, host), workload)
    if output != "table":
        emit([r.to_json() for r in rows], output)
        return
    table = Table(expand=False)
    for col in (
        "RESOURCE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            r.resource_name,
            r.type,
            r.status,
            Text("true", style="green") if r.valid_cert else Text("false", style="bold red"),
            r.serial_number or "-",
            r.not_after or "-",
            r.not_before or "-",
        )
    wide_console().print(table)


@click.command()
@click.argument("workload", required=False)
@_mesh_option
@output_option()
def check(workload: str | None, mesh_file: Path | None, host: str | None, output: str) -> None:
    """Walk through everything that makes WORKLOAD's mTLS work and say what is wrong;
    without WORKLOAD, check the whole mesh: the CA, then every workload (as `linkerd check`).

    WORKLOAD is a service name of the mesh file. Each step gets PASS, WARN or FAIL (SKIP
    when an earlier failure leaves nothing to look at), and every WARN or FAIL comes with a
    hint on what to do:

    \b
      CA running               (whole mesh) the CA process runs and says ready
      mesh root valid          (whole mesh) the root is valid; WARN within 30 days of expiry
      signing CA chain         (whole mesh, on the CA's host) not expired; a CA without the
                               root key WARNs as its chain nears expiry (as `ca slots --check`)
      agent running            the agent process answers
      app running              the app process is alive and listens (if the mesh runs one)
      Envoy live               the sidecar runs and its admin API answers
      certificate present      the agent wrote cert-chain.pem
      chain valid              it chains to the mesh's root CA (WARN: a CA without KeyUsage)
      identity as expected     its SPIFFE ID is the one the mesh file implies
      Envoy serves the cert    Envoy holds the agent's current certificate and the mesh root
      time left                not expired; WARN under 20% of the certificate TTL
      policy mode              STRICT / PERMISSIVE / DISABLE, and no refused policy
      TLS handshake errors     Envoy's TLS error counters (since Envoy started)
      RBAC denials             calls refused by AuthorizationPolicies (since Envoy started)

    Exit status 1 when any step FAILs.
    """
    from meshtrust.mesh.check import Verdict, check_mesh, check_workload
    from meshtrust.mesh.probes import load_running_state

    state = load_running_state(mesh_file, host)
    if workload is None:
        mesh = check_mesh(state)
        if output != "table":
            emit(mesh.to_json(), output)
        else:
            _print_mesh_check(mesh)
        if mesh.failed:
            raise SystemExit(1)
        return
    steps = check_workload(state, workload)
    failed = any(s.verdict == Verdict.FAIL for s in steps)
    if output != "table":
        document = {"workload": workload, "ok": not failed, "steps": [s.to_json() for s in steps]}
        emit(document, output)
    else:
        _print_check(workload, steps)
    if failed:
        raise SystemExit(1)


def _print_mesh_check(mesh: MeshCheck) -> None:
    """The CA's walk, then each workload's, then one line for the mesh."""
    _print_check("CA", mesh.ca)
    for name, steps in mesh.workloads.items():
        _print_check(name, steps)
    verdict = "at least one step FAILED" if mesh.failed else "nothing failed"
    wide_console().print(f"mesh: the CA and {len(mesh.workloads)} workload(s) checked, {verdict}")


def _print_check(workload: str, steps: list[CheckStep]) -> None:
    """The walk as a table, then each WARN's and FAIL's hint, then the counts."""
    from meshtrust.mesh.check import Verdict

    console = wide_console()
    table = Table(expand=False, show_lines=False)
    table.add_column("STEP", no_wrap=True)
    table.add_column("RESULT", no_wrap=True)
    table.add_column("DETAIL")
    for s in steps:
        table.add_row(s.title, _styled(s.verdict), s.detail)
    console.print(table)
    for s in steps:
        if s.hint and s.verdict in (Verdict.WARN, Verdict.FAIL):
            console.print(
                Text.assemble((f"{s.verdict} ", _STYLE[s.verdict]), (s.title, "bold"), ": ")
                + Text(s.hint)
            )
    counts = {v: sum(1 for s in steps if s.verdict == v) for v in Verdict}
    console.print(
        f"{workload}: {counts[Verdict.PASS]} passed, {counts[Verdict.WARN]} warning(s), "
        f"{counts[Verdict.FAIL]} failed, {counts[Verdict.SKIP]} skipped"
    )


@click.group()
def certs() -> None:
    """Watch the mesh's workload certificates: `meshtrust certs monitor` lists every
    workload's certificate expiry and fails when one has expired or is about to."""


@certs.command("monitor")
@_mesh_option
@click.option(
    "--warn-within",
    type=DURATION,
    default="12h",
    show_default=True,
    help="Warn about certificates that expire within this time (90s, 15m, 12h, 7d).",
)
@output_option()
def monitor(
    mesh_file: Path | None, host: str | None, warn_within: dt.timedelta, output: str
) -> None:
    """Show every workload's certificate expiry and fail if any is expired or about to be.

    For each service of the mesh: serial, NotAfter and time left, from its agent (or, when
    the agent does not answer, from the certificate file it wrote). Status OK, WARN
    (expires within --warn-within), EXPIRED, or MISSING (no certificate at all).

    Exit status 0 when every certificate is OK, 1 otherwise: run it from cron or a health
    check, e.g. `meshtrust certs monitor --warn-within 1h || alert`.
    """
    from meshtrust.mesh.certs_monitor import monitor_certs
    from meshtrust.mesh.probes import load_running_state

    rows = monitor_certs(load_running_state(mesh_file, host), warn_within)
    bad = [r for r in rows if not r.fine]
    if output != "table":
        emit(
            {
                "warn_within_seconds": int(warn_within.total_seconds()),
                "ok": not bad,
                "certificates": [r.to_json() for r in rows],
            },
            output,
        )
    else:
        _print_expiries(rows, warn_within)
    if bad:
        raise SystemExit(1)


def _print_expiries(rows: list[CertExpiry], warn_within: dt.timedelta) -> None:
    """The rows as a table, the agents' last errors, then the verdict in a sentence."""
    from meshtrust.durations import format_duration

    console = wide_console()
    table = Table(expand=False)
    for col in ("SERVICE", "SPIFFE ID", "SERIAL", "NOT AFTER", "TIME LEFT", "STATUS", "NOTE"):
        table.add_column(col, no_wrap=col not in ("NOTE",))
    for r in rows:
        left = r.expires_in_seconds
        table.add_row(
            r.service,
            r.spiffe_id,
            r.serial or "-",
            r.not_after or "-",
            "-" if left is None else format_duration(dt.timedelta(seconds=left)),
            _styled(r.status),
            r.message,
        )
    console.print(table)
    bad = [r for r in rows if not r.fine]
    for r in bad:
        if r.last_error:
            console.print(f"{r.service}: the agent's last error: {r.last_error}")
    within = format_duration(warn_within)
    if bad:
        console.print(
            f"{len(bad)} of {len(rows)} certificate(s) expired, missing or expiring within {within}"
        )
    else:
        console.print(f"all {len(rows)} certificate(s) valid for more than {within}")
