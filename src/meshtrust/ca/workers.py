"""Several CA worker processes on one port, one supervisor owning the ledger and metrics.

Theory of operation (the pre-fork model of gunicorn/nginx):

* The supervisor binds the listening socket once (no SO_REUSEPORT, so a *second* CA fails
  loudly) and forks N workers before it starts any thread. Each worker inherits the socket
  and runs the full gRPC + TLS + authentication + signing path on its own core.
* The ledger has one writer, the supervisor. A worker sends each issued record over its
  socketpair and answers the client only after the supervisor acknowledged the commit, so
  the durability promise of the single-process CA holds. Group commit then spans all
  workers: one fsync covers every record that arrived during the previous one. Records (and
  their acknowledgements) made in the same event-loop step travel as one message: one
  pickle and one write per step, not per certificate. A record travels as a plain tuple
  (pickling a slotted dataclass runs Python code per object on both ends), and the
  supervisor commits a worker's batch as one group with one acknowledgement message.
* Workers send metric events the same way (fire and forget); ``/metrics`` and ``/ready``
  are served by the supervisor from the one registry.
* SIGTERM/SIGINT to the supervisor: it tells every worker to drain and stop, waits, flushes
  the ledger, exits. A worker that sees its socketpair close (supervisor gone, even by
  SIGKILL) answers what is in flight and what still arrives UNAVAILABLE, and exits within
  a fraction of a second: without the ledger it must not issue anything, and an orphan
  must not keep the port.
* A worker that dies unexpectedly stops the whole CA with a non-zero exit, so the service
  manager (systemd, Kubernetes) restarts it whole; forking again from a threaded supervisor
  would be unsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field

from meshtrust.ca.assembly import (
    PreparedCa,
    build_authority,
    follow_signing_tls,
    open_books,
    run_loop,
    serve_until_stopped,
    start_federation,
    start_revocations,
    start_signing,
    start_status,
)
from meshtrust.ca.ledger import IssuedRecord, SqlLedger
from meshtrust.ca.metrics import CaEvent
from meshtrust.ca.readiness import Readiness, decide_readiness, probe_ledger
from meshtrust.ca.server import CaGrpcService
from meshtrust.clock import Clock
from meshtrust.errors import LedgerError

__all__ = ["SUPERVISOR_GONE_GRACE", "RemoteLedger", "RemoteMetrics", "run_supervisor"]

log = logging.getLogger("meshtrust.ca")
_HEADER = struct.Struct("!I")
#: How long a worker that lost its supervisor gives its in-flight requests to be answered
#: UNAVAILABLE before it exits (they fail at once; this is for their last writes).
SUPERVISOR_GONE_GRACE = 0.2
_RECORD_FIELDS = IssuedRecord.__slots__


def _record_to_wire(rec: IssuedRecord) -> tuple[object, ...]:
    return tuple([getattr(rec, name) for name in _RECORD_FIELDS])


def _send(writer: asyncio.StreamWriter, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(data)) + data)


async def _recv(reader: asyncio.StreamReader) -> object:
    header = await reader.readexactly(_HEADER.size)
    (length,) = _HEADER.unpack(header)
    # Both ends are this program, forked from one process: the pickle is trusted.
    return pickle.loads(await reader.readexactly(length))  # noqa: S301


class RemoteLedger:
    """Worker side of the ledger: records go to the supervisor, which commits them."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._next = 0
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._outbox_ids: list[int] = []
        self._outbox: list[tuple[object, ...]] = []
        self._gone: str | None = None  # why records can no longer be committed

    async def record(self, rec: IssuedRecord) -> None:
        """Return once the supervisor committed ``rec``; raises :class:`LedgerError` when it
        refused, or is gone (then at once: the answer is UNAVAILABLE, never a write to a
        closed socket, which raised RuntimeError in the handler and answered UNKNOWN)."""
        if self._gone is not None:
            raise LedgerError(self._gone)
        if self._writer.is_closing():
            raise LedgerError("the connection to the CA supervisor is closed")
        self._next += 1
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiting[self._next] = fut
        if not self._outbox:
            loop.call_soon(self._flush)  # after every handler of this step has added its own
        self._outbox_ids.append(self._next)
        self._outbox.append(_record_to_wire(rec))
        await fut

    def _flush(self) -> None:
        ids, batch = self._outbox_ids, self._outbox
        self._outbox_ids, self._outbox = [], []
        if batch and not self._writer.is_closing():
            _send(self._writer, ("recs", ids, batch))

    def resolve(self, msg_ids: list[int], error: str | None) -> None:
        """The supervisor's answer for the records ``msg_ids``: committed, or ``error``."""
        for msg_id in msg_ids:
            fut = self._waiting.pop(msg_id, None)
            if fut is not None and not fut.done():
                fut.set_result(None) if error is None else fut.set_exception(LedgerError(error))

    def fail_all(self, reason: str) -> None:
        """Fail every record waiting for an acknowledgement, and every later one."""
        self._gone = reason
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(LedgerError(reason))
        self._waiting.clear()


