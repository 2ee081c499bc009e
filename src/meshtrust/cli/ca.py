"""``meshtrust ca``: create, run and inspect the certificate authority."""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from meshtrust.ca.cadir import init_ca_dir
from meshtrust.ca.config import CaServeConfig, load_config_file, parse_issuer_flag
from meshtrust.cli.options import DURATION
from meshtrust.cli.output import emit, output_option
from meshtrust.clock import SystemClock
from meshtrust.config import as_trust_domain
from meshtrust.durations import format_duration
from meshtrust.errors import ConfigError, InvalidInput
from meshtrust.pki import KeyType
from meshtrust.spiffe import SpiffeId

if TYPE_CHECKING:
    from meshtrust.ca.ledger import SqlLedger
    from meshtrust.ca.revocation import Revocation

__all__ = ["ca"]

KEY_TYPES = [k.value for k in KeyType]
#: RFC 5280 reasons ``ca revoke`` accepts (:data:`meshtrust.ca.revocation.REASONS`).
REASON_NAMES = (
    "unspecified",
    "keyCompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "privilegeWithdrawn",
)


@click.group()
def ca() -> None:
    """Create, run and inspect the certificate authority."""


@ca.command("init")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory to create the CA in (Istio's cacerts layout).",
)
@click.option(
    "--trust-domain",
    help="Trust domain of the identities this CA signs, e.g. example.org. "
    "Required without --root; with --root it defaults to the root's.",
)
@click.option(
    "--root",
    "root_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Sign this CA's intermediate with the shared root in this directory "
    "(made by `meshtrust ca root init`) instead of making a new root.",
)
@click.option(
    "--key-type",
    type=click.Choice(KEY_TYPES),
    help="Key algorithm of the root and intermediate CA.  "
    "[default: ec-p256; with --root, the root's]",
)
@click.option("--force", is_flag=True, help="Replace a CA that is already in --dir.")
@click.option(
    "--intermediate-ttl",
    type=DURATION,
    default="365d",
    show_default=True,
    help="Lifetime of the intermediate signing CA; `ca serve` rotates it (prepare at half, "
    "activate at five sixths) while root-key.pem is in --dir.",
)
def init(
    directory: Path,
    trust_domain: str | None,
    root_dir: Path | None,
    key_type: str | None,
    force: bool,
    intermediate_ttl: dt.timedelta,
) -> None:
    """Create a root CA, an intermediate signing CA and a token-issuer key.

    Writes ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem (Istio's plugged-in
    CA layout), root-key.pem (move it somewhere safe once the CA runs), and
    token-key.pem / token-jwks.json for `meshtrust token create`. Key files are 0600.
    Refuses to overwrite an existing CA unless --force is given.

    With --root ROOT, no root is made: the intermediate is signed by ROOT's root
    (cert-chain.pem = intermediate + root, as Istio's tools/certs <cluster>-cacerts), so
    every mesh initialised from ROOT accepts the others' workloads.
    """
    td = as_trust_domain(trust_domain, "--trust-domain", Path()) if trust_domain else None
    now = SystemClock().now()
    if root_dir is not None:
        from meshtrust.ca.shared_root import init_ca_dir_under_root

        kt = KeyType(key_type) if key_type else None
        td = init_ca_dir_under_root(
            directory, root_dir, now, trust_domain=td, key_type=kt, force=force
        )
        click.echo(f"created CA for trust domain {td} in {directory}, under the root in {root_dir}")
        click.echo(f"  root:         {directory / 'root-cert.pem'}  (shared by every mesh of it)")
        click.echo(f"  signing CA:   {directory / 'ca-cert.pem'}")
        click.echo(f"  token issuer: {directory / 'token-jwks.json'}")
        return
    if td is None:
        raise InvalidInput("--trust-domain is required (or give --root to use a shared root)")
    init_ca_dir(
        directory,
        td,
        now,
        KeyType(key_type or KeyType.EC_P256.value),
        force=force,
        intermediate_lifetime=intermediate_ttl,
    )
    click.echo(f"created CA for trust domain {td} in {directory}")
    click.echo(f"  root:         {directory / 'root-cert.pem'}  (give this to clients)")
    click.echo(f"  signing CA:   {directory / 'ca-cert.pem'}")
    click.echo(
        f"  root key:     {directory / 'root-key.pem'}  (without it the CA serves, "
        "but cannot rotate its intermediate: `meshtrust ca slots`)"
    )
    click.echo(f"  token issuer: {directory / 'token-jwks.json'}")


