"""A journal kept in process memory, with the SQLite journal's semantics.

It is used when the journal is disabled, and as the baseline in
``bench/journal.py``. Nothing survives the process.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from daemon.delivery import Delivery
from daemon.journal.interface import (
    JobRecord,
    Journal,
    JournalEntry,
    JournalStatistics,
    JournalStats,
    PruneResult,
    RecordOutcome,
    RecordResult,
    State,
)

__all__ = ["MemoryJournal"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Row:
    seq: int
    delivery: Delivery
    state: State
    attempts: int


class MemoryJournal(Journal):
    """Keep deliveries and jobs in dictionaries.

    ``max_size`` bounds the sum of the stored bodies, in bytes. Every
    method checkpoints once, so it can be cancelled before it acts, and a
    change is complete once the method returns.
    """

    def __init__(self, *, max_size: int | None = None) -> None:
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be positive, not {max_size!r}")
        self._max_size = max_size
        self._rows: dict[str, _Row] = {}
        self._jobs: dict[str, dict[str, JobRecord]] = {}
        self._seq = itertools.count(1)
        self._last_received_at: float | None = None
        self._is_open = False
        self._closed = False
        self._operations = 0

    async def open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the memory journal is closed")
        await trio.lowlevel.checkpoint()
        self._is_open = True
        log.info("memory journal opened, nothing is kept across restarts")

    async def close(self) -> None:
        if self._is_open:
            log.info("memory journal closed with %d deliveries", len(self._rows))
        self._is_open = False
        self._closed = True
        await trio.lowlevel.checkpoint()

    async def _enter(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the memory journal is closed")
        if not self._is_open:
            raise RuntimeError("the memory journal is not open; call open() first")
        await trio.lowlevel.checkpoint()
        self._operations += 1

    def _row(self, delivery_id: str) -> _Row:
        try:
            return self._rows[delivery_id]
        except KeyError:
            raise KeyError(f"delivery {delivery_id!r} is not in the journal") from None

    async def record(self, delivery: Delivery) -> RecordResult:
        await self._enter()
        if self._last_received_at is None:
            self._last_received_at = delivery.received_at
        else:
            self._last_received_at = max(self._last_received_at, delivery.received_at)

        row = self._rows.get(delivery.id)
        if row is None:
            row = _Row(next(self._seq), delivery, State.QUEUED, 1)
            self._rows[delivery.id] = row
            return RecordResult(RecordOutcome.NEW, row.seq, 1, State.QUEUED)

        if row.state is not State.FINISHED:
            return RecordResult(
                RecordOutcome.DUPLICATE, row.seq, row.attempts, row.state
            )

        # A rerun moves to the end of the order, as in SqliteJournal.
        del self._rows[delivery.id]
        row = _Row(next(self._seq), delivery, State.QUEUED, row.attempts + 1)
        self._rows[delivery.id] = row
        return RecordResult(RecordOutcome.RERUN, row.seq, row.attempts, State.QUEUED)

    async def mark_running(self, delivery_id: str) -> None:
        await self._enter()
        self._row(delivery_id).state = State.RUNNING

    async def mark_finished(self, delivery_id: str) -> None:
        await self._enter()
        self._row(delivery_id).state = State.FINISHED

    async def set_job(
        self,
        delivery_id: str,
        job_name: str,
        *,
        state: State | str,
        conclusion: str | None = None,
        report_id: int | None = None,
    ) -> None:
        job_state = State(state)
        await self._enter()
        self._row(delivery_id)
        jobs = self._jobs.setdefault(delivery_id, {})
        previous = jobs.get(job_name)
        if report_id is None and previous is not None:
            report_id = previous.report_id
        jobs[job_name] = JobRecord(
            delivery_id, job_name, job_state, conclusion, report_id, time.time()
        )

    async def jobs(self, delivery_id: str) -> list[JobRecord]:
        await self._enter()
        return list(self._jobs.get(delivery_id, {}).values())

    @staticmethod
    def _entry(row: _Row) -> JournalEntry:
        return JournalEntry(row.seq, row.delivery, row.state, row.attempts)

    async def unfinished(self) -> list[JournalEntry]:
        await self._enter()
        rows = [row for row in self._rows.values() if row.state is not State.FINISHED]
        return [self._entry(row) for row in sorted(rows, key=lambda row: row.seq)]

    async def pending(
        self, installation_id: int | None, *, after_seq: int, limit: int
    ) -> list[JournalEntry]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, not {limit!r}")
        await self._enter()
        rows = sorted(
            (
                row
                for row in self._rows.values()
                if row.state is State.QUEUED
                and row.seq > after_seq
                and row.delivery.installation_id == installation_id
            ),
            key=lambda row: row.seq,
        )
        return [self._entry(row) for row in rows[:limit]]

    def _size(self) -> int:
        return sum(len(row.delivery.body) for row in self._rows.values())

    def _delete(self, delivery_id: str) -> None:
        del self._rows[delivery_id]
        self._jobs.pop(delivery_id, None)

    async def prune(self, *, older_than: float) -> PruneResult:
        await self._enter()
        cutoff = time.time() - older_than
        expired = [
            row.delivery.id
            for row in self._rows.values()
            if row.state is State.FINISHED and row.delivery.received_at < cutoff
        ]
        for delivery_id in expired:
            self._delete(delivery_id)

        size = self._size()
        evicted = 0
        if self._max_size is not None and size > self._max_size:
            finished = sorted(
                (row for row in self._rows.values() if row.state is State.FINISHED),
                key=lambda row: row.seq,
            )
            for row in finished:
                if size <= self._max_size:
                    break
                size -= len(row.delivery.body)
                self._delete(row.delivery.id)
                evicted += 1
            if evicted:
                log.warning(
                    "memory journal exceeded max_size %d bytes; deleted %d oldest "
                    "finished deliveries, now %d bytes",
                    self._max_size,
                    evicted,
                    size,
                )
            if size > self._max_size:
                log.error(
                    "memory journal takes %d bytes with no finished deliveries "
                    "left, more than max_size %d; no unfinished delivery was "
                    "deleted, raise max_size or find out why deliveries do not "
                    "finish",
                    size,
                    self._max_size,
                )
        return PruneResult(expired=len(expired), evicted=evicted, size_bytes=size)

    async def stats(self) -> JournalStats:
        await self._enter()
        counts = dict.fromkeys(State, 0)
        for row in self._rows.values():
            counts[row.state] += 1
        return JournalStats(
            size_bytes=self._size(),
            queued=counts[State.QUEUED],
            running=counts[State.RUNNING],
            finished=counts[State.FINISHED],
            jobs=sum(len(jobs) for jobs in self._jobs.values()),
        )

    def statistics(self) -> JournalStatistics:
        # Every call is its own "commit": there is nothing to group.
        return JournalStatistics(
            commits=self._operations,
            operations=self._operations,
            max_batch=1 if self._operations else 0,
            waiting=0,
        )

    async def last_received_at(self) -> float | None:
        await self._enter()
        return self._last_received_at

    async def known(self, ids: Iterable[str]) -> set[str]:
        await self._enter()
        return {delivery_id for delivery_id in ids if delivery_id in self._rows}
