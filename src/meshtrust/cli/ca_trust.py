"""``meshtrust ca rotation status`` and ``meshtrust ca bundle add-root|remove-root``: the
mesh's trust bundle and who serves which version of it (:mod:`meshtrust.ca.trust`)."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from meshtrust.clock import SystemClock
from meshtrust.errors import ConfigError, InvalidCertificate, InvalidInput

if TYPE_CHECKING:
    from meshtrust.ca.ledger import SqlLedger
    from meshtrust.ca.trust import MeshBundle, ServedReport

__all__ = ["bundle", "rotation"]

_LEDGER_OPTION = click.option("--ledger", help="SQLAlchemy URL of the ledger.")
_CA_DIR_OPTION = click.option(
    "--ca-dir",
    type=click.Path(path_type=Path),
    default=Path("./ca"),
    show_default=True,
    help="CA directory (its ledger.db is used when --ledger is not given).",
)
_OUTPUT_OPTION = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


def _open(ledger: str | None, ca_dir: Path) -> SqlLedger:
    # As cli/ca.py's ``_open_ledger`` (which this module cannot import: ca.py registers it).
    from meshtrust.ca.ledger import SqlLedger, default_ledger_url

    if ledger is None:
        if not (ca_dir / "ledger.db").exists():
            raise ConfigError(f"no ledger at {ca_dir / 'ledger.db'}; pass --ledger URL or --ca-dir")
        ledger = default_ledger_url(ca_dir)
    return SqlLedger(ledger)


def _current(sql: SqlLedger) -> MeshBundle:
    from meshtrust.ca.trust import TrustLedger

    found = TrustLedger(sql.engine).current()
    if found is None:
        raise ConfigError(
            "the ledger has no trust bundle yet: `meshtrust ca serve` writes version 1 "
            "(the CA directory's roots) when it starts"
        )
    return found


def _root_json(cert: Any) -> dict[str, str]:
    from meshtrust.ca.trust import fingerprint

    return {
        "fingerprint": fingerprint(cert),
        "subject": cert.subject.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def _served_json(report: ServedReport, now: dt.datetime) -> dict[str, object]:
    return {
        "spiffe_id": report.spiffe_id,
        "serving_version": report.version,
        "serial": report.serial,
        "last_seen": report.last_seen.isoformat(),
        "last_seen_seconds_ago": round((now - report.last_seen).total_seconds(), 1),
    }


@click.group("rotation")
def rotation() -> None:
    """Root rotation: the mesh's trust bundle and which workloads serve it."""


@rotation.command("status")
@_LEDGER_OPTION
@_CA_DIR_OPTION
@_OUTPUT_OPTION
def rotation_status(ledger: str | None, ca_dir: Path, output: str) -> None:
    """Show the trust bundle's version and roots, the workloads that are behind, and the
    root rotation's phase with the workloads behind that phase.

    Every agent reports on its trust stream the bundle version it serves (to Envoy, the
    Workload API and its files); a workload serving an older version than the current one
    is behind, including one that is down (it reports again when it returns). Reads the
    ledger, so it works with the CA running or not.
    """
    from meshtrust.ca.trust import behind

    now = SystemClock().now()
    sql = _open(ledger, ca_dir)
    try:
        current = _current(sql)
        from meshtrust.ca.trust import TrustLedger

        served = TrustLedger(sql.engine).served()
        rotation_doc = _rotation_json(sql, now)
    finally:
        sql.close()
    late = behind(current.version, served)
    if output == "json":
        doc = {
            "bundle": {
                "version": current.version,
                "changed_at": current.changed_at.isoformat(),
                "actor": current.actor,
                "why": current.why,
                "roots": [_root_json(r) for r in current.roots],
            },
            "root_rotation": rotation_doc,
            "workloads": len(served),
            "behind": [_served_json(r, now) for r in late],
            "current": [_served_json(r, now) for r in served if r.version >= current.version],
        }
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(
        f"trust bundle version {current.version}, changed {current.changed_at:%Y-%m-%d %H:%M:%SZ}"
        f" by {current.actor}" + (f": {current.why}" if current.why else "")
    )
    console = Console(width=200)
    roots = Table("ROOT FINGERPRINT (SHA-256)", "SUBJECT", "NOT AFTER", box=None)
    for root in current.roots:
        info = _root_json(root)
        roots.add_row(info["fingerprint"], info["subject"], f"{root.not_valid_after_utc:%Y-%m-%d}")
    console.print(roots)
    click.echo(f"{len(served) - len(late)} of {len(served)} workload(s) serve this version")
    if late:
        table = Table("BEHIND", "SERVING", "LAST SEEN", box=None)
        for report in late:
            table.add_row(
                report.spiffe_id, str(report.version), f"{report.last_seen:%Y-%m-%d %H:%M:%SZ}"
            )
        console.print(table)
    if rotation_doc is not None:
        _print_rotation(rotation_doc, console)


