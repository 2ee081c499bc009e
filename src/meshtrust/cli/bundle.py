"""``meshtrust bundle``: the CA's trust bundle and the federated ones, as
``spire-server bundle show|list|set|delete``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from meshtrust.clock import SystemClock
from meshtrust.config import as_trust_domain
from meshtrust.errors import ConfigError, InvalidInput
from meshtrust.spiffe import TrustDomain

if TYPE_CHECKING:
    from meshtrust.ca.federation import FederationStore
    from meshtrust.spiffe.bundle import SpiffeBundle

__all__ = ["bundle"]

FORMATS = ("pem", "spiffe")

_CA_DIR = click.option(
    "--ca-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("./ca"),
    show_default=True,
    help="CA directory (its root-cert.pem, and its ledger.db when --ledger is not given).",
)
_LEDGER = click.option("--ledger", help="SQLAlchemy URL of the CA's ledger.")
_FORMAT = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="pem",
    show_default=True,
    help="pem: the root certificates; spiffe: the SPIFFE bundle document (JSON).",
)


@click.group()
def bundle() -> None:
    """The CA's trust bundle and the bundles of federated trust domains.

    `bundle show` prints the mesh's own bundle; `bundle list|set|delete` handle the
    bundles of *other* trust domains (SPIFFE federation). To change the mesh's own roots
    (a root rotation), use `meshtrust ca bundle add-root|remove-root`.

    \b
    Static federation, without bundle endpoints:
      east$ meshtrust bundle show --format spiffe > east.json
      west$ meshtrust bundle set --trust-domain east.test east.json
    """


def _store(ledger: str | None, ca_dir: Path, *, create: bool = False) -> FederationStore:
    """The ledger's federation tables; ``create``: make the CA directory's ledger.db if the
    CA has not served yet (``bundle set`` before the first ``ca serve``)."""
    from meshtrust.ca.federation import FederationStore
    from meshtrust.ca.ledger import SqlLedger, default_ledger_url

    if ledger is None:
        if create and (ca_dir / "root-cert.pem").exists():
            ledger = default_ledger_url(ca_dir)
        elif not (ca_dir / "ledger.db").exists():
            raise ConfigError(
                f"no ledger at {ca_dir / 'ledger.db'}; pass --ledger URL or --ca-dir "
                "(the CA makes it when it first serves)"
            )
        ledger = default_ledger_url(ca_dir)
    SqlLedger(ledger).close()  # opens and migrates it (migration 5 holds the bundles)
    return FederationStore(ledger)


def _emit(found: SpiffeBundle, fmt: str) -> None:
    from meshtrust.pki import certs_pem
    from meshtrust.spiffe.bundle import bundle_document

    data = bundle_document(found) if fmt == "spiffe" else certs_pem(found.x509_authorities)
    click.echo(data.decode(), nl=False)


@bundle.command("show")
@_FORMAT
@_CA_DIR
@_LEDGER
def show(fmt: str, ca_dir: Path, ledger: str | None) -> None:
    """Print this CA's own trust bundle: the mesh's versioned bundle, what its bundle
    endpoint serves (as `spire-server bundle show`).

    With a ledger it is the ledger's current bundle version (the roots `meshtrust ca bundle
    add-root|remove-root` change during a root rotation), and the version is the
    spiffe_sequence; before the CA first served, the CA directory's roots. Give the output
    to another trust domain's `meshtrust bundle set`, or as its bootstrapBundle.
    """
    from meshtrust.ca.cadir import load_ca_dir
    from meshtrust.ca.trust import TrustLedger
    from meshtrust.config.federation import DEFAULT_REFRESH_HINT
    from meshtrust.spiffe.bundle import SpiffeBundle

    now = SystemClock().now()
    material = load_ca_dir(ca_dir, now)
    td = material.trust_domain_hint()
    if td is None:
        raise ConfigError(f"cannot tell the trust domain of the CA in {ca_dir} from its O")
    roots, sequence = material.roots, None
    if ledger is not None or (ca_dir / "ledger.db").exists():
        store = _store(ledger, ca_dir)
        try:
            current = TrustLedger(store.engine).current()
        finally:
            store.close()
        if current is not None:
            roots, sequence = current.roots, current.version
    _emit(SpiffeBundle(td, roots, sequence, DEFAULT_REFRESH_HINT), fmt)


@bundle.command("list")
@_FORMAT
@_CA_DIR
@_LEDGER
def list_bundles(fmt: str, ca_dir: Path, ledger: str | None) -> None:
    """Print every federated trust domain's last good bundle, with where it came from."""
    store = _store(ledger, ca_dir)
    try:
        found = store.load_all()
    finally:
        store.close()
    if not found:
        click.echo("no federated bundles", err=True)
    for td, stored in sorted(found.items(), key=lambda item: item[0].name):
        seq = stored.bundle.sequence
        click.echo(
            f"# {td}: sequence {seq if seq is not None else '-'}, from {stored.source}, "
            f"updated {stored.updated_at:%Y-%m-%d %H:%M:%SZ}"
        )
        _emit(stored.bundle, fmt)


@bundle.command("set")
@click.option(
    "--trust-domain",
    required=True,
    help="The federated trust domain FILE is the bundle of.",
)
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_CA_DIR
@_LEDGER
def set_bundle(trust_domain: str, file: Path, ca_dir: Path, ledger: str | None) -> None:
    """Trust FILE as the bundle of TRUST_DOMAIN (static federation).

    FILE holds PEM root certificates or a SPIFFE bundle document (`bundle show --format
    spiffe` of the other CA); it is checked as strictly as a fetched one. It replaces that
    trust domain's stored bundle; a bundle endpoint configured for it replaces it again at
    its next refresh.
    """
    from meshtrust.ca.federation import load_bootstrap_bundle
    from meshtrust.spiffe.bundle import MAX_DOCUMENT_BYTES

    td = as_trust_domain(trust_domain, "--trust-domain", Path())
    _refuse_own(td, ca_dir)
    with file.open("rb") as f:
        data = f.read(MAX_DOCUMENT_BYTES + 1)  # bounded: a larger file is refused unread
    found = load_bootstrap_bundle(data, td, str(file))
    if not found.x509_authorities:
        raise InvalidInput(f"{file}: no X.509 authorities for {td}")
    store = _store(ledger, ca_dir, create=True)
    try:
        store.save(found, f"static: {file.resolve()}", SystemClock().now())
    finally:
        store.close()
    click.echo(f"bundle of {td} set: {len(found.x509_authorities)} root(s) from {file}")


@bundle.command("delete")
@click.option("--trust-domain", required=True, help="The federated trust domain to forget.")
@_CA_DIR
@_LEDGER
def delete(trust_domain: str, ca_dir: Path, ledger: str | None) -> None:
    """Forget the stored bundle of a federated trust domain."""
    td = as_trust_domain(trust_domain, "--trust-domain", Path())
    store = _store(ledger, ca_dir)
    try:
        gone = store.delete(td)
    finally:
        store.close()
    if not gone:
        raise InvalidInput(f"no bundle of {td} is stored")
    click.echo(f"bundle of {td} deleted")


def _refuse_own(td: TrustDomain, ca_dir: Path) -> None:
    """A CA never takes a foreign bundle for its own trust domain (never merged)."""
    if not (ca_dir / "root-cert.pem").exists():
        return
    from meshtrust.ca.cadir import load_ca_dir

    own = load_ca_dir(ca_dir, SystemClock().now()).trust_domain_hint()
    if own == td:
        raise InvalidInput(
            f"{td} is this CA's own trust domain; its bundle is its own roots, not a set one"
        )
