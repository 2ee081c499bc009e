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
"""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "Fsync",
    "fsync_directory",
    "load_cert_chain_pem",
    "write_file_atomic",
    "write_private_file",
]

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