class RemoteMetrics:
    """Worker side of the metrics: counts locally, sends the counts every ``interval``.

    One message per interval instead of two per certificate: at thousands of certificates
    a second the per-event messages cost the supervisor more than the ledger does.
    """

    def __init__(self, writer: asyncio.StreamWriter, interval: float = 0.2) -> None:
        self._writer = writer
        self._interval = interval
        self._counts: dict[str, int] = {}

    def observe(self, event: CaEvent) -> None:
        self._counts[event.value] = self._counts.get(event.value, 0) + 1

    def flush(self) -> None:
        if self._counts and not self._writer.is_closing():
            counts, self._counts = self._counts, {}
            _send(self._writer, ("evs", counts))

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                self.flush()
        finally:
            self.flush()


async def _worker_main(
    prepared: PreparedCa, sock: socket.socket, ipc: socket.socket, clock: Clock, index: int
) -> None:

    reader, writer = await asyncio.open_connection(sock=ipc)
    ledger = RemoteLedger(writer)
    metrics = RemoteMetrics(writer)
    # Each worker follows revocations and the trust bundle in the ledger itself (the supervisor
    # writes certificates; the worker writes only the bundle versions its agents report).
    revocation_ledger = SqlLedger(prepared.ledger_url)
    signing = start_signing(prepared, revocation_ledger, clock)  # each worker follows slots
    revocations = start_revocations(prepared, revocation_ledger, clock, signing=signing.watch)
    authority = build_authority(prepared, clock, ledger, metrics, revocations.watch, signing.watch)
    service = CaGrpcService(authority)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides

    async def read_acks() -> None:
        try:
            while True:
                msg = await _recv(reader)
                assert isinstance(msg, tuple)
                if msg[0] == "acks":
                    ledger.resolve(msg[1], msg[2])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        # No ledger, no certificates: requests waiting for their record and any that come
        # now are answered UNAVAILABLE (another replica may serve them), then we exit,
        # without waiting for a drain: nothing here can succeed any more.
        ledger.fail_all("the CA supervisor is gone")
        service.accepting = False
        log.error("worker %d: supervisor gone; answering UNAVAILABLE and exiting", index)
        await service.drain(SUPERVISOR_GONE_GRACE)
        await asyncio.sleep(SUPERVISOR_GONE_GRACE)  # let the handlers' trailers go out
        os._exit(3)

    acks = asyncio.create_task(read_acks())
    flusher = asyncio.create_task(metrics.run())
    _send(writer, ("hello", index, os.getpid()))
    tls = prepared.ssl_context()
    follow_signing_tls(prepared, tls, signing.watch, clock)  # root rotation
    await serve_until_stopped(
        service,
        sock,
        tls,
        stop,
        prepared.config.drain_grace.total_seconds(),
        also=(revocations.service,),
    )
    await signing.aclose()
    await revocations.aclose()
    revocation_ledger.close()
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    await writer.drain()
    acks.cancel()
    writer.close()


@dataclass
class _Child:
    index: int
    pid: int
    ipc: socket.socket
    connected: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)


