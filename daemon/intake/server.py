"""Serving the intake app with hypercorn's trio worker."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

from daemon.intake.readiness import Readiness

__all__ = ["serve_intake"]

log = logging.getLogger(__name__)

SECONDS = 1.0
# Connections the kernel queues before the daemon accepts them; the same
# as Backlog= in systemd/ghappd.socket.
LISTEN_BACKLOG = 1024

# A logger of the daemon's own, so a handler that another hypercorn server in
# the process adds to "hypercorn.error" (its default) does not apply here.
HYPERCORN_LOGGER = "daemon.intake.hypercorn"


async def serve_intake(
    app: QuartTrio,
    *,
    binds: Sequence[str],
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    readiness: Readiness | None = None,
    graceful_timeout: float = 3 * SECONDS,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``binds`` until cancelled or ``shutdown_trigger`` returns.

    ``binds`` takes hypercorn's forms: ``"127.0.0.1:8080"``, ``"[::1]:0"``,
    ``"unix:/path"`` and ``"fd://3"`` for a socket passed by systemd. Once
    every socket listens, ``task_status.started()`` receives the bound URLs
    (``["http://127.0.0.1:43117"]``), and ``listener_bound`` is set on
    ``readiness`` if one is given. When ``shutdown_trigger`` returns, new
    connections are refused and requests in flight get ``graceful_timeout``
    seconds to finish. Cancellation stops the server at once. An address
    that cannot be bound raises OSError before ``started()`` is called.

    Hypercorn's access log is off, because the intake logs each delivery
    itself. Its error log goes to the stdlib logger
    ``daemon.intake.hypercorn``, with no handler of its own, so its records
    reach whatever handlers the daemon installs.
    """
    if not binds:
        raise ValueError("binds is empty; give at least one address to listen on")

    config = Config()
    config.bind = list(binds)
    # hypercorn calls listen() again on every socket, inherited ones too,
    # with its own backlog (100 by default); keep the socket unit's.
    config.backlog = LISTEN_BACKLOG
    config.accesslog = None
    config.errorlog = logging.getLogger(HYPERCORN_LOGGER)
    config.graceful_timeout = graceful_timeout

    async def _serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(
            app,
            config,
            shutdown_trigger=shutdown_trigger,
            task_status=task_status,
            mode="asgi",
        )

    log.info("intake starting on %s", ", ".join(binds))
    try:
        async with trio.open_nursery() as nursery:
            urls: list[str] = await nursery.start(_serve)
            if readiness is not None:
                readiness.set("listener_bound")
            log.info("intake listening on %s", ", ".join(urls))
            task_status.started(urls)
    finally:
        if readiness is not None:
            readiness.fail("listener_bound", "the intake has stopped")
        log.info("intake stopped")
