"""The root nursery: wire the intake, the refresher and the lanes together.

The task tree of a running daemon::

    supervisor (root nursery)
    ├── intake          hypercorn serving the webhook app
    ├── token refresher renews tokens of installations with work
    ├── dispatcher      contains the lanes nursery, one child per installation
    ├── watchdog        sd_notify WATCHDOG=1 while the loop is healthy
    ├── startup         credentials check, journal recovery, missed deliveries
    ├── housekeeping    journal pruning and the sd_notify status line
    └── signals         SIGTERM/SIGINT shut down, SIGHUP reloads

A job's exception is caught by its lane, so nothing a job does cancels a
sibling. Shutdown stops the intake first, gives running jobs
``[queue] shutdown_grace`` seconds, leaves queued deliveries in the
journal, and then cancels the rest.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from collections.abc import Iterable, MutableMapping
from pathlib import Path

import trio
from quart_trio import QuartTrio

from daemon import routing
from daemon.config import Config, load_config
from daemon.delivery import Delivery
from daemon.errors import ConfigError, GhappdError, JournalError
from daemon.github.app import AppAuth, AppIdentity, load_private_key
from daemon.github.client import GitHubClient
from daemon.intake import Admission, IntakeSettings, Readiness, create_app, serve_intake
from daemon.jobs.execute import JobExecutor, JobSettings, config_folders
from daemon.jobs.workspace import WorkspaceRoot
from daemon.journal import (
    Journal,
    MemoryJournal,
    RecordOutcome,
    RecordResult,
    SqliteJournal,
)
from daemon.lanes import Dispatcher
from daemon.listen import prepare_binds, set_close_on_exec
from daemon.notify import Notifier
from daemon.redeliver import redeliver_missed
from daemon.routing import JobSpec

__all__ = ["Daemon", "open_journal"]

log = logging.getLogger(__name__)

SECONDS = 1.0
MINUTES = 60 * SECONDS
_PRUNE_INTERVAL = 60 * MINUTES
_STATUS_INTERVAL = 10 * SECONDS
_CREDENTIALS_RETRY_MAX = 5 * MINUTES
# Seconds before the first journal failure that a redelivery scan covers.
_REDELIVER_SLACK = 1 * MINUTES


def open_journal(config: Config) -> Journal:
    """Return the journal the configuration selects (not opened yet)."""
    if config.journal.enabled:
        return SqliteJournal(path=config.journal.path, max_size=config.journal.max_size)
    return MemoryJournal(max_size=config.journal.max_size)


class _Sink:
    """The intake's sink: journal first, then the dispatcher.

    Until the journal's unfinished deliveries have been dispatched at
    startup, new ones are held back in ``held``, so every installation's
    deliveries reach its lane in the order they were accepted.

    The lanes require deliveries in ``seq`` order: a lane skips one whose
    ``seq`` is below one it already ran. Concurrent ``record`` calls
    return in any order, because trio wakes the tasks of one group commit
    in an arbitrary order, so each call takes a ticket before it records
    and the dispatcher receives results in ticket order. Tickets follow
    seq order because :class:`SqliteJournal` assigns seqs in the order its
    calls were made (one FIFO queue to its writer thread), and calls to
    any other journal are serialized by a lock.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.held: list[tuple[int, Delivery]] | None = []
        self._tickets = itertools.count()
        self._next_release = 0
        self._recorded: dict[int, tuple[int, Delivery] | None] = {}
        self._record_lock = trio.Lock()
        # When recording first failed, while the journal keeps failing.
        self.failed_since: float | None = None

    async def admit(self, delivery: Delivery) -> Admission:
        daemon = self._daemon
        if not daemon.config.journal.enabled:
            queued = daemon.dispatcher.statistics().queued_deliveries
            if queued >= daemon.config.queue.intake_capacity:
                log.warning(
                    "delivery %s rejected: %d deliveries queued in memory",
                    delivery.id,
                    queued,
                )
                return Admission.FULL
        # Shielded: once the journal has the delivery it must also reach
        # the dispatcher, even if GitHub hangs up while the commit runs.
        with trio.CancelScope(shield=True):
            ticket = next(self._tickets)
            accepted: tuple[int, Delivery] | None = None
            try:
                result = await self._record(delivery)
                if result.outcome is RecordOutcome.NEW:
                    daemon.executor.reporter.fresh.add(delivery.id)
                if result.accepted:
                    accepted = (result.seq, delivery)
            except JournalError as exc:
                # The intake responds 503 "delivery not recorded". GitHub does
                # not send it again by itself, so once the journal works
                # again the failed deliveries are asked for again.
                log.error("delivery %s not recorded: %s", delivery.id, exc)
                if self.failed_since is None:
                    self.failed_since = time.time()
                raise
            finally:
                self._release(ticket, accepted)
        if self.failed_since is not None:
            since, self.failed_since = self.failed_since, None
            log.info("journal writable again; asking for deliveries it missed")
            daemon.redeliver_later(since)
        if not result.accepted:
            return Admission.DUPLICATE
        if result.outcome is RecordOutcome.RERUN:
            log.info("delivery %s redelivered after it finished: rerun", delivery.id)
        return Admission.ACCEPTED

    async def _record(self, delivery: Delivery) -> RecordResult:
        journal = self._daemon.journal
        if isinstance(journal, SqliteJournal):
            return await journal.record(delivery)
        async with self._record_lock:
            return await journal.record(delivery)

    def _release(self, ticket: int, accepted: tuple[int, Delivery] | None) -> None:
        """Dispatch every recorded delivery whose earlier tickets are done."""
        self._recorded[ticket] = accepted
        while self._next_release in self._recorded:
            item = self._recorded.pop(self._next_release)
            self._next_release += 1
            if item is None:
                continue
            if self.held is not None:
                self.held.append(item)
            else:
                self._daemon.dispatcher.submit(*item)


