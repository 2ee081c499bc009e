"""``meshtrust up``, ``status``, ``down``: a whole local mesh from one YAML file."""

from __future__ import annotations

import datetime as dt
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from meshtrust.cli.output import emit, output_option
from meshtrust.durations import format_duration

if TYPE_CHECKING:
    from meshtrust.mesh.state import MeshState

__all__ = ["dashboard", "down", "status", "up", "wide_console"]

MESH_FILE = click.Path(path_type=Path, dir_okay=False)

_HOST_HELP = (
    "For a mesh file with hosts: the host this machine is (its share of the mesh: the CA "
    "if it is ca.host, and the services placed on it; files under <workDir>/<host>/)."
)


def _short(serial: object) -> str:
    text = str(serial or "-")
    return text if len(text) <= 12 else text[:12] + "…"


def _secs(value: object, past: str) -> str:
    """Seconds from now as a duration; ``past`` when the moment has passed."""
    if not isinstance(value, int | float):
        return "-"
    if value < 0:
        return past
    return format_duration(dt.timedelta(seconds=int(value)))


def status_view(data: dict[str, Any]) -> Group:
    ca = data["ca"]
    head = Text.assemble(
        ("meshtrust ", "bold"),
        f"{data['trust_domain']}  ",
        (f"host {data['host']}  " if data.get("host") else "", "bold"),
        ("CA ", "bold"),
        f"{ca['address']} {ca['state']}  ",
        f"issued {ca['issued'] if ca['issued'] is not None else '-'}  ",
        f"refused {ca['refused'] if ca['refused'] is not None else '-'}",
    )
    table = Table(expand=False)
    for col in (
        "SERVICE",
        "SPIFFE ID",
        "SERIAL",
        "EXPIRES IN",
        "ROTATES IN",
        "ROTATIONS",
        "ENVOY",
        "MTLS",
        "ALLOWED",
        "DENIED",
        "APP",
    ):
        table.add_column(col)
    for svc in data["services"]:
        envoy, conns = svc["envoy"], svc["connections"]
        envoy_state = envoy["state"]
        if envoy.get("restarts"):
            envoy_state += f" (restarted {envoy['restarts']}×)"
        table.add_row(
            svc["name"],
            svc["spiffe_id"],
            _short(svc.get("serial")),
            _secs(svc.get("expires_in_seconds"), "EXPIRED"),
            _secs(svc.get("next_rotation_in_seconds"), "overdue"),
            str(svc.get("rotations") if svc.get("rotations") is not None else "-"),
            envoy_state if svc["agent"] == "running" else "agent down",
            _mtls(envoy),
            str(conns["allowed"]),
            str(conns["denied"]),
            svc["app"] or "-",
        )
    refusals = [
        Text.assemble(
            (f"{svc['name']}: policy edit refused", "bold red"),
            f" (the sidecar keeps policy version {svc['envoy']['policy_version']}, "
            f"{svc['envoy']['mtls_mode']}): {svc['envoy']['policy_error']}",
        )
        for svc in data["services"]
        if svc["envoy"].get("policy_error")
    ]
    not_ready = [
        Text.assemble((f"{svc['name']}: sidecar not ready", "bold red"), f": {reason}")
        for svc in data["services"]
        if svc["agent"] == "running" and (reason := svc["envoy"].get("reason"))
    ]
    return Group(head, table, *refusals, *not_ready, *_identities_table(data))


def _identities_table(data: dict[str, Any]) -> list[Table]:
    """On the CA's host of a mesh across hosts: every identity of the mesh and its latest
    certificate (ledger). On one host the services table already shows each identity."""
    if not data.get("identities") or not data.get("host"):
        return []
    table = Table(title="identities (CA ledger)", expand=False)
    for col in ("SPIFFE ID", "HOST", "SERIAL", "EXPIRES IN", "RENEWING"):
        table.add_column(col)
    for ident in data["identities"]:
        table.add_row(
            ident["spiffe_id"],
            ident["host"] or "-",
            _short(ident["serial"]),
            _secs(ident["expires_in_seconds"], "EXPIRED"),
            Text("yes") if ident["renewing"] else Text("STOPPED", style="bold red"),
        )
    return [table]


