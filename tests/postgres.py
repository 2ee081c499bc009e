"""A real, throwaway PostgreSQL server for the ledger tests.

:func:`postgres_server` makes a cluster with the installed PostgreSQL's ``initdb`` in a
fresh directory, starts it with ``pg_ctl`` on a free loopback port (and a Unix socket in that
directory), and removes it all afterwards. PostgreSQL refuses to run as root, and CI runs as
root: then the cluster belongs to a system user made for it (``meshtrust-pg``, created once
with ``useradd``, owning nothing else) and the server runs as that user. Connections are
``trust`` on loopback only: the server is the test's and lives minutes.

The PostgreSQL binaries come from the OS (Debian: ``apt-get install postgresql``;
``scripts/system-packages`` installs it); where they are missing the tests *fail* with
that hint rather than skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import free_port

__all__ = ["PostgresServer", "pg_bin", "postgres_server"]

PG_USER = "meshtrust-pg"


def pg_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest installed major version)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")  # another layout (a distribution's own, or a build)
    if found is None or not (Path(found).resolve().parent / "initdb").exists():
        pytest.fail(
            "PostgreSQL is not installed (needed for the ledger tests): "
            "run scripts/system-packages (Debian: apt-get install postgresql)",
            pytrace=False,
        )
    return Path(found).resolve().parent


@dataclass
class PostgresServer:
    """A running throwaway cluster: where it is and how to reach it."""

    port: int
    datadir: Path
    bin: Path
    run_as: str | None  # the system user the server runs as (None: this user)

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database (psycopg 3)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {done.stderr.strip()}")
        return done.stdout

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / "pg_ctl"), "-D", str(self.datadir), *args]
        done = subprocess.run(
            _as(self.run_as, argv), capture_output=True, text=True, timeout=120, check=False
        )
        if check and done.returncode != 0:
            log = self.datadir.parent / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl {' '.join(args)}: {done.stderr.strip()}\n{tail}")
        return done

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.datadir.parent} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-w", "-t", "60", "-l", str(self.datadir.parent / "server.log"),
                     "-o", opts, "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash as far as clients can tell)."""
        self._pg_ctl("-w", "-m", mode, "stop", check=False)


def _as(user: str | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
            "--clear-groups", "--", *argv]  # fmt: skip


def _server_user() -> str | None:
    """None when not root; else the system user the server runs as (made on first use)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            capture_output=True,
            check=False,  # a parallel creator may have won; getpwnam decides
        )
        pwd.getpwnam(PG_USER)
    return PG_USER


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh cluster, started; stopped and removed afterwards, even on failure."""
    bindir = pg_bin()
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="mtpg-"))  # short: the socket path must fit
    datadir = root / "data"
    server = PostgresServer(port=free_port(), datadir=datadir, bin=bindir, run_as=user)
    try:
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        root.chmod(0o700)
        init = subprocess.run(
            _as(
                user,
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(datadir),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            ),  # fmt: skip
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()}")
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