@ca.group("root")
def root() -> None:
    """The offline root shared by several meshes (Istio's multi-primary model)."""


@root.command("init")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory to create the root in (root-cert.pem, root-key.pem).",
)
@click.option(
    "--trust-domain",
    default="cluster.local",
    show_default=True,
    help="Trust domain recorded in the root (O=); the default of `ca init --root`.",
)
@click.option(
    "--key-type",
    type=click.Choice(KEY_TYPES),
    default=KeyType.EC_P256.value,
    show_default=True,
    help="Key algorithm of the root.",
)
@click.option("--force", is_flag=True, help="Replace a root that is already in --dir.")
def root_init(directory: Path, trust_domain: str, key_type: str, force: bool) -> None:
    """Create an offline root CA for several meshes.

    Writes root-cert.pem (public) and root-key.pem (0600: keep it offline; it is needed
    only to make a mesh's CA). Then, for each mesh:

      meshtrust ca init --dir east-ca --root ROOT

    makes a CA whose intermediate this root signs; meshes made so trust each other.
    """
    from meshtrust.ca.shared_root import init_root_dir

    td = as_trust_domain(trust_domain, "--trust-domain", Path())
    init_root_dir(directory, td, SystemClock().now(), KeyType(key_type), force=force)
    click.echo(f"created root for trust domain {td} in {directory}")
    click.echo(f"  root:     {directory / 'root-cert.pem'}")
    click.echo(f"  root key: {directory / 'root-key.pem'}  (keep offline)")


@ca.command("serve")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML file with any of the settings below (flags override it).",
)
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path),
    help="CA directory (Istio cacerts or tls.crt layout).  [default: ./ca]",
)
@click.option("--listen", help="gRPC+TLS address.  [default: 127.0.0.1:15012]")
@click.option(
    "--ledger",
    help="SQLAlchemy URL of the ledger.  [default: sqlite file ledger.db in the CA directory]",
)
@click.option(
    "--jwt-issuer",
    multiple=True,
    metavar="ISSUER=JWKS_FILE",
    help="Trust bearer tokens from ISSUER, verified with the keys in JWKS_FILE. "
    "Repeatable. The CA's own issuer is always trusted.",
)
@click.option("--audience", help="Required token audience.  [default: istio-ca]")
@click.option(
    "--default-ttl", type=DURATION, help="Lifetime when the request names none. [default: 24h]"
)
@click.option(
    "--max-ttl",
    type=DURATION,
    help="Longest lifetime a request may ask for; longer requests are refused.  [default: 90d]",
)
@click.option(
    "--metrics-listen",
    help="HTTP address for /metrics and /ready; 'off' to disable.  [default: 127.0.0.1:15014]",
)
@click.option(
    "--server-name",
    multiple=True,
    metavar="NAME",
    help="Extra DNS name for the CA's serving certificate (it always covers "
    "localhost and 127.0.0.1). Repeatable.",
)
@click.option("--trust-domain", help="Trust domain.  [default: the root certificate's O]")
@click.option(
    "--workers",
    type=int,
    help="Worker processes sharing the port.  [default: one per CPU, at most 8]",
)
@click.option(
    "--kube-tokenreview",
    metavar="in-cluster|KUBECONFIG",
    help="Also accept tokens the Kubernetes API server vouches for (TokenReview).",
)
@click.option(
    "--kube-jwks",
    metavar="in-cluster|KUBECONFIG",
    help="Also trust the cluster's token issuer, its JWKS from OIDC discovery.",
)
def serve(config_file: Path | None, **flags: Any) -> None:
    """Run the CA: Istio's IstioCertificateService/CreateCertificate on gRPC over TLS.

    Workloads authenticate with a client certificate this CA issued (renewal) or a
    bearer token from a trusted issuer (Kubernetes service-account tokens, or
    `meshtrust token create`). Every issued certificate is recorded in the ledger before
    the response is sent. Stop with Ctrl-C or SIGTERM: in-flight requests are drained.
    """
    settings: dict[str, Any] = load_config_file(config_file) if config_file else {}
    for key, value in flags.items():
        if value is None or value == ():
            continue
        if key == "jwt_issuer":
            settings["jwt_issuers"] = tuple(parse_issuer_flag(v) for v in value)
        elif key == "server_name":
            settings["server_names"] = tuple(value)
        elif key == "trust_domain":
            settings["trust_domain"] = as_trust_domain(value, "--trust-domain", Path())
        else:
            settings[key] = value
    if str(settings.get("metrics_listen", "")).lower() == "off":
        settings["metrics_listen"] = None
    config = CaServeConfig(**settings)
    from meshtrust.ca.runtime import run_ca  # the server's imports only when serving

    run_ca(config)