def _rotation_json(sql: SqlLedger, now: dt.datetime) -> dict[str, object] | None:
    """The newest root rotation (phase, driver, who is behind its phase), or None."""
    from meshtrust.ca.rootrotation import Phase, RootRotation
    from meshtrust.ca.trust import fingerprint

    rotation = RootRotation(sql.engine, Path("."), SystemClock(), trust_domain="", driver="")
    rec = rotation.rotations.current()
    if rec is None:
        return None
    late = (
        rotation.behind(rec)
        if rec.phase is not Phase.DONE
        and (rec.phase is Phase.SIGN or rec.target_version is not None)
        else []
    )
    return {
        "id": rec.id,
        "phase": rec.phase.name.lower(),
        "phase_label": rec.phase.label,
        "new_root": fingerprint(rec.new_root),
        "started_at": rec.started_at.isoformat(),
        "driver": rec.driver,
        "driver_alive": rec.lease_live(now),
        "forced_without": list(rec.excluded),
        "behind": [{"spiffe_id": b.spiffe_id, "why": b.why} for b in late],
    }


def _print_rotation(doc: dict[str, Any], console: Console) -> None:
    click.echo(
        f"root rotation {doc['id']} to root {str(doc['new_root'])[:16]}…: phase "
        f"{doc['phase_label']}"
        + (
            ""
            if doc["phase"] == "done"
            else f" (driven by {doc['driver']}"
            + ("" if doc["driver_alive"] else ", not running: re-run `meshtrust ca rotate-root`")
            + ")"
        )
    )
    if doc["forced_without"]:
        click.echo("  --force went on without: " + ", ".join(doc["forced_without"]))
    if doc["behind"]:
        table = Table("BEHIND THIS PHASE", "WHY", box=None)
        for b in doc["behind"]:
            table.add_row(b["spiffe_id"], b["why"])
        console.print(table)


@click.group("bundle")
def bundle() -> None:
    """Change the mesh's trust bundle (the roots every agent trusts).

    This is the mesh's *own* bundle, versioned in the ledger (root rotation); its bundle
    endpoint serves each new version to federated trust domains. `meshtrust bundle show`
    prints it; `meshtrust bundle list|set|delete` handle other trust domains' bundles.
    """


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


_ACTOR_OPTION = click.option(
    "--actor", help="Who changes the bundle, for the ledger's record.  [default: USER@HOST]"
)
_WHY_OPTION = click.option("--why", default="", help="Free text for the ledger's record.")


@bundle.command("add-root")
@click.argument("file", type=click.Path(path_type=Path))
@_WHY_OPTION
@_ACTOR_OPTION
@_LEDGER_OPTION
@_CA_DIR_OPTION
def add_root_command(
    file: Path, why: str, actor: str | None, ledger: str | None, ca_dir: Path
) -> None:
    """Add the root certificate in FILE (PEM) to the trust bundle.

    Writes the next bundle version to the ledger; every CA replica pushes it to its agents
    within seconds, and each agent hands it to Envoy, the Workload API and its files, then
    re-issues its certificate. Phase 1 of a root rotation (see docs/rotation.md).
    """
    from meshtrust.ca.trust import TrustLedger, add_root, fingerprint
    from meshtrust.pki import load_certs_pem

    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: {exc.strerror}") from None
    try:
        certs = load_certs_pem(data, source=str(file))
    except InvalidCertificate as exc:
        raise InvalidInput(f"{file}: {exc}") from None
    if len(certs) != 1:
        raise InvalidInput(f"{file}: holds {len(certs)} certificates; give one root per file")
    sql = _open(ledger, ca_dir)
    try:
        current = _current(sql)
        try:
            roots = add_root(current.roots, certs[0])
        except InvalidInput as exc:
            raise InvalidInput(f"{file}: {exc}") from None
        made = TrustLedger(sql.engine).set_roots(
            roots,
            SystemClock().now(),
            actor=_actor(actor),
            why=why or f"add root {fingerprint(certs[0])[:16]}",
            expect_version=current.version,
        )
    finally:
        sql.close()
    click.echo(
        f"trust bundle version {made.version}: added root {fingerprint(certs[0])} "
        f"({len(made.roots)} roots)"
    )


@bundle.command("remove-root")
@click.argument("fingerprint_text", metavar="FINGERPRINT")
@_WHY_OPTION
@_ACTOR_OPTION
@_LEDGER_OPTION
@_CA_DIR_OPTION
def remove_root_command(
    fingerprint_text: str, why: str, actor: str | None, ledger: str | None, ca_dir: Path
) -> None:
    """Remove the root with this SHA-256 FINGERPRINT (a unique prefix will do) from the bundle.

    Refused when it is the last root, or when the CA's active signing certificate (the
    ledger's active signing slot, else --ca-dir's) chains to it: sign under the new root
    first. `meshtrust ca rotation status`
    lists the fingerprints. Phase 3 of a root rotation (see docs/rotation.md).
    """
    from meshtrust.ca.cadir import load_ca_dir
    from meshtrust.ca.trust import TrustLedger, fingerprint, remove_root

    now = SystemClock().now()
    material = load_ca_dir(ca_dir, now)
    sql = _open(ledger, ca_dir)
    try:
        current = _current(sql)
        from meshtrust.ca.signing import SlotLedger

        active = SlotLedger(sql.engine).slots().active  # the signer in use (after rotations)
        signer_chain = active.chain if active is not None else material.intermediates
        roots, removed = remove_root(current.roots, fingerprint_text, signer_chain)
        made = TrustLedger(sql.engine).set_roots(
            roots,
            now,
            actor=_actor(actor),
            why=why or f"remove root {fingerprint(removed)[:16]}",
            expect_version=current.version,
        )
    finally:
        sql.close()
    click.echo(
        f"trust bundle version {made.version}: removed root {fingerprint(removed)} "
        f"({len(made.roots)} left)"
    )
