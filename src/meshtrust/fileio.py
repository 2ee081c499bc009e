"""Files that hold what users trust us with: written whole or not at all, keys 0600 from
the first byte, durable once written, and PEM handed to ``ssl`` without touching a disk.

Durability: a rename is only durable once the *directory* holding it is on disk, so every
atomic write fsyncs the file, renames it, then fsyncs the directory (without the last step a
power loss can leave the old name, or no name, after we reported success). The ``fsync``
argument is the one seam for observing that (tests pass a recorder); it defaults to
:func:`os.fsync`.

Keys to ``ssl``: :meth:`ssl.SSLContext.load_cert_chain` only reads files. On Linux the PEM
goes into anonymous memory files (``memfd_create``) opened through ``/proc/self/fd/N``:
they live in RAM, have no name on any filesystem and vanish when closed. Where that is not
available (not Linux, or no ``/proc``), a private 0700 directory removed at once is the
fallback; the agent and CA are supported on Linux.

Modes: every file and directory meshtrust creates gets its mode from here, set explicitly
(``fchmod``/``chmod`` after creation), so the umask of whoever started us makes no
difference. Directories are 0700 (:func:`ensure_private_dir`), secrets, logs, the ledger and
operational files 0600 (:func:`write_private_file`, :func:`open_log`,
:func:`create_private_file`); only public certificates and JWKS are 0644 — and they live in
0700 directories anyway. An *existing* directory is checked, not silently changed: one
that other users can write to (without the sticky bit), or that another user owns, is
refused with :class:`UnsafeDirectory`, because whoever can write there can swap the files
we trust (``root-cert.pem``, the ``..data`` link). Directories that are meshtrust's own
(inside a mesh's workDir) are tightened instead (``tighten=True``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from meshtrust.errors import EnvironmentFault

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "PUBLIC_FILE_MODE",
    "Fsync",
    "UnsafeDirectory",
    "check_not_writable_by_others",
    "create_private_file",
    "ensure_private_dir",
    "fsync_directory",
    "load_cert_chain_pem",
    "open_log",
    "write_file_atomic",
    "write_private_file",
]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600  # keys, tokens, ledger, logs, state, generated configs
PUBLIC_FILE_MODE = 0o644  # certificates and JWKS: public by nature


class UnsafeDirectory(EnvironmentFault):
    """An existing directory that other users could write to, or that another user owns."""


#: ``fsync(fd)``; :func:`os.fsync` unless a test wants to watch.
Fsync = Callable[[int], None]


def fsync_directory(directory: Path, fsync: Fsync = os.fsync) -> None:
    """Make the entries of ``directory`` (renames, new links) durable.

    A filesystem that cannot sync a directory (EINVAL/ENOTSUP, as some network and FUSE
    filesystems answer) is accepted: there is nothing more to do there. Any other error
    (EIO: the data may not be on disk) is raised as :class:`OSError`.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_file_atomic(
    path: Path, data: bytes, mode: int = 0o600, *, fsync: Fsync = os.fsync
) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file in the same directory,
    fsync, rename, fsync of the directory) with ``mode`` from creation; nothing is left
    behind on failure. Raises :class:`OSError`; the old file is then untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent, fsync)


def write_private_file(path: Path, data: bytes, *, fsync: Fsync = os.fsync) -> None:
    """:func:`write_file_atomic` with mode 0600 (keys, tokens)."""
    write_file_atomic(path, data, 0o600, fsync=fsync)


def _check_existing_dir(path: Path, mode: int, tighten: bool) -> None:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    ours = st.st_uid == os.geteuid()
    if tighten and ours:
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
        return
    if not ours and st.st_uid != 0:
        raise UnsafeDirectory(
            f"{path} belongs to another user (uid {st.st_uid}), who could replace what "
            "meshtrust keeps there; use a directory of your own"
        )
    check_not_writable_by_others(path)


def check_not_writable_by_others(path: Path) -> None:
    """Refuse (:class:`UnsafeDirectory`) an existing directory that group members or other
    users can write to without the sticky bit (a Kubernetes secret mount, 1777, is fine:
    nobody else can rename or remove its entries)."""
    st = os.stat(path)
    writable = st.st_mode & 0o022
    if writable and not st.st_mode & stat.S_ISVTX:
        if writable == 0o022:
            who = "group members and other users"
        else:
            who = "group members" if writable == 0o020 else "other users"
        raise UnsafeDirectory(
            f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}), who could "
            f"replace the files meshtrust keeps there; `chmod go-w {path}` or use another "
            "directory"
        )


def ensure_private_dir(path: Path, mode: int = PRIVATE_DIR_MODE, *, tighten: bool = False) -> None:
    """Make ``path`` (and missing parents) a directory with ``mode`` whatever the umask.

    An existing ``path`` keeps its mode if it is safe — not writable by group or others
    (unless sticky), owned by us or root; with ``tighten`` a directory of ours is set to
    ``mode`` instead (directories only meshtrust uses). Raises :class:`UnsafeDirectory`,
    or :class:`OSError` when it cannot be made.
    """
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    made = False
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: checked below like any existing one
        os.chmod(directory, mode)  # mkdir's mode went through the umask
        made = directory == path
    if not made:
        _check_existing_dir(path, mode, tighten)


def create_private_file(path: Path, mode: int = PRIVATE_FILE_MODE) -> None:
    """Make sure ``path`` exists with ``mode`` (created empty if missing, never truncated),
    e.g. so that SQLite, which gives its ``-wal``/``-shm`` files the database's mode, opens
    a file that is already private. An existing file of ours is tightened to ``mode``.
    Raises :class:`OSError`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        _tighten(fd, mode)
    finally:
        os.close(fd)


def open_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, 0600 whatever the umask (a log from an earlier run
    that was more open is tightened: logs hold identities and addresses). Raises
    :class:`OSError`."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        _tighten(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "ab")


def _tighten(fd: int, mode: int) -> None:
    st = os.fstat(fd)
    if stat.S_IMODE(st.st_mode) != mode and st.st_uid == os.geteuid():
        os.fchmod(fd, mode)


def load_cert_chain_pem(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``context.load_cert_chain`` from PEM in memory; the key never reaches a filesystem
    on Linux (see the module docstring). Raises :class:`ssl.SSLError` for bad PEM."""
    with _pem_paths(chain_pem, key_pem) as (cert_file, key_file):
        context.load_cert_chain(cert_file, key_file)


def _memfd_supported() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@contextlib.contextmanager
def _pem_paths(chain_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    if _memfd_supported():
        with _memory_file("tls.crt", chain_pem) as cert, _memory_file("tls.key", key_pem) as key:
            yield cert, key
        return
    with tempfile.TemporaryDirectory(prefix="meshtrust-tls-") as tmp:
        cert_file, key_file = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_file.write_bytes(chain_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        yield str(cert_file), str(key_file)


@contextlib.contextmanager
def _memory_file(name: str, data: bytes) -> Iterator[str]:
    """An anonymous in-memory file holding ``data``, as a path ``open()`` accepts."""
    fd = os.memfd_create(f"meshtrust-{name}", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
