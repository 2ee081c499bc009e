"""The agent's Unix sockets (SDS, Workload API): private from the first moment, never
stealing a live one, removed on stop — one implementation for both servers.

We bind the listening socket ourselves and hand it to the gRPC server
(:mod:`meshtrust.agent.grpc_server`), rather than let the server bind a path: asyncio's
``create_unix_server`` (like grpcio's ``add_insecure_port``) unlinks whatever socket is
already at the path, even one a live agent serves on, and creates the file with mode
``0777 & ~umask``. So: look first (a socket nobody answers on is stale and removed; a live
one is refused), set the umask only around the one synchronous ``bind`` (the umask is
process-wide: no ``await`` may happen inside the window, or other coroutines would create
files under it), chmod to be sure, and on stop remove the file only if it is still the one
we bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

from meshtrust.errors import AddressInUse, ConfigError

__all__ = ["MAX_SOCKET_PATH", "PrivateSocket"]

#: sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH = 107


class PrivateSocket:
    """One socket path owned by one server. ``what`` names it in messages."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._identity: tuple[int, int] | None = None

    def prepare(self) -> None:
        """Parent directory present (0700 when we create it); stale socket removed.

        Raises :class:`ConfigError` (too long, not a socket, directory not creatable) or
        :class:`AddressInUse` (a live server answers on it).
        """
        path = self.path
        size = len(os.fsencode(path))
        if size > MAX_SOCKET_PATH:
            raise ConfigError(
                f"{self.what} path {str(path)!r} is too long for a Unix socket "
                f"({size} bytes; the limit is {MAX_SOCKET_PATH})"
            )
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the {self.what} directory {str(path.parent)!r}: {exc.strerror}"
            ) from exc
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(
                f"{self.what} path {str(path)!r} exists and is not a socket; refusing to "
                "replace it (remove it or choose another path)"
            )
        if self._is_live():
            raise AddressInUse(
                f"{self.what} {str(path)!r}: another server is listening on it (in use; "
                "is another agent serving this workload?)"
            )
        path.unlink()

    def _is_live(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            result = probe.connect_ex(os.fspath(self.path))
        finally:
            probe.close()
        if result in (0, errno.EAGAIN, errno.EINPROGRESS):
            return True
        if result in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise ConfigError(f"{self.what} {str(self.path)!r}: cannot use it: {os.strerror(result)}")

    def listen(self, backlog: int = 128) -> socket.socket:
        """Prepare the path and return a listening, non-blocking socket bound to it, the file
        mode 0600 from the first moment (see the module docstring). Synchronous on purpose.

        Raises :class:`ConfigError` or :class:`AddressInUse` as :meth:`prepare` does, and
        :class:`ConfigError` when the socket cannot be bound.
        """
        self.prepare()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                sock.bind(os.fspath(self.path))
            finally:
                os.umask(old_umask)
            st = self.path.lstat()
            self._identity = (st.st_dev, st.st_ino)
            os.chmod(self.path, 0o600)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.remove()
            if exc.errno == errno.EADDRINUSE:
                # Another server bound the path between our look and our bind.
                raise AddressInUse(
                    f"{self.what} {str(self.path)!r}: another server is listening on it "
                    "(in use; is another agent serving this workload?)"
                ) from exc
            raise ConfigError(
                f"{self.what} {str(self.path)!r}: cannot listen: {exc.strerror or exc}"
            ) from exc
        return sock

    def remove(self) -> None:
        """Remove the socket file if it is still the one we bound."""
        identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if identity == (st.st_dev, st.st_ino):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