_NOT_RUNNING_HINT = "none of its processes is alive; start it with `meshtrust up MESH_FILE`"


def _mtls(envoy: dict[str, Any]) -> Text:
    mode = str(envoy.get("mtls_mode") or "-")
    if envoy.get("policy_error"):
        return Text(f"{mode} (edit refused)", style="red")
    return Text(mode)


def wide_console() -> Console:
    """A console for tables: piped or logged, 160 columns rather than a squeezed 80."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    return console


def _load_state(mesh_file: Path | None, host: str | None = None) -> MeshState:
    """The state file of the mesh, running or not (``status`` reports a mesh that is down)."""
    from meshtrust.mesh.state import find_state, read_state

    return read_state(find_state(mesh_file, host))


class _StopRequest:
    """Set by Ctrl-C, SIGTERM or SIGHUP (the terminal closed): ``up`` stops the mesh.

    The mesh's processes run in sessions of their own, so they outlive an ``up`` killed by
    a signal. The handlers only set a flag, which the launcher and the live view look at:
    an exception raised from a handler could land between the start of a process and its
    record, or cut the stopping short (a second Ctrl-C).
    """

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._request)

    def _request(self, signum: int, frame: object) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


@click.command()
@click.argument("mesh_file", type=MESH_FILE)
@click.option(
    "--detach",
    "-d",
    is_flag=True,
    help="Start the mesh, then return and leave it running in the background.",
)
@click.option("--host", metavar="NAME", help=_HOST_HELP)
@click.option(
    "--join",
    "join_file",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE",
    help="On a host other than the CA's: the join file (`meshtrust join create` on the CA's "
    "host) its agents get their first certificates with.",
)
def up(mesh_file: Path, detach: bool, host: str | None, join_file: Path | None) -> None:
    """Start a whole zero-trust mesh from MESH_FILE.

    Starts the CA, then for every service its agent (which runs the Envoy sidecar and
    applies the policies) and its app, and returns once every sidecar has its
    certificate and is ready. Without --detach it then shows a live view (identities,
    serials, time to rotation, allowed/denied connections) until Ctrl-C, and stops
    everything. While it runs (not with --detach) it also serves a live web dashboard on
    loopback — the URL is printed; `dashboard.listen` in MESH_FILE sets it, docs/dashboard.md
    shows it. The mesh file format is in docs/mesh.md.
    """
    from meshtrust.dashboard import bind_dashboard, watch_mesh
    from meshtrust.mesh.config import load_mesh_config
    from meshtrust.mesh.launch import launch, mesh_lock, pick_free_port
    from meshtrust.mesh.plan import plan_mesh

    console = wide_console()
    config = load_mesh_config(mesh_file)
    plan = plan_mesh(config, pick_free_port, python=sys.executable, host=host, join_file=join_file)
    stop = _StopRequest()
    with mesh_lock(plan.work_dir):  # for the life of this `up`: a second one is told why
        # Bound before anything starts (a taken dashboard.listen stops nothing); it lives as
        # long as this `up`, so not with --detach.
        dashboard = None if detach else bind_dashboard(config.dashboard_listen)
        try:
            state = launch(plan, lambda m: console.print(f"[green]•[/green] {m}"), stop)
            if dashboard is not None:
                watch_mesh(dashboard, state)
                console.print(f"[green]•[/green] dashboard: {dashboard.url} (read-only)")
            _serve(state, plan.work_dir, detach, console, stop)
        finally:
            if dashboard is not None:
                dashboard.stop()


def _serve(
    state: MeshState, work_dir: Path, detach: bool, console: Console, stop: _StopRequest
) -> None:
    """After ``up`` started the mesh: return (--detach), or the live view until stopped."""
    from meshtrust.mesh.launch import stop_mesh
    from meshtrust.mesh.status import mesh_status

    if detach:
        console.print(
            f"the mesh is running; `meshtrust status`, `meshtrust down` "
            f"(logs in {work_dir / 'logs'})"
        )
        return
    with Live(status_view(mesh_status(state)), console=console, refresh_per_second=2) as live:
        while not stop():
            time.sleep(1)  # a signal's handler returns, and the sleep goes on: at most 1 s
            live.update(status_view(mesh_status(state)))
    console.print("stopping the mesh …")
    for line in stop_mesh(state):
        console.print(f"  {line}")


@click.command()
@click.argument("mesh_file", type=MESH_FILE, required=False)
@click.option("--host", metavar="NAME", help="The host of a mesh with hosts (with MESH_FILE).")
@output_option()
def status(mesh_file: Path | None, host: str | None, output: str) -> None:
    """Show the running mesh: per workload its SPIFFE ID, serial, expiry, time to the next
    rotation, rotations so far, Envoy state, mTLS mode (and a refused policy edit, with its
    error) and allowed/denied connections. The -o json / -o yaml document is described in
    docs/status-json.md.

    Without MESH_FILE: the mesh started last on this machine. On the CA's host it also lists
    every identity of the mesh with its latest certificate in the CA's ledger, marking those
    that stopped renewing.

    Exit status 0 when every process of the mesh runs and every sidecar is live, 1 when
    the mesh is down or part of it is (the table says which), 2 when no mesh was started.
    """
    from meshtrust.mesh.status import mesh_status

    data = mesh_status(_load_state(mesh_file, host))
    if output != "table":
        emit(data, output)
    else:
        wide_console().print(status_view(data))
    if data["state"] == "down":
        click.echo(
            f"error: the mesh {data['mesh_file']} is not running: {_NOT_RUNNING_HINT}", err=True
        )
    if data["state"] != "running":
        raise SystemExit(1)


@click.command()
@click.argument("mesh_file", type=MESH_FILE, required=False)
@click.option("--host", metavar="NAME", help="The host of a mesh with hosts (with MESH_FILE).")
def down(mesh_file: Path | None, host: str | None) -> None:
    """Stop every process of the mesh and remove its sockets (safe to run twice).

    Without MESH_FILE: the mesh started last on this machine.
    """
    from meshtrust.errors import ConfigError
    from meshtrust.mesh.launch import stop_mesh

    try:
        state = _load_state(mesh_file, host)
    except ConfigError as exc:
        click.echo(f"nothing to stop: {exc}")
        return
    done = stop_mesh(state)
    click.echo("\n".join(done) if done else "nothing was running")


@click.command()
@click.argument("mesh_file", type=MESH_FILE, required=False)
@click.option("--host", metavar="NAME", help="The host of a mesh with hosts (with MESH_FILE).")
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Where to serve it, on loopback (default: dashboard.listen of the mesh file, else "
    "127.0.0.1:20001, else any free port).",
)
def dashboard(mesh_file: Path | None, host: str | None, listen: str | None) -> None:
    """Serve the live web dashboard of a running mesh until Ctrl-C.

    `meshtrust up` in the foreground serves it already; this is for a mesh started with
    `up --detach`. It shows who may call whom (allowed and denied calls), each sidecar's
    mTLS mode, certificate timelines, the CA's counts and events. Read-only, loopback
    only, no secrets in it (docs/dashboard.md).

    Without MESH_FILE: the mesh started last on this machine.
    """
    from meshtrust.dashboard import bind_dashboard, watch_mesh
    from meshtrust.mesh.config import check_loopback_listen, load_mesh_config
    from meshtrust.mesh.probes import load_running_state

    if listen is not None:
        listen = check_loopback_listen(listen, "--listen")
    elif mesh_file is not None:
        listen = load_mesh_config(mesh_file).dashboard_listen
    state = load_running_state(mesh_file, host)
    stop = _StopRequest()
    server = bind_dashboard(listen)
    try:
        watch_mesh(server, state)
        click.echo(f"dashboard of {state.mesh_file}: {server.url} (read-only; Ctrl-C stops it)")
        while not stop():
            time.sleep(0.5)
    finally:
        server.stop()
