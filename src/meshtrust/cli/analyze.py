"""``meshtrust analyze`` and ``meshtrust describe``: offline views of a mesh file and its
policies (no running mesh needed); what they find is in :mod:`meshtrust.mesh.analyze` and
:mod:`meshtrust.mesh.describe`, tables and options here."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table
from rich.text import Text

from meshtrust.cli.mesh import MESH_FILE, wide_console
from meshtrust.cli.output import FORMATS, emit, output_option

if TYPE_CHECKING:
    from meshtrust.mesh.analyze import AnalysisReport

__all__ = ["EXIT_FOUND_ISSUES", "analyze", "describe"]

#: istioctl analyze's exit status when it finds issues at the failure threshold (its
#: ExitAnalyzerFoundIssues), so CI scripts written for istioctl read meshtrust's the same way.
EXIT_FOUND_ISSUES = 79

_LEVEL_STYLE = {"Error": "bold red", "Warning": "yellow", "Info": "cyan"}
_VERDICT_STYLE = {"allow": "green", "deny": "red", "partial": "yellow"}


def _mesh_file_or_last(mesh_file: Path | None) -> Path:
    """``mesh_file``, or the file of the mesh started last on this machine."""
    if mesh_file is not None:
        return mesh_file
    from meshtrust.mesh.state import find_state, read_state

    return Path(read_state(find_state(None)).mesh_file)


@click.command()
@click.argument(
    "mesh_file", type=click.Path(path_type=Path, dir_okay=False, exists=True), required=False
)
@click.option(
    "--failure-threshold",
    type=click.Choice(["Error", "Warning", "Info"], case_sensitive=False),
    default="Error",
    show_default=True,
    help="The lowest level that makes the exit status non-zero (as istioctl's).",
)
@output_option(default="log", formats=("log", *FORMATS))
def analyze(mesh_file: Path | None, failure_threshold: str, output: str) -> None:
    """Check MESH_FILE and its policies for mistakes, offline, like `istioctl analyze`.

    Without MESH_FILE: the mesh started last on this machine. Nothing needs to run: the
    files are read and judged. Each finding has a level, a code (docs/analyze.md lists
    them all, with istioctl's code of the same meaning) and the file and line it is about:

    \b
      Warning [MT0127] (AuthorizationPolicy default/allow-api policies.yaml:12) no
      service in namespace default matches the selector app=api

    \b
    What is looked for:
      MT0106  a file that does not load (the first problem, with file, line and field)
      MT0113  an upstream whose mTLS mode is DISABLE (its sidecar cannot take mTLS)
      MT0127  a policy whose selector or namespace matches no service
      MT0201  an ALLOW policy without rules (it denies everything)
      MT0202  an ALLOW policy none of whose rules can ever match (denies everything)
      MT0203  an ALLOW policy that matches no service of the mesh
      MT0204  paths or methods in a rule on a TCP service
      MT0301  a principal of a trust domain that is not the mesh's
      MT0401  an upstream that its callee's policies deny (MT0402: some paths only)
      MT0501  a PERMISSIVE service in a STRICT mesh (MT0502: DISABLE)
      MT0601  an ALLOW policy shadowed by a DENY policy

    Exit status 79 (istioctl's) when there is a finding at --failure-threshold or above
    (by default: an error), else 0 — warnings alone do not fail; 2 for a usage error.
    """
    from meshtrust.mesh.analyze import Level, analyze_file

    path = _mesh_file_or_last(mesh_file)
    with _compiler_warnings_silenced():
        report = analyze_file(path)
    if output in ("json", "yaml"):
        emit(report.to_json(), output)
    elif output == "table":
        _print_findings_table(report)
    else:
        _print_findings_log(report)
    if report.failed(Level(failure_threshold.capitalize())):
        raise SystemExit(EXIT_FOUND_ISSUES)


@contextlib.contextmanager
def _compiler_warnings_silenced() -> Iterator[None]:
    """The sidecar compiler logs a warning for paths/methods on a TCP service; analyze
    reports it as MT0204 with file and line, so the log line would only say it twice.
    Restored afterwards: the logger is the process's, not this command's."""
    logger = logging.getLogger("meshtrust.policy.compile")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _print_findings_log(report: AnalysisReport) -> None:
    if not report.findings:
        click.echo(f"No validation issues found when analyzing {report.mesh_file}.")
        return
    for finding in report.findings:
        click.echo(str(finding))


def _print_findings_table(report: AnalysisReport) -> None:
    console = wide_console()
    table = Table(expand=False)
    for col in ("LEVEL", "CODE", "RESOURCE", "WHERE", "MESSAGE"):
        table.add_column(col, no_wrap=col != "MESSAGE")
    for f in report.findings:
        table.add_row(
            Text(f.level.value, style=_LEVEL_STYLE[f.level.value]),
            f.code,
            f.resource,
            f.where or "-",
            f.message,
        )
    console.print(table)
    data = report.to_json()
    console.print(
        f"{report.mesh_file}: {data['errors']} error(s), {data['warnings']} warning(s), "
        f"{data['infos']} info(s)"
    )


@click.command()
@click.argument("workload")
@click.option(
    "--mesh",
    "mesh_file",
    type=MESH_FILE,
    metavar="FILE",
    help="The mesh file (default: the mesh started last on this machine).",
)
@output_option()
def describe(workload: str, mesh_file: Path | None, output: str) -> None:
    """Show what applies to WORKLOAD and who may call it, like `istioctl x describe`.

    WORKLOAD is a service name of the mesh file. Computed from the mesh file and its
    policies (nothing needs to run), exactly as WORKLOAD's sidecar would enforce them:

    \b
      PEER AUTHENTICATION  the PeerAuthentications that set its mTLS mode (mesh,
                           namespace, workload level), each with file and line
      PORTS                its app port and sidecar port with the resulting mode
      AUTHORIZATION        the AuthorizationPolicies that select it (file and line)
      CALLERS              for every other service, any other identity and a plain-text
                           client: allow, deny or partial (some paths/methods), why, and
                           which policy decided
      UPSTREAMS            whether each upstream it calls lets it in

    Example: meshtrust describe db --mesh examples/quickstart/mesh.yaml
    """
    from meshtrust.mesh.config import load_mesh_config
    from meshtrust.mesh.describe import describe_workload
    from meshtrust.policy import load_policy_files

    config = load_mesh_config(_mesh_file_or_last(mesh_file))
    policies = load_policy_files(list(config.policy_files))
    document = describe_workload(config, policies, workload)
    if output == "table":
        _print_description(document)
    else:
        emit(document, output)


def _at(entry: dict[str, Any]) -> str:
    if entry.get("file") is None:
        return "-"
    from meshtrust.mesh.analyze import display_path

    line = entry.get("line")
    return display_path(Path(entry["file"])) + (f":{line}" if line else "")


def _decided_by(entry: dict[str, Any]) -> str:
    return ", ".join(f"{p['name']} ({_at(p)})" for p in entry["policies"]) or "-"


def _print_description(doc: dict[str, Any]) -> None:
    console = wide_console()
    console.print(
        Text.assemble(
            (f"{doc['workload']}", "bold"),
            f"  {doc['spiffe_id']}  {doc['protocol']}  mTLS ",
            (doc["mtls_mode"], "bold"),
        )
    )
    peers = Table(title="PeerAuthentication", expand=False, title_justify="left")
    for col in ("LEVEL", "NAME", "MODE", "WHERE"):
        peers.add_column(col, no_wrap=True)
    for pa in doc["peer_authentications"]:
        peers.add_row(pa["level"], pa["name"], pa["mode"] or "UNSET", _at(pa))
    if not doc["peer_authentications"]:
        peers.add_row("-", "(none: PERMISSIVE by default)", "PERMISSIVE", "-")
    console.print(peers)
    ports = Table(title="Ports", expand=False, title_justify="left")
    for col in ("APP PORT", "SIDECAR PORT", "MTLS MODE"):
        ports.add_column(col, no_wrap=True)
    for port in doc["ports"]:
        inbound = port["inbound_port"]
        ports.add_row(str(port["port"]), "picked at up" if inbound is None else str(inbound),
                      port["mode"])  # fmt: skip
    console.print(ports)
    authz = Table(title="AuthorizationPolicy", expand=False, title_justify="left")
    for col in ("NAME", "ACTION", "RULES", "WHERE"):
        authz.add_column(col, no_wrap=True)
    for policy in doc["authorization_policies"]:
        authz.add_row(policy["name"], policy["action"], str(policy["rules"]), _at(policy))
    if not doc["authorization_policies"]:
        authz.add_row("(none: every caller allowed)", "-", "-", "-")
    console.print(authz)
    callers = Table(title="Who may call it", expand=False, title_justify="left")
    for col in ("CALLER", "SPIFFE ID", "VERDICT", "WHY", "DECIDED BY"):
        callers.add_column(col, no_wrap=col in ("CALLER", "VERDICT"))
    for c in doc["callers"]:
        callers.add_row(c["caller"], c["spiffe_id"] or "-", _verdict(c["verdict"]), c["reason"],
                        _decided_by(c))  # fmt: skip
    console.print(callers)
    if doc["upstreams"]:
        ups = Table(title="Upstreams it calls", expand=False, title_justify="left")
        for col in ("UPSTREAM", "LOCAL PORT", "VERDICT", "WHY", "DECIDED BY"):
            ups.add_column(col, no_wrap=col in ("UPSTREAM", "VERDICT"))
        for u in doc["upstreams"]:
            ups.add_row(u["service"], str(u["local_port"]), _verdict(u["verdict"]), u["reason"],
                        _decided_by(u))  # fmt: skip
        console.print(ups)


def _verdict(word: str) -> Text:
    return Text(word, style=_VERDICT_STYLE.get(word, ""))
