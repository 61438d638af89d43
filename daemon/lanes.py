"""Per-installation lanes and the dispatcher that feeds them.

Each installation with work gets a lane: a memory channel and a child
nursery whose one task runs the lane's jobs one at a time, in the order
their deliveries were accepted. Lanes of different installations run side
by side under one shared :class:`trio.CapacityLimiter`.

A lane exists only while it has work. When its channel is empty after a
job, the lane removes itself from the dispatcher's map and returns, with
no checkpoint between the emptiness check and the removal, so the
dispatcher never sends to a lane that is closing: a delivery that arrives
a moment later starts a new lane.

A full lane channel loses nothing. The delivery is already in the journal,
so the dispatcher marks the lane as overflowing and the lane reads the
overflow from the journal, in sequence order, before it closes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from daemon import context
from daemon.delivery import Delivery
from daemon.journal import Journal
from daemon.routing import JobSpec

__all__ = ["Dispatcher", "Executor", "Lane", "LaneItem", "LaneStatistics"]

log = logging.getLogger(__name__)

# Deliveries read from the journal per query when a lane has overflowed.
_OVERFLOW_PAGE = 100


class Executor(Protocol):
    """Runs and reports jobs; implemented by :mod:`daemon.jobs.execute`."""

    async def queued(self, job: JobSpec, *, ahead: int) -> None:
        """Report ``job`` as queued with ``ahead`` jobs before it."""
        ...

    async def run(self, job: JobSpec) -> None:
        """Run ``job`` and report its outcome; raise only on cancellation."""
        ...

    async def skipped(self, job: JobSpec, *, reason: str) -> None:
        """Report that ``job`` will not run, and why."""
        ...

    async def cancelled(self, job: JobSpec, *, reason: str) -> None:
        """Report that ``job`` was cancelled, and why."""
        ...

    async def failed(self, job: JobSpec, *, error: BaseException) -> None:
        """Report that running ``job`` raised ``error`` unexpectedly."""
        ...

    async def interrupted(self, job: JobSpec) -> None:
        """Report that shutdown stopped ``job``; it runs again after a restart."""
        ...


@dataclass(frozen=True, slots=True)
class LaneItem:
    """An accepted delivery and the jobs routed from it."""

    seq: int
    delivery: Delivery
    jobs: tuple[JobSpec, ...]


@dataclass(frozen=True, slots=True)
class LaneStatistics:
    lanes: int
    running_jobs: int
    queued_deliveries: int


@dataclass(slots=True)
class _Latest:
    seq: int
    sha: str | None
    delivery_id: str


class Lane:
    """The queue and the job task of one installation."""

    def __init__(
        self,
        *,
        installation_id: int,
        dispatcher: Dispatcher,
        capacity: int,
    ) -> None:
        self.installation_id = installation_id
        self._dispatcher = dispatcher
        self._send, self._receive = trio.open_memory_channel[LaneItem](capacity)
        self.overflowing = False
        self.queued = 0
        self.jobs_run = 0
        self.running: JobSpec | None = None
        self._last_seq = 0
        self._job_scope: trio.CancelScope | None = None
        self._running_seq = 0
        self._cancel_reason: str | None = None
        self._cancel_seq = 0
        self._stopping = False

    def offer(self, item: LaneItem) -> None:
        """Queue ``item`` without blocking; overflow goes to the journal."""
        self.queued += 1
        if self.overflowing:
            return
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            log.info(
                "lane %s is full; delivery %s waits in the journal",
                self.installation_id,
                item.delivery.id,
            )
            self.overflowing = True

    def cancel(self, reason: str, *, up_to_seq: int) -> None:
        """Cancel the running job and the queued ones, reporting each.

        Only deliveries with a sequence number up to ``up_to_seq`` (those
        accepted before the event that cancels them) are cancelled; later
        ones run as usual.
        """
        self._cancel_reason = reason
        self._cancel_seq = max(self._cancel_seq, up_to_seq)
        if self._job_scope is not None and self._running_seq <= up_to_seq:
            self._job_scope.cancel()

    def _cancelled(self, seq: int) -> bool:
        return self._cancel_reason is not None and seq <= self._cancel_seq

    def stop(self, *, grace: float) -> None:
        """Start no further job; give the running one ``grace`` seconds."""
        self._stopping = True
        if self._job_scope is not None:
            self._job_scope.deadline = min(
                self._job_scope.deadline, trio.current_time() + grace
            )

    async def run(self) -> None:
        """Run queued deliveries until the channel is empty, then close.

        Returns when the lane has removed itself from the dispatcher's map.
        On shutdown it returns after the running job, leaving the queued
        deliveries in the journal. An exception of a delivery (its journal
        updates or reports) is logged and the lane goes on with the next
        one, so nothing a job does reaches the lanes nursery.
        """
        with context.bind(installation_id=self.installation_id):
            log.info("lane %s started", self.installation_id)
            while not self._stopping:
                item = self._next_item()
                if item is None:
                    if self.overflowing:
                        await self._read_overflow()
                        continue
                    # No checkpoint between the emptiness check above and
                    # the removal, so no delivery is sent to a closed lane.
                    self._dispatcher._lane_closed(self)
                    log.info(
                        "lane %s closed; jobs run: %d",
                        self.installation_id,
                        self.jobs_run,
                    )
                    return
                await self._process_logged(item)
            log.info(
                "lane %s stopped with %d deliveries left queued",
                self.installation_id,
                self.queued,
            )

    def _next_item(self) -> LaneItem | None:
        while True:
            try:
                item = self._receive.receive_nowait()
            except trio.WouldBlock:
                return None
            if item.seq > self._last_seq:
                return item
            # Already read from the journal while the lane overflowed.

    async def _read_overflow(self) -> None:
        journal = self._dispatcher.journal
        entries = await journal.pending(
            self.installation_id, after_seq=self._last_seq, limit=_OVERFLOW_PAGE
        )
        if len(entries) < _OVERFLOW_PAGE:
            # New deliveries go to the channel again from here on. One more
            # query finds those committed while the last one ran; any of
            # them also sent to the channel is skipped there by its seq.
            self.overflowing = False
            after = entries[-1].seq if entries else self._last_seq
            while True:
                more = await journal.pending(
                    self.installation_id, after_seq=after, limit=_OVERFLOW_PAGE
                )
                entries += more
                if len(more) < _OVERFLOW_PAGE:
                    break
                after = more[-1].seq
        for entry in entries:
            if self._stopping:
                return
            if entry.seq <= self._last_seq:
                continue
            try:
                jobs = self._dispatcher.plan(entry.delivery)
            except Exception:
                log.exception(
                    "delivery %s could not be routed again", entry.delivery.id
                )
                continue
            await self._process_logged(LaneItem(entry.seq, entry.delivery, jobs))

    async def _process_logged(self, item: LaneItem) -> None:
        try:
            await self._process(item)
        except Exception:
            log.exception(
                "delivery %s failed in lane %s; the lane goes on",
                item.delivery.id,
                self.installation_id,
            )

    async def _process(self, item: LaneItem) -> None:
        self._last_seq = max(self._last_seq, item.seq)
        self.queued = max(0, self.queued - 1)
        delivery = item.delivery
        journal = self._dispatcher.journal
        with context.bind(delivery_id=delivery.id, event=delivery.event):
            await journal.mark_running(delivery.id)
            for job in item.jobs:
                if self._stopping or not await self._run_job(item.seq, job):
                    # Left queued in the journal: it runs after a restart.
                    return
            await journal.mark_finished(delivery.id)

    async def _run_job(self, seq: int, job: JobSpec) -> bool:
        """Run or report ``job``; return False if shutdown left it to run later."""
        executor = self._dispatcher.executor
        with context.bind(job=job.name, repository=job.repository):
            await self._dispatcher._queued_report_done(job)
            if self._cancelled(seq):
                await self._report_cancelled(job)
                return True
            reason = self._dispatcher._stale_reason(job, seq)
            if reason is not None:
                log.info("job %s skipped: %s", job.external_id, reason)
                await executor.skipped(job, reason=reason)
                return True

            async with self._dispatcher.limiter:
                # Waiting for capacity is a checkpoint: the lane may have
                # been cancelled or stopped meanwhile.
                if self._stopping:
                    return False
                if self._cancelled(seq):
                    await self._report_cancelled(job)
                    return True
                self.running = job
                self._running_seq = seq
                self._job_scope = trio.CancelScope()
                with self._job_scope:
                    try:
                        await executor.run(job)
                    except Exception as exc:
                        log.exception("job %s raised", job.external_id)
                        with trio.CancelScope(shield=True):
                            await self._report_failed(job, exc)
                scope, self._job_scope, self.running = self._job_scope, None, None
                self.jobs_run += 1

            if scope.cancelled_caught:
                if self._cancelled(seq):
                    await self._report_cancelled(job)
                    return True
                with trio.CancelScope(shield=True):
                    await executor.interrupted(job)
                self._stopping = True
                return False
            self._dispatcher._job_done(job, seq)
            return True

    async def _report_cancelled(self, job: JobSpec) -> None:
        assert self._cancel_reason is not None
        log.info("job %s cancelled: %s", job.external_id, self._cancel_reason)
        with trio.CancelScope(shield=True):
            await self._dispatcher.executor.cancelled(job, reason=self._cancel_reason)

    async def _report_failed(self, job: JobSpec, error: Exception) -> None:
        try:
            await self._dispatcher.executor.failed(job, error=error)
        except Exception:
            log.exception("reporting job %s as failed raised", job.external_id)


class Dispatcher:
    """Route accepted deliveries to lanes; owns the lanes nursery.

    ``plan`` turns a delivery into its jobs (the router with the current
    rules). :meth:`submit` is synchronous and never blocks, so the intake
    can call it after the journal commit and respond at once.
    """

    def __init__(
        self,
        *,
        journal: Journal,
        executor: Executor,
        plan: Callable[[Delivery], tuple[JobSpec, ...]],
        limiter: trio.CapacityLimiter,
        lane_capacity: int,
        on_installation_event: Callable[[Delivery], None] | None = None,
    ) -> None:
        self.journal = journal
        self.executor = executor
        self.plan = plan
        self.limiter = limiter
        self.lane_capacity = lane_capacity
        self.lanes: dict[int, Lane] = {}
        self._on_installation_event = on_installation_event
        self._nursery: trio.Nursery | None = None
        self._reports: trio.Nursery | None = None
        self._latest: dict[tuple[str, int, str], _Latest] = {}
        # One event per job whose queued report is under way, by external id.
        self._queued_reports: dict[str, trio.Event] = {}
        self._stopping = False
        self._stopped = trio.Event()
        self.lanes_started = 0

    def statistics(self) -> LaneStatistics:
        return LaneStatistics(
            lanes=len(self.lanes),
            running_jobs=sum(1 for lane in self.lanes.values() if lane.running),
            queued_deliveries=sum(lane.queued for lane in self.lanes.values()),
        )

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the lanes nursery until :meth:`stop` and every lane returned."""
        async with trio.open_nursery() as reports:
            self._reports = reports
            async with trio.open_nursery() as lanes:
                self._nursery = lanes
                task_status.started()
                log.info("dispatcher started")
                await self._stopped.wait()
            self._nursery = None
            reports.cancel_scope.cancel()
        log.info("dispatcher stopped")

    def stop(self, *, grace: float) -> None:
        """Stop every lane after its running job, with ``grace`` seconds for it."""
        self._stopping = True
        for lane in self.lanes.values():
            lane.stop(grace=grace)
        self._stopped.set()

    def submit(self, seq: int, delivery: Delivery) -> None:
        """Route an accepted, journalled delivery to its installation's lane."""
        if self._nursery is None or self._stopping:
            # Not running: the delivery stays queued in the journal.
            log.info("delivery %s left queued: dispatcher not running", delivery.id)
            return
        if delivery.event == "installation" and self._on_installation_event:
            self._on_installation_event(delivery)
        if delivery.event == "installation" and delivery.action in (
            "deleted",
            "suspend",
        ):
            assert delivery.installation_id is not None
            lane = self.lanes.get(delivery.installation_id)
            if lane is not None:
                what = "uninstalled" if delivery.action == "deleted" else "suspended"
                reason = f"the App was {what} on this account"
                log.info("cancelling lane %s: %s", lane.installation_id, reason)
                lane.cancel(reason, up_to_seq=seq)

        jobs = self.plan(delivery)
        installation_id = delivery.installation_id
        if not jobs or installation_id is None:
            self._finish_later(delivery.id)
            return

        lane = self.lanes.get(installation_id)
        if lane is None:
            lane = Lane(
                installation_id=installation_id,
                dispatcher=self,
                capacity=self.lane_capacity,
            )
            self.lanes[installation_id] = lane
            self.lanes_started += 1
            self._nursery.start_soon(lane.run, name=f"lane {installation_id}")
        ahead = lane.queued + (1 if lane.running else 0)
        for job in jobs:
            key = job.supersede_key
            if key is not None:
                self._latest[key] = _Latest(seq, job.sha, delivery.id)
            assert self._reports is not None
            done = self._queued_reports.setdefault(job.external_id, trio.Event())
            self._reports.start_soon(self._report_queued, job, ahead, done)
        lane.offer(LaneItem(seq, delivery, jobs))

    async def _queued_report_done(self, job: JobSpec) -> None:
        """Wait until the job's queued report, if one is under way, has ended.

        The queued report runs in its own task, so without this wait a job
        that ends at once could be completed on GitHub first, and the
        queued report would then turn the completed check run back.
        """
        done = self._queued_reports.pop(job.external_id, None)
        if done is not None:
            await done.wait()

    async def _report_queued(self, job: JobSpec, ahead: int, done: trio.Event) -> None:
        with context.bind(
            delivery_id=job.delivery.id,
            installation_id=job.installation_id,
            job=job.name,
            repository=job.repository,
        ):
            try:
                await self.executor.queued(job, ahead=ahead)
            except Exception:
                log.exception("reporting job %s as queued failed", job.external_id)
            finally:
                done.set()

    def _finish_later(self, delivery_id: str) -> None:
        assert self._reports is not None

        async def finish() -> None:
            await self.journal.mark_finished(delivery_id)

        self._reports.start_soon(finish)

    def _lane_closed(self, lane: Lane) -> None:
        if self.lanes.get(lane.installation_id) is lane:
            del self.lanes[lane.installation_id]

    def _stale_reason(self, job: JobSpec, seq: int) -> str | None:
        key = job.supersede_key
        if key is None:
            return None
        latest = self._latest.get(key)
        if latest is not None and latest.seq > seq:
            if latest.sha == job.sha:
                return (
                    f"delivery {latest.delivery_id} queued the same commit"
                    f" {job.sha} again; it runs there"
                )
            return f"superseded by newer head commit {latest.sha}"
        # A job that already finished for this commit runs again: skipping
        # it would post a "skipped" check run over the finished one, and
        # GitHub counts skipped as passing, even for a required check.
        return None

    def _job_done(self, job: JobSpec, seq: int) -> None:
        key = job.supersede_key
        if key is None or job.sha is None:
            return
        latest = self._latest.get(key)
        if latest is not None and latest.seq <= seq:
            del self._latest[key]
