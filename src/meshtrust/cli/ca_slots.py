"""``meshtrust ca slots``: the signing CA's prepared, active and old intermediates."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click
from cryptography.hazmat.primitives import hashes
from rich.console import Console
from rich.table import Table

from meshtrust.clock import SystemClock
from meshtrust.durations import format_duration
from meshtrust.errors import ConfigError

__all__ = ["slots"]


@click.command("slots")
@click.option("--ledger", help="SQLAlchemy URL of the ledger.")
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path),
    default=Path("./ca"),
    show_default=True,
    help="CA directory: its ledger.db when --ledger is not given, and whether it holds "
    "root-key.pem (then the CA rotates its intermediate itself).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--check",
    is_flag=True,
    help="Exit with status 1 when a slot is unusable or the chain nears expiry without a "
    "way to rotate (for monitoring scripts).",
)
def slots(ledger: str | None, ca_dir: Path, as_json: bool, check: bool) -> None:
    """Show the signing CA's slots: PREPARED, ACTIVE and OLD intermediates.

    A CA made by `meshtrust ca init` (root-key.pem in the CA directory) prepares a new
    intermediate at half the active one's lifetime and activates it at five sixths, as
    SPIRE does; the old one stays until it expires. A plugged-in CA (no root key) cannot,
    and is warned about as its chain nears expiry. The state lives in the ledger: every
    replica sharing it shows the same.
    """
    from meshtrust.ca.ledger import SqlLedger, default_ledger_url
    from meshtrust.ca.signing import SlotLedger, SlotRecord, chain_expiry_warning

    if ledger is None:
        if not (ca_dir / "ledger.db").exists():
            raise ConfigError(f"no ledger at {ca_dir / 'ledger.db'}; pass --ledger URL or --ca-dir")
        ledger = default_ledger_url(ca_dir)
    now = SystemClock().now()
    sql = SqlLedger(ledger)
    try:
        found = SlotLedger(sql.engine).slots()
    finally:
        sql.close()
    holds_root = (ca_dir / "root-key.pem").exists()
    warning = None
    if found.active is not None and not holds_root:
        chain = found.active
        warning = chain_expiry_warning(chain.issued_at, chain.chain_not_after, now)

    def row(r: SlotRecord) -> dict[str, object]:
        return {
            "generation": r.generation,
            "slot": r.slot.name.lower(),
            "serial": format(r.cert.serial_number, "x"),
            "issued_at": r.issued_at.isoformat(),
            "not_after": r.not_after.isoformat(),
            "prepare_successor_at": r.prepare_at.isoformat(),
            "activate_successor_at": r.activate_at.isoformat(),
            "root_sha256": [root.fingerprint(hashes.SHA256()).hex() for root in r.roots],
            "key_file": r.key_file,
        }

    records = sorted(found.records, key=lambda r: r.generation)
    if as_json:
        doc = {
            "rotation": "automatic" if holds_root else "plugged-in",
            "slots": [row(r) for r in records],
            "problems": [{"generation": g, "error": m} for g, _, m in found.problems],
            "warning": warning.message if warning is not None else None,
        }
        click.echo(json.dumps(doc, indent=2))
        _exit_for_check(check, bool(found.problems) or warning is not None)
        return
    table = Table(
        title=f"signing CA slots ({'automatic rotation' if holds_root else 'plugged-in CA'})"
    )
    for col in ("GEN", "SLOT", "SERIAL", "NOT AFTER", "EXPIRES IN", "ROOT", "KEY FILE"):
        table.add_column(col)
    for r in records:
        table.add_row(
            str(r.generation),
            r.slot.name,
            format(r.cert.serial_number, "x")[:16],
            f"{r.not_after:%Y-%m-%d %H:%M:%SZ}",
            _left(r.not_after, now),
            ", ".join(root.fingerprint(hashes.SHA256()).hex()[:16] for root in r.roots),
            r.key_file,
        )
    console = Console()
    console.print(table)
    active = found.active
    if active is not None and holds_root:
        if found.prepared is None:
            step, when = "prepare a successor", active.prepare_at
        else:
            step, when = f"activate generation {found.prepared.generation}", active.activate_at
        overdue = " (overdue: is a CA serving this ledger?)" if when < now else ""
        console.print(f"next: {step} at {when:%Y-%m-%d %H:%M:%SZ}{overdue}")
    for generation, _, message in found.problems:
        console.print(f"[red]problem[/red] generation {generation}: {message}")
    if warning is not None:
        console.print(f"[yellow]warning[/yellow]: {warning.message}")
    _exit_for_check(check, bool(found.problems) or warning is not None)


def _exit_for_check(check: bool, failing: bool) -> None:
    if check and failing:
        raise SystemExit(1)


def _left(when: dt.datetime, now: dt.datetime) -> str:
    left = when - now
    return "expired" if left.total_seconds() <= 0 else format_duration(left)