def _open_ledger(ledger: str | None, ca_dir: Path) -> SqlLedger:
    from meshtrust.ca.ledger import SqlLedger, default_ledger_url

    if ledger is None:
        if not (ca_dir / "ledger.db").exists():
            raise ConfigError(f"no ledger at {ca_dir / 'ledger.db'}; pass --ledger URL or --ca-dir")
        ledger = default_ledger_url(ca_dir)
    return SqlLedger(ledger)


def _default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


_LEDGER_OPTION = click.option("--ledger", help="SQLAlchemy URL of the ledger.")
_CA_DIR_OPTION = click.option(
    "--ca-dir",
    type=click.Path(path_type=Path),
    default=Path("./ca"),
    show_default=True,
    help="CA directory whose ledger.db to use when --ledger is not given.",
)
_ACTOR_OPTION = click.option(
    "--actor", help="Who revokes, for the ledger's record.  [default: USER@HOST]"
)
_WHY_OPTION = click.option("--why", default="", help="Free text for the ledger's record.")


@ca.command("revoke")
@click.option("--serial", help="Serial number (hex) of the certificate to revoke.")
@click.option(
    "--spiffe-id",
    help="Revoke every unexpired certificate of this identity and block new ones for it "
    "until `meshtrust ca unblock`.",
)
@click.option(
    "--reason",
    default="unspecified",
    show_default=True,
    help="RFC 5280 reason: " + ", ".join(REASON_NAMES) + ".",
)
@_WHY_OPTION
@_ACTOR_OPTION
@_LEDGER_OPTION
@_CA_DIR_OPTION
def revoke(
    serial: str | None,
    spiffe_id: str | None,
    reason: str,
    why: str,
    actor: str | None,
    ledger: str | None,
    ca_dir: Path,
) -> None:
    """Revoke a certificate, or every certificate of an identity (and block it).

    Written to the ledger first (who, when, why); every CA replica then refuses renewals
    with the revoked certificates and publishes them in its CRL within seconds. Writes
    straight to the ledger, so it works with the CA running or not.
    """
    from meshtrust.ca.revocation import parse_reason, parse_serial

    if (serial is None) == (spiffe_id is None):
        raise InvalidInput("give exactly one of --serial and --spiffe-id")
    flag = parse_reason(reason)
    wanted_serial = parse_serial(serial) if serial is not None else None
    identity = SpiffeId.parse(spiffe_id) if spiffe_id is not None else None
    who = actor or _default_actor()
    now = SystemClock().now()
    sql = _open_ledger(ledger, ca_dir)
    try:
        if wanted_serial is not None:
            done = sql.revoke_serial(wanted_serial, flag, who, why, now)
            click.echo(f"revoked {done.serial} ({done.spiffe_id}), reason {flag.value}")
            return
        assert identity is not None
        _, revoked = sql.revoke_identity(str(identity), flag, who, why, now)
    finally:
        sql.close()
    click.echo(f"blocked {identity}: no new certificates until `meshtrust ca unblock`")
    click.echo(f"revoked {len(revoked)} unexpired certificate(s), reason {flag.value}")
    for rec in revoked:
        click.echo(f"  {rec.serial}")


