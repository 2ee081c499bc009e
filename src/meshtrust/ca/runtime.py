"""Running the CA until told to stop: one process by default for one worker; with
``workers > 1`` a supervisor forks workers that share the listening socket
(:mod:`meshtrust.ca.workers`). The pieces are :mod:`meshtrust.ca.assembly`'s.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from meshtrust.ca.assembly import (
    PreparedCa,
    build_authority,
    follow_signing_tls,
    open_books,
    prepare_ca,
    run_loop,
    serve_until_stopped,
    start_federation,
    start_revocations,
    start_signing,
    start_status,
)
from meshtrust.ca.config import CaServeConfig
from meshtrust.ca.ledger import SqlLedger
from meshtrust.ca.readiness import decide_readiness, probe_ledger
from meshtrust.ca.server import CaGrpcService, bind_listener
from meshtrust.ca.workers import run_supervisor
from meshtrust.clock import Clock, SystemClock
from meshtrust.config import parse_host_port

__all__ = ["run_ca", "serve_in_process"]

log = logging.getLogger("meshtrust.ca")


async def serve_in_process(prepared: PreparedCa, sock: socket.socket, clock: Clock) -> None:
    """The single-process CA: gRPC, ledger and metrics in this process, until SIGTERM/SIGINT."""
    config = prepared.config
    books = open_books(prepared)
    sql, ledger, registry, metrics = books.sql, books.ledger, books.registry, books.metrics
    signing = start_signing(prepared, sql, clock)
    revocations = start_revocations(prepared, sql, clock, signing=signing.watch)
    authority = build_authority(prepared, clock, ledger, metrics, revocations.watch, signing.watch)
    service = CaGrpcService(authority)
    stop = asyncio.Event()
    status = start_status(
        config,
        registry,
        lambda: decide_readiness(
            stopping=not service.accepting, ledger_failure=books.health.failure
        ),
    )
    probe = asyncio.create_task(probe_ledger(books.health, sql, clock))
    federation = await start_federation(prepared, clock, registry, revocations.publisher)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    books.started(prepared, clock, workers=1)
    try:
        tls = prepared.ssl_context()
        follow_signing_tls(prepared, tls, signing.watch, clock)  # root rotation
        await serve_until_stopped(
            service,
            sock,
            tls,
            stop,
            config.drain_grace.total_seconds(),
            also=(revocations.service,),
        )
    finally:
        probe.cancel()
        await signing.aclose()
        if federation is not None:
            await federation.aclose()
        await revocations.aclose()
        await ledger.aclose()
        sql.close()
        if status is not None:
            status.stop()
    log.info("CA stopped")


def run_ca(config: CaServeConfig, clock: Clock | None = None) -> None:
    """Run the CA described by ``config`` until SIGTERM/SIGINT. Raises MeshTrustError."""
    clock = clock or SystemClock()
    prepared = prepare_ca(config, clock)
    if config.federation is not None:
        from meshtrust.ca.federation import check_bootstrap_bundles

        check_bootstrap_bundles(config.federation)
    SqlLedger(prepared.ledger_url).close()  # fail before binding if the ledger is unusable
    host, port = parse_host_port(config.listen, what="--listen")
    sock = bind_listener(host, port, what="--listen")
    if config.workers > 1:
        run_supervisor(prepared, sock, clock)
        return
    run_loop(serve_in_process(prepared, sock, clock))