def run_supervisor(prepared: PreparedCa, sock: socket.socket, clock: Clock) -> None:
    """Fork ``config.workers`` workers on ``sock`` and supervise them (see module docs)."""
    children: list[tuple[int, int, socket.socket]] = []
    for index in range(prepared.config.workers):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # worker
            parent_end.close()
            for _, _, other in children:
                other.close()
            code = 0
            try:
                run_loop(_worker_main(prepared, sock, child_end, clock, index))
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child_end.close()
        children.append((index, pid, parent_end))
    sock.close()  # the supervisor itself serves no gRPC
    run_loop(_supervise(prepared, children, clock))


async def _supervise(
    prepared: PreparedCa, spawned: list[tuple[int, int, socket.socket]], clock: Clock
) -> None:
    config = prepared.config
    books = open_books(prepared)
    sql, ledger, registry, metrics = books.sql, books.ledger, books.registry, books.metrics
    children = [_Child(i, pid, s) for i, pid, s in spawned]
    stopping = asyncio.Event()
    failed = False

    def ready() -> Readiness:
        return decide_readiness(
            stopping=stopping.is_set(),
            workers_down=sum(not c.connected or c.exited.is_set() for c in children),
            ledger_failure=books.health.failure,
        )

    status = start_status(config, registry, ready)
    probe = asyncio.create_task(probe_ledger(books.health, sql, clock))
    # The bundle endpoint serves the CRLs too: the supervisor signs its own (the same
    # revocations and issuers as every worker's, from the ledger).
    endpoint = prepared.config.federation and prepared.config.federation.bundle_endpoint
    crl_side = None
    if endpoint:
        signing = start_signing(prepared, sql, clock)
        crl_side = (signing, start_revocations(prepared, sql, clock, signing=signing.watch))
    federation = await start_federation(
        prepared, clock, registry, crl_side[1].publisher if crl_side else None
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def commit(
        writer: asyncio.StreamWriter, ids: list[int], rows: list[tuple[object, ...]]
    ) -> None:
        # One group commit covers the batch (and whatever else arrives meanwhile).
        error: str | None = None
        try:
            await ledger.record_many([IssuedRecord(*row) for row in rows])  # type: ignore[arg-type]
        except LedgerError as exc:
            error = str(exc)
        if not writer.is_closing():
            _send(writer, ("acks", ids, error))

    async def serve_child(child: _Child) -> None:
        nonlocal failed
        reader, writer = await asyncio.open_connection(sock=child.ipc)
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                msg = await _recv(reader)
                assert isinstance(msg, tuple)
                if msg[0] == "recs":
                    task = asyncio.create_task(commit(writer, msg[1], msg[2]))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                elif msg[0] == "evs":
                    for name, count in msg[1].items():
                        metrics.observe(CaEvent(name), count)
                elif msg[0] == "hello":
                    child.connected = True
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        _, status_code = await loop.run_in_executor(None, os.waitpid, child.pid, 0)
        code = os.waitstatus_to_exitcode(status_code)
        child.exited.set()
        if not stopping.is_set():
            log.error(
                "worker %d (pid %d) exited unexpectedly (code %d); stopping the CA",
                child.index,
                child.pid,
                code,
            )
            failed = True
            stopping.set()
        writer.close()

    tasks = [asyncio.create_task(serve_child(c)) for c in children]
    books.started(prepared, clock, workers=len(children))
    await stopping.wait()
    for c in children:
        if not c.exited.is_set():
            try:
                os.kill(c.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    grace = config.drain_grace.total_seconds() + 5
    try:
        async with asyncio.timeout(grace):
            await asyncio.gather(*tasks)
    except TimeoutError:
        for c in children:
            if not c.exited.is_set():
                log.error("worker %d did not stop in %.0fs; killing it", c.index, grace)
                os.kill(c.pid, signal.SIGKILL)
        await asyncio.gather(*tasks, return_exceptions=True)
    probe.cancel()
    if federation is not None:
        await federation.aclose()
    if crl_side is not None:
        await crl_side[0].aclose()
        await crl_side[1].aclose()
    await ledger.aclose()
    sql.close()
    if status is not None:
        status.stop()
    log.info("CA stopped")
    if failed:
        raise SystemExit(1)