class Daemon:
    """One running ghappd: configuration, journal, GitHub client and tasks.

    :meth:`reload` reads ``config.path`` again. ``environ`` supplies the
    systemd variables (``LISTEN_FDS``, ``NOTIFY_SOCKET``, ...) and defaults
    to :data:`os.environ`. Raises :class:`~daemon.errors.KeyFormatError`
    when the App's private key cannot be used.
    """

    def __init__(
        self,
        config: Config,
        *,
        environ: MutableMapping[str, str] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self._environ = os.environ if environ is None else environ
        self.notifier = notifier or Notifier.from_environ(self._environ)
        self.readiness = Readiness()
        self.identity: AppIdentity | None = None
        self.journal = open_journal(config)
        self.workspaces = WorkspaceRoot(root=config.workspaces.root)
        key = load_private_key(
            config.app.private_key.reveal(), source=str(config.app.private_key_file)
        )
        self.auth = AppAuth(
            app_id=config.app.id, private_key=key, client_id=config.app.client_id
        )
        self.client = GitHubClient(
            api_url=config.app.api_url,
            app=self.auth,
            max_concurrent_requests=config.github.max_concurrent_requests,
            max_rate_limit_wait=config.github.max_rate_limit_wait,
            max_attempts=config.github.max_retries + 1,
            timeout=config.github.request_timeout,
        )
        self.limiter = trio.CapacityLimiter(config.queue.max_concurrent_jobs)
        self.executor = JobExecutor(
            client=self.client,
            journal=self.journal,
            workspaces=self.workspaces,
            settings=self._job_settings,
        )
        self.dispatcher = Dispatcher(
            journal=self.journal,
            executor=self.executor,
            plan=self.plan,
            limiter=self.limiter,
            lane_capacity=config.queue.lane_capacity,
            on_installation_event=self._installation_event,
        )
        self._sink = _Sink(self)
        self._intake_stopped = trio.Event()
        self._shutdown_started = False
        self._dispatcher_done = trio.Event()
        self._root: trio.Nursery | None = None
        self.urls: list[str] = []

    # -- what the parts read ----------------------------------------------

    def _job_settings(self) -> JobSettings:
        return JobSettings(
            api_url=self.config.app.api_url,
            git_url=self.config.app.git_url,
            runner=self.config.runner,
            hidden_paths=config_folders(self.config),
        )

    def _intake_settings(self) -> IntakeSettings:
        return IntakeSettings(
            webhook_path=self.config.server.webhook_path,
            max_body_size=self.config.server.max_body_size,
            max_concurrent_deliveries=self.config.server.max_concurrent_deliveries,
            secrets=tuple(s.reveal() for s in self.config.app.webhook_secrets),
        )

    def plan(self, delivery: Delivery) -> tuple[JobSpec, ...]:
        """Route ``delivery`` with the current rules and the App's slug."""
        slug = self.identity.slug if self.identity else None
        result = routing.route(delivery, self.config.jobs, app_slug=slug)
        for reason in result.reasons:
            log.info("delivery %s: rule not applied: %s", delivery.id, reason)
        return result.jobs

    def secrets(self) -> Iterable[str]:
        """Return every secret value the daemon holds, for log redaction."""
        for secret in self.config.app.webhook_secrets:
            yield secret.reveal().decode("utf-8", "replace")
        yield from self.client.tokens.secrets()

    def _installation_event(self, delivery: Delivery) -> None:
        installation_id = delivery.installation_id
        if installation_id is None:
            return
        action = delivery.action
        if action in ("deleted", "suspend", "new_permissions_accepted"):
            log.info(
                "installation %s %s: cached tokens dropped", installation_id, action
            )
            self.client.tokens.forget(installation_id, suspended=action == "suspend")
        elif action == "unsuspend":
            log.info("installation %s unsuspended", installation_id)
            self.client.tokens.unsuspended(installation_id)

    # -- running ----------------------------------------------------------

    async def run(
        self,
        *,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until :meth:`shutdown` (or SIGTERM/SIGINT with ``handle_signals``).

        ``task_status.started()`` gets the intake's bound URLs. Raises
        :class:`~daemon.errors.GhappdError` for a startup failure (journal,
        workspace root, listen addresses); returns after a clean stop.
        """
        config = self.config
        binds, inherited = prepare_binds(
            list(config.server.listen), environ=self._environ
        )
        log.info(
            "ghappd starting: App %s, job rules: %d", config.app.id, len(config.jobs)
        )

        async with self.client, self.journal, self.workspaces:
            stats = await self.journal.stats()
            log.info(
                "journal %s: %d bytes, %d queued, %d running, %d finished",
                config.journal.path if config.journal.enabled else "(memory)",
                stats.size_bytes,
                stats.queued,
                stats.running,
                stats.finished,
            )
            self.readiness.set("config_loaded")
            app = create_app(
                settings=self._intake_settings,
                sink=self._sink,
                readiness=self.readiness,
            )
            async with trio.open_nursery() as root:
                self._root = root
                if handle_signals:
                    await root.start(self._handle_signals)
                await root.start(self._run_dispatcher)
                self.urls = await self._start_intake(root, app, binds)
                set_close_on_exec(inherited.fds)
                await root.start(
                    lambda task_status: self.client.tokens.run_refresher(
                        active=self._active_installations, task_status=task_status
                    )
                )
                await root.start(self.notifier.run_watchdog)
                root.start_soon(self._startup)
                root.start_soon(self._housekeeping)
                task_status.started(self.urls)
        log.info("ghappd stopped")

    async def _start_intake(
        self, root: trio.Nursery, app: QuartTrio, binds: list[str]
    ) -> list[str]:
        """Start the intake in ``root``; return its URLs.

        Raise :class:`~daemon.errors.ConfigError` naming the addresses when
        a socket cannot be bound (hypercorn's OSError arrives wrapped in
        exception groups).
        """
        try:
            urls: list[str] = await root.start(
                lambda task_status: serve_intake(
                    app,
                    binds=binds,
                    shutdown_trigger=self._intake_stopped.wait,
                    readiness=self.readiness,
                    task_status=task_status,
                )
            )
        except (OSError, BaseExceptionGroup) as exc:
            error = _only_os_error(exc)
            if error is None:
                raise
            raise ConfigError(
                [
                    f"[server] listen: listening on {', '.join(binds)} failed"
                    f" ({error.strerror or error}); free the address or choose"
                    " another one"
                ]
            ) from exc
        return urls

    def _active_installations(self) -> Iterable[int]:
        return list(self.dispatcher.lanes)

    async def _run_dispatcher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self.dispatcher.run(task_status=task_status)
        finally:
            self._dispatcher_done.set()

    async def _startup(self) -> None:
        """Check the credentials, then dispatch what the journal holds."""
        self.identity = await self._verify_credentials()
        self.readiness.set("credentials_accepted")

        entries = await self.journal.unfinished()
        held = self._sink.held or []
        seen = {entry.seq for entry in entries}
        backlog = [(entry.seq, entry.delivery) for entry in entries]
        backlog += [(seq, d) for seq, d in held if seq not in seen]
        backlog.sort(key=lambda item: item[0])
        # From here on the sink hands deliveries straight to the dispatcher;
        # no checkpoint lies between this and dispatching the backlog.
        self._sink.held = None
        for seq, delivery in backlog:
            self.dispatcher.submit(seq, delivery)
        if entries:
            log.info(
                "recovered %d unfinished deliveries from the journal", len(entries)
            )

        await self.notifier.ready()
        log.info("ghappd ready on %s", ", ".join(self.urls))

        if self.config.journal.enabled and self.config.journal.redeliver_missed:
            try:
                await redeliver_missed(
                    client=self.client,
                    journal=self.journal,
                    window=self.config.journal.redeliver_window,
                )
            except GhappdError as exc:
                log.warning("missed deliveries not checked: %s", exc)

    def redeliver_later(self, since: float) -> None:
        """Ask GitHub, in the background, for failed deliveries after ``since``."""
        if self._root is None or not self.config.journal.redeliver_missed:
            return
        self._root.start_soon(self._redeliver, since)

    async def _redeliver(self, since: float) -> None:
        try:
            await redeliver_missed(
                client=self.client,
                journal=self.journal,
                window=self.config.journal.redeliver_window,
                since=since - _REDELIVER_SLACK,
            )
        except GhappdError as exc:
            log.warning("missed deliveries not checked: %s", exc)

    async def _verify_credentials(self) -> AppIdentity:
        delay = 1 * SECONDS
        while True:
            try:
                return await self.client.verify_app()
            except GhappdError as exc:
                self.readiness.fail("credentials_accepted", str(exc))
                log.error("GitHub App check failed, retrying in %.0f s: %s", delay, exc)
            await trio.sleep(delay)
            delay = min(delay * 2, _CREDENTIALS_RETRY_MAX)

    async def _housekeeping(self) -> None:
        next_prune = trio.current_time()
        last_status = ""
        while True:
            stats = self.dispatcher.statistics()
            status = (
                f"{stats.lanes} lanes, {stats.running_jobs} jobs running,"
                f" {stats.queued_deliveries} deliveries queued"
            )
            if not self.readiness.ready:
                status += "; not ready: " + ", ".join(self.readiness.unmet())
            if status != last_status:
                await self.notifier.status(status)
                last_status = status
            if trio.current_time() >= next_prune:
                next_prune = trio.current_time() + _PRUNE_INTERVAL
                try:
                    result = await self.journal.prune(
                        older_than=self.config.journal.retention
                    )
                    log.info(
                        "journal pruned: %d expired, %d evicted, %d bytes",
                        result.expired,
                        result.evicted,
                        result.size_bytes,
                    )
                except JournalError as exc:
                    log.error("journal pruning failed: %s", exc)
            await trio.sleep(_STATUS_INTERVAL)

    async def _handle_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP
        ) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self.shutdown()

    # -- control ----------------------------------------------------------

    def shutdown(self) -> None:
        """Start a clean stop: intake first, then the lanes, then the rest."""
        if self._shutdown_started or self._root is None:
            return
        self._shutdown_started = True
        self._root.start_soon(self._shutdown)

    async def _shutdown(self) -> None:
        grace = self.config.queue.shutdown_grace
        log.info("shutting down: running jobs get %.0f s", grace)
        await self.notifier.stopping()
        self._intake_stopped.set()
        self.dispatcher.stop(grace=grace)
        await self._dispatcher_done.wait()
        if not self.config.journal.enabled:
            queued = self.dispatcher.statistics().queued_deliveries
            if queued:
                log.warning(
                    "%d queued deliveries are lost: the journal is disabled", queued
                )
        assert self._root is not None
        self._root.cancel_scope.cancel()

    async def reload(self, path: Path | None = None) -> bool:
        """Load the configuration file again; keep the old one if it is invalid.

        New rules, secrets and limits apply to deliveries from now on;
        running jobs finish under the rules they started with. Settings that
        need a restart (listen addresses, journal, workspace root) are
        logged when they change and otherwise ignored.
        """
        path = path or self.config.path
        await self.notifier.reloading()
        try:
            new = await trio.to_thread.run_sync(load_config, path)
        except ConfigError as exc:
            for error in exc.errors:
                log.error("reload rejected: %s", error)
            await self._reloaded()
            return False
        for name in ("server", "journal", "workspaces"):
            old_value, new_value = getattr(self.config, name), getattr(new, name)
            if name == "server":
                old_value, new_value = old_value.listen, new_value.listen
            if old_value != new_value:
                log.warning("reload: [%s] changes take effect after a restart", name)
        self.config = new
        self.limiter.total_tokens = new.queue.max_concurrent_jobs
        self.dispatcher.lane_capacity = new.queue.lane_capacity
        log.info("configuration reloaded from %s: job rules: %d", path, len(new.jobs))
        await self._reloaded()
        return True

    async def _reloaded(self) -> None:
        # READY=1 ends the reload for systemd. Before the App's credentials
        # were accepted the daemon was never ready, and startup sends it.
        if self.identity is not None:
            await self.notifier.ready()


def _only_os_error(error: BaseException) -> OSError | None:
    """Return the OSError that ``error`` is or that nested groups wrap alone."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, OSError) else None
