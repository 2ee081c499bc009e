"""Files that hold what users trust us with: written whole or not at all, keys 0600 from
the first byte, and PEM handed to ``ssl`` (which only loads keys from files) through a
private directory that is removed at once."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

__all__ = ["load_cert_chain_pem", "write_file_atomic", "write_private_file"]


def write_file_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync,
    rename) with ``mode`` from creation; nothing is left behind on failure."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private_file(path: Path, data: bytes) -> None:
    """:func:`write_file_atomic` with mode 0600 (keys, tokens)."""
    write_file_atomic(path, data, 0o600)


def load_cert_chain_pem(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``context.load_cert_chain`` from PEM in memory, via a 0700 directory removed at once."""
    with tempfile.TemporaryDirectory(prefix="meshtrust-tls-") as tmp:
        cert_file, key_file = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_file.write_bytes(chain_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        context.load_cert_chain(cert_file, key_file)