@ca.command("unblock")
@click.option("--spiffe-id", required=True, help="Identity to let get certificates again.")
@_WHY_OPTION
@_ACTOR_OPTION
@_LEDGER_OPTION
@_CA_DIR_OPTION
def unblock(spiffe_id: str, why: str, actor: str | None, ledger: str | None, ca_dir: Path) -> None:
    """Let a blocked identity get certificates again (revoked ones stay revoked)."""
    identity = SpiffeId.parse(spiffe_id)
    sql = _open_ledger(ledger, ca_dir)
    try:
        block = sql.unblock(str(identity), actor or _default_actor(), why, SystemClock().now())
    finally:
        sql.close()
    click.echo(f"unblocked {identity} (blocked since {block.blocked_at:%Y-%m-%d %H:%M:%SZ})")


@ca.group("certs")
def certs() -> None:
    """Inspect the certificates recorded in the ledger."""


@certs.command("list")
@click.option("--ledger", help="SQLAlchemy URL of the ledger.")
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path),
    default=Path("./ca"),
    show_default=True,
    help="CA directory whose ledger.db to read when --ledger is not given.",
)
@click.option(
    "--expiring-within",
    type=DURATION,
    help="Only certificates that are still valid and expire within this time.",
)
@output_option()
def certs_list(
    ledger: str | None, ca_dir: Path, expiring_within: dt.timedelta | None, output: str
) -> None:
    """List issued certificates, soonest expiry first, with their revocations."""
    now = SystemClock().now()
    sql = _open_ledger(ledger, ca_dir)
    try:
        records = sql.certificates(
            expiring_before=now + expiring_within if expiring_within is not None else None,
            not_expired_at=now if expiring_within is not None else None,
        )
        revoked = sql.revocations()
    finally:
        sql.close()
    if output != "table":
        emit(
            [
                    {
                        "serial": r.serial,
                        "spiffe_id": r.spiffe_id,
                        "not_before": r.not_before.isoformat(),
                        "not_after": r.not_after.isoformat(),
                        "key_type": r.key_type,
                        "requester": r.requester,
                        "authenticator": r.authenticator,
                        "issued_at": r.issued_at.isoformat(),
                        "expired": r.not_after <= now,
                        "revoked": _revocation_json(revoked.get(r.serial)),
                    }
                    for r in records
                ],
            output,
        )
        return
    table = Table(title=f"{len(records)} certificates")
    for col in ("SERIAL", "SPIFFE ID", "NOT AFTER", "EXPIRES IN", "KEY", "VIA", "REVOKED"):
        table.add_column(col)
    for r in records:
        left = r.not_after - now
        rev = revoked.get(r.serial)
        table.add_row(
            r.serial,
            r.spiffe_id,
            f"{r.not_after:%Y-%m-%d %H:%M:%SZ}",
            "expired" if left.total_seconds() <= 0 else format_duration(left),
            r.key_type,
            r.authenticator,
            "" if rev is None else f"{rev.revoked_at:%Y-%m-%d %H:%M:%SZ} {rev.reason.value}",
        )
    Console().print(table)


def _revocation_json(rev: Revocation | None) -> dict[str, str] | None:
    if rev is None:
        return None
    return {
        "at": rev.revoked_at.isoformat(),
        "reason": rev.reason.value,
        "actor": rev.actor,
        "why": rev.why,
    }


from meshtrust.cli.ca_slots import slots  # noqa: E402 (its own module: `ca slots`)

ca.add_command(slots)
# The trust bundle's commands live beside (meshtrust.cli.ca_trust), registered here.
from meshtrust.cli.ca_trust import bundle, rotation  # noqa: E402

ca.add_command(rotation)
ca.add_command(bundle)
from meshtrust.cli.ca_rootrot import rotate_root  # noqa: E402

ca.add_command(rotate_root)
