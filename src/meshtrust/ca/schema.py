"""The ledger's tables and their versioned migrations, which the CA applies itself at start.

Theory of operation. The ledger records its schema version in ``meshtrust_schema`` (one row
per migration applied: version, description, when). :func:`migrate` runs when a ledger is
opened: it reads the versions recorded, refuses a ledger *newer* than this meshtrust knows
(a replica of an older release must not write into a schema it does not understand), and
applies every migration not recorded yet, in version order, in one transaction. Missing is
judged per version, not by the highest: migrations are self-contained, so one numbered
below another that is already applied (developed side by side) is still applied.

Several CA replicas may open one fresh PostgreSQL ledger at the same moment. Without care
they all run ``CREATE TABLE`` at once and all but one die on the catalogue's unique index
(``pg_type_typname_nsp_index``). So the whole check-and-migrate transaction first takes a
transaction-scoped advisory lock (``pg_advisory_xact_lock``): replicas queue, the first one
migrates, the others find the schema current and go on. PostgreSQL's DDL is transactional,
so a migration that fails leaves nothing half-made. On SQLite the transaction is ``BEGIN
IMMEDIATE``, which takes the database's write lock at once for the same effect.

A ledger made before versioning (``certificates`` and ``audit`` present, no
``meshtrust_schema``) is adopted as version 1: migration 1 creates its tables only where
they are missing.

Why not Alembic: the CA is the only thing that migrates its ledger and does it at start,
under a lock, for SQLite and PostgreSQL alike; a list of small functions on a connection
(the shape Alembic's operations have) says the same with no ``alembic.ini``/``env.py`` to
ship or configure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from meshtrust.errors import LedgerError

__all__ = [
    "SCHEMA_VERSION",
    "Migration",
    "audit",
    "blocks",
    "certificates",
    "federated_bundles",
    "migrate",
    "published_bundle",
    "revocations",
    "root_rotations",
    "schema_version",
    "signing_slots",
    "trust_bundles",
    "trust_served",
]

metadata = sa.MetaData()

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("serial", sa.String(40), primary_key=True),  # lower-case hex
    sa.Column("spiffe_id", sa.String(2048), nullable=False, index=True),
    sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
    sa.Column("not_after", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("key_type", sa.String(32), nullable=False),
    sa.Column("requester", sa.String(512), nullable=False),
    sa.Column("authenticator", sa.String(32), nullable=False),
    sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("cert_pem", sa.Text, nullable=False),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("actor", sa.String(512), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)

#: One row per revoked certificate (migration 2). Written before the revocation takes effect:
#: every CA replica reads this table (:mod:`meshtrust.ca.revocation`) to refuse renewals and
#: build its CRL.
revocations = sa.Table(
    "revocations",
    metadata,
    sa.Column("serial", sa.String(40), primary_key=True),  # lower-case hex, as certificates
    sa.Column("spiffe_id", sa.String(2048), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),  # RFC 5280 CRLReason name
    sa.Column("actor", sa.String(512), nullable=False),
    sa.Column("why", sa.Text, nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
)

#: Identities whose issuance is blocked (migration 2); ``lifted_at`` set by ``ca unblock``.
blocks = sa.Table(
    "blocks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("spiffe_id", sa.String(2048), nullable=False, index=True),
    sa.Column("actor", sa.String(512), nullable=False),
    sa.Column("why", sa.Text, nullable=False),
    sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("lifted_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("lifted_by", sa.String(512), nullable=True),
)

#: The signing CAs (intermediates) and the slot each is in (migration 3;
#: :mod:`meshtrust.ca.signing`). One row per intermediate, keyed by its generation (1 is the
#: CA directory's own): the primary key is the arbiter when two replicas prepare at once.
#: ``state`` only moves forward (1 prepared, 2 active, 3 old, 4 retired), so the sum of the
#: states plus the row count is a revision that only grows. The key is not here: ``key_file``
#: names its 0600 file in the CA directory.
signing_slots = sa.Table(
    "signing_slots",
    metadata,
    sa.Column("generation", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("cert_pem", sa.Text, nullable=False),  # the signing CA, then intermediates above it
    sa.Column("roots_pem", sa.Text, nullable=False),  # the roots that chain ends at
    sa.Column("key_file", sa.String(255), nullable=False),
    sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
    sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_by", sa.String(512), nullable=False),
)

#: The mesh's trust bundle, one row per version (migration 4; :mod:`meshtrust.ca.trust`).
#: The highest version is the current bundle: the roots (PEM, concatenated) every agent is
#: told to trust. Rows are only added, so the version only grows, whichever replica writes.
trust_bundles = sa.Table(
    "trust_bundles",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("roots_pem", sa.Text, nullable=False),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("actor", sa.String(512), nullable=False),
    sa.Column("why", sa.Text, nullable=False),
)

#: Which bundle version each identity's agent reports it serves (migration 4).
trust_served = sa.Table(
    "trust_served",
    metadata,
    sa.Column("spiffe_id", sa.String(2048), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("serial", sa.String(40), nullable=False),  # the certificate it reported with
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
)

#: The last good bundle of each federated trust domain (migration 5): fetched from its
#: bundle endpoint or set by `meshtrust bundle set`, kept so a restart does not lose it.
#: Never merged into the CA's own bundle (:mod:`meshtrust.ca.federation`).
federated_bundles = sa.Table(
    "federated_bundles",
    metadata,
    sa.Column("trust_domain", sa.String(255), primary_key=True),
    sa.Column("document", sa.Text, nullable=False),  # the SPIFFE bundle document, as checked
    sa.Column("sequence", sa.BigInteger, nullable=True),
    sa.Column("source", sa.String(2048), nullable=False),  # endpoint URL, or "static: FILE"
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

#: The CA's own published bundle (migration 5): its digest and ``spiffe_sequence``. No
#: longer read or written: the bundle endpoint serves the versioned ``trust_bundles`` (its
#: version is the ``spiffe_sequence``). Kept because ledgers made since migration 5 have it
#: and migrations only add.
published_bundle = sa.Table(
    "published_bundle",
    metadata,
    sa.Column("trust_domain", sa.String(255), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Migration 6: root rotations, their phase and the lease of the command driving them
# (:mod:`meshtrust.ca.rootrotation`). Independent of 5 (federation).
root_rotations = sa.Table(
    "root_rotations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("phase", sa.Integer, nullable=False),
    sa.Column("old_roots_pem", sa.Text, nullable=False),
    sa.Column("new_root_pem", sa.Text, nullable=False),
    sa.Column("chain_pem", sa.Text, nullable=False),  # a plugged-in signing CA, or ""
    sa.Column("key_file", sa.String(255), nullable=False),
    sa.Column("generation", sa.Integer, nullable=True),
    sa.Column("target_version", sa.Integer, nullable=True),
    sa.Column("excluded", sa.Text, nullable=False),  # identities --force went on without
    sa.Column("driver", sa.String(512), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

schema_table = sa.Table(
    "meshtrust_schema",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

# Any 64-bit number no other application on the server uses: "meshtrst" in ASCII.
ADVISORY_LOCK_KEY = 0x6D65736874727374 - (1 << 63)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_certificates_and_audit(conn: Connection) -> None:
    certificates.create(conn, checkfirst=True)
    audit.create(conn, checkfirst=True)


def _v2_revocations_and_blocks(conn: Connection) -> None:
    revocations.create(conn, checkfirst=True)
    blocks.create(conn, checkfirst=True)


def _v3_signing_slots(conn: Connection) -> None:
    signing_slots.create(conn, checkfirst=True)


def _v4_trust_bundle(conn: Connection) -> None:
    trust_bundles.create(conn, checkfirst=True)
    trust_served.create(conn, checkfirst=True)


def _v5_federated_bundles(conn: Connection) -> None:
    federated_bundles.create(conn, checkfirst=True)
    published_bundle.create(conn, checkfirst=True)


def _v6_root_rotations(conn: Connection) -> None:
    root_rotations.create(conn, checkfirst=True)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "certificates and audit", _v1_certificates_and_audit),
    Migration(2, "revocations and blocks", _v2_revocations_and_blocks),
    Migration(3, "signing CA slots", _v3_signing_slots),
    Migration(4, "trust bundle versions and what agents serve", _v4_trust_bundle),
    Migration(5, "federated bundles", _v5_federated_bundles),
    Migration(6, "root rotations and their phase", _v6_root_rotations),
)
SCHEMA_VERSION = max(m.version for m in MIGRATIONS)


def applied_versions(conn: Connection) -> set[int]:
    """The migrations recorded in the ledger (empty: nothing recorded yet)."""
    if not sa.inspect(conn).has_table(schema_table.name):
        return set()
    return {int(v) for v in conn.execute(sa.select(schema_table.c.version)).scalars()}


def schema_version(conn: Connection) -> int:
    """The version recorded in the ledger (0: nothing recorded yet)."""
    if not sa.inspect(conn).has_table(schema_table.name):
        return 0
    found = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar()
    return int(found or 0)


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(
    engine: Engine,
    now: dt.datetime,
    where: str,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> int:
    """Bring the ledger to :data:`SCHEMA_VERSION` (every one of ``migrations``); return the
    version it had before.

    Raises :class:`LedgerError` when the ledger is newer than this meshtrust, or when it
    cannot be read or migrated (``where`` names it in the message, password hidden).
    """
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                # pysqlite opens transactions lazily; let BEGIN IMMEDIATE be the first.
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                _lock(conn)
                try:
                    found = _migrate_locked(conn, now, where, migrations)
                except BaseException:
                    conn.exec_driver_sql("ROLLBACK")
                    raise
                conn.exec_driver_sql("COMMIT")
                return found
            with conn.begin():
                _lock(conn)
                return _migrate_locked(conn, now, where, migrations)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise LedgerError(
            f"cannot open the ledger at {where}: {exc.__class__.__name__}: {reason}"
        ) from exc


def _migrate_locked(
    conn: Connection, now: dt.datetime, where: str, migrations: Sequence[Migration]
) -> int:
    applied = applied_versions(conn)
    found = max(applied, default=0)
    newest = max(m.version for m in migrations)
    if found > newest:
        raise LedgerError(
            f"the ledger at {where} has schema version {found}, newer than this meshtrust "
            f"knows (up to {newest}): another CA replica runs a newer release; "
            "upgrade this one (a ledger is never downgraded)"
        )
    unknown = applied - {m.version for m in migrations}
    if unknown:
        raise LedgerError(
            f"the ledger at {where} has schema migration(s) {sorted(unknown)} that this "
            "meshtrust does not know: another CA replica runs a newer release; upgrade this one"
        )
    missing = [m for m in sorted(migrations, key=lambda m: m.version) if m.version not in applied]
    if not missing:
        return found
    schema_table.create(conn, checkfirst=True)
    # By the versions recorded, not the highest: a ledger migrated by a release that had
    # migration 4 but not yet 3 gets 3 when it arrives. Each migration is self-contained.
    for migration in missing:
        migration.apply(conn)
        conn.execute(
            schema_table.insert(),
            [
                {
                    "version": migration.version,
                    "description": migration.description,
                    "applied_at": now,
                }
            ],
        )
    return found
