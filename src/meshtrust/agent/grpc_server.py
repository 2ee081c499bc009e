"""A gRPC server on one of the agent's private Unix sockets (grpclib).

The agent serves SDS and the Workload API with grpclib rather than grpcio: the agent is a
long-lived, per-workload process whose memory matters, and grpcio's C core (its library,
threads and arenas) costs several times what grpclib's pure-Python HTTP/2 does, for a
handful of small messages an hour. (The CA also serves with grpclib: :mod:`meshtrust.ca.server`.)

:class:`UnixGrpcServer` adds what grpclib's :class:`~grpclib.server.Server` leaves to its
user:

* the socket: bound by :class:`~meshtrust.agent.uds.PrivateSocket` (0600 from the first
  moment, a live socket never taken over, a stale one replaced) and removed on stop;
* a graceful stop: the owner first ends its calls its own way (SDS ends its streams with OK,
  the Workload API with UNAVAILABLE), :meth:`UnixGrpcServer.stop` waits up to ``grace``
  seconds for them to finish, then cancels what is left, says GOAWAY on every connection and
  closes it -- grpclib's ``close()`` leaves idle client connections open (the grpclib
  internals this needs are :mod:`meshtrust.grpclib_compat`'s).

Handlers are given as grpclib handlers (``{"/pkg.Service/Method": grpclib.const.Handler}``),
written by hand: the generated stubs we could use (xds-protos's) are grpcio's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from grpclib.const import Handler
from grpclib.server import Stream

from meshtrust.agent.uds import PrivateSocket
from meshtrust.grpclib_compat import TrackingServer, abort, goaway_and_close

__all__ = ["GrpcMethod", "UnixGrpcServer"]

#: A method implementation: takes grpclib's server stream.
GrpcMethod = Callable[[Stream[Any, Any]], Coroutine[Any, Any, None]]

# How long closing connections may take to flush (GOAWAY, trailers) before they are aborted.
_CLOSE_TIMEOUT = 1.0


class _Service:
    """What grpclib's Server takes: an object with ``__mapping__()``."""

    def __init__(self, mapping: Mapping[str, Handler]) -> None:
        self._mapping = dict(mapping)

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


class UnixGrpcServer:
    """grpclib on the Unix socket ``socket``, serving ``methods``.

    ``await start()`` binds and serves (raises :class:`~meshtrust.errors.ConfigError` or
    :class:`~meshtrust.errors.AddressInUse` as :meth:`PrivateSocket.listen` does, leaving
    nothing behind). ``active_calls`` counts the calls in progress; ``stop`` drains them.
    """

    def __init__(self, methods: Mapping[str, Handler], socket: PrivateSocket) -> None:
        self._socket = socket
        self._methods = {
            path: Handler(self._tracked(h.func), h.cardinality, h.request_type, h.reply_type)
            for path, h in methods.items()
        }
        self._server: TrackingServer | None = None
        self.active_calls = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _tracked(self, func: GrpcMethod) -> GrpcMethod:
        async def call(stream: Stream[Any, Any]) -> None:
            self.active_calls += 1
            self._idle.clear()
            try:
                await func(stream)
            finally:
                self.active_calls -= 1
                if self.active_calls == 0:
                    # grpclib sends the trailers right after we return, in the same step
                    # (unless the peer stopped reading): before stop() wakes up.
                    self._idle.set()

        return call

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the server is already started")
        server = TrackingServer([_Service(self._methods)])
        sock = self._socket.listen()  # synchronous: the umask window holds no await
        try:
            await server.start(sock=sock)
        except BaseException:
            sock.close()
            self._socket.remove()
            raise
        self._server = server

    async def stop(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the calls in progress to finish (the owner has
        told them to), cancel the rest, close every connection, remove the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            if self.active_calls:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(grace, 0.0)):
                        await self._idle.wait()
            server.close()  # stop listening; cancel the handlers still running
            protocols = list(server.protocols)
            for protocol in protocols:
                goaway_and_close(protocol)
            if protocols:
                try:
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        while server.protocols:
                            await asyncio.sleep(0.01)
                except TimeoutError:
                    for protocol in list(server.protocols):
                        abort(protocol)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await server.wait_closed()
        finally:
            self._socket.remove()
