"""``meshtrust ca rotate-root``: root rotation as phases (:mod:`meshtrust.ca.rootrotation`)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import click

from meshtrust.cli.options import DURATION
from meshtrust.clock import SystemClock
from meshtrust.errors import CADirectoryError, InvalidInput

__all__ = ["rotate_root"]


@click.command("rotate-root")
@click.option(
    "--root-dir",
    type=click.Path(path_type=Path),
    help="A plugged-in CA directory under the new root (Istio cacerts or `ca init` layout: "
    "its signing certificate and key become the signing CA under the new root). Without "
    "it a new root is generated: its key is written 0600 to the CA directory as "
    "root-key-<fingerprint>.pem (its certificate as root-cert-<fingerprint>.pem), and the "
    "CA rotates its intermediates under it from then on.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Do not wait for the workloads that are behind the current phase now: they are "
    "named, recorded in the ledger, and left out of the rest of this rotation.",
)
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds a phase may wait for the workloads behind; then the command stops "
    "(exit status 1) naming them, and the phase stays in the ledger: run it again to "
    "resume.",
)
@click.option(
    "--min-phase",
    type=DURATION,
    default="0s",
    show_default=True,
    help="Hold each phase at least this long, even once every workload of this mesh is "
    "through it: federated meshes fetch this CA's bundle (and its CRLs) only at its "
    "bundle endpoint's refreshHint, and refuse leaves of the new root until they have. "
    "When other meshes federate with this one, give twice the refreshHint (e.g. 10m for "
    "the default 5m).",
)
@click.option("--trust-domain", help="The trust domain (default: the CA directory's root's O).")
@click.option("--ledger", help="SQLAlchemy URL of the ledger (default: the CA dir's ledger.db).")
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path),
    default=Path("./ca"),
    show_default=True,
    help="The running CA's directory (shared by its replicas).",
)
def rotate_root(
    root_dir: Path | None,
    force: bool,
    timeout: float,
    min_phase: dt.timedelta,
    trust_domain: str | None,
    ledger: str | None,
    ca_dir: Path,
) -> None:
    """Rotate the mesh's root with zero failed requests, in phases.

    (1) the trust bundle becomes old root + new root, and the command waits until every
    workload serves it; (2) the CA signs with an intermediate under the new root (its CRL
    is published to every sidecar first) and every agent re-issues at once: it waits until
    every workload's latest certificate chains to the new root; (3) the old root is dropped
    from the bundle, and it waits until every workload serves that. A workload that is down
    holds the phase until it returns, or until --force. The phase is kept in the ledger:
    after a crash (of the CA or of this command) run the command again (without --root-dir)
    and it resumes. `meshtrust ca rotation status` shows the phase and who is behind.
    Runs against the ledger while `meshtrust ca serve` runs. See docs/rotation.md.
    """
    from meshtrust.ca.cadir import load_ca_dir
    from meshtrust.ca.ledger import SqlLedger, default_ledger_url
    from meshtrust.ca.rootrotation import (
        Phase,
        RootRotation,
        default_driver,
        generate_root,
        run_rotation,
    )
    from meshtrust.ca.signing import key_type_of
    from meshtrust.ca.trust import fingerprint

    clock = SystemClock()
    now = clock.now()
    here = load_ca_dir(ca_dir, now, signer_may_expire=True)
    td = trust_domain or (str(t) if (t := here.trust_domain_hint()) is not None else None)
    if td is None:
        raise InvalidInput(f"cannot tell the trust domain of {ca_dir}; pass --trust-domain")
    if ledger is None and not (ca_dir / "ledger.db").exists():
        raise CADirectoryError(f"no ledger at {ca_dir / 'ledger.db'}; pass --ledger URL")
    sql = SqlLedger(ledger or default_ledger_url(ca_dir))
    try:
        rotation = RootRotation(
            sql.engine, ca_dir, clock, trust_domain=td, driver=default_driver(), say=click.echo
        )
        current = rotation.rotations.current()
        resuming = current is not None and current.phase is not Phase.DONE
        kwargs: dict[str, object] = {}
        if resuming:
            assert current is not None
            if root_dir is not None:
                raise InvalidInput(
                    f"root rotation {current.id} is not done (phase {current.phase.label}): "
                    "run `meshtrust ca rotate-root` without --root-dir to resume it"
                )
            click.echo(f"resuming root rotation {current.id}: phase {current.phase.label}")
        elif root_dir is not None:
            given = load_ca_dir(root_dir, now)  # not a CA / incomplete / expired: refused here
            theirs = given.trust_domain_hint()
            if theirs is None or str(theirs) != td:
                raise InvalidInput(
                    f"{root_dir}: its root is for trust domain {theirs or '(none)'}, not {td}"
                )
            chain = given.intermediates or (given.signer.cert,)
            top = chain[-1]
            root = next((r for r in given.roots if r.subject == top.issuer), given.roots[0])
            kwargs = {"chain": chain, "key": given.signer.key, "root_cert": root}
            click.echo(f"rotating to root {fingerprint(root)} from {root_dir}")
        else:
            signer = generate_root(ca_dir, td, now, key_type_of(here.roots[0]))
            kwargs = {"new_root": signer}
            click.echo(
                f"rotating to a new root {fingerprint(signer.cert)} (key in "
                f"{ca_dir / ('root-key-' + fingerprint(signer.cert)[:16] + '.pem')})"
            )
        done = asyncio.run(
            run_rotation(
                rotation,
                force=force,
                timeout=timeout,
                min_phase=min_phase.total_seconds(),
                **kwargs,  # type: ignore[arg-type]
            )
        )
        click.echo(
            f"root rotation {done.id} done: the mesh trusts only root {fingerprint(done.new_root)}"
        )
    finally:
        sql.close()
