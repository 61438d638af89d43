"""The journal interface and the records it returns.

Every journal implementation (SQLite, in-memory, and later PostgreSQL)
follows :class:`Journal`. The records are frozen dataclasses, so they can
cross from a worker thread to the trio loop unchanged.
"""

from __future__ import annotations

import enum
import json
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

from daemon.delivery import Delivery

__all__ = [
    "FORM_CONTENT_TYPE",
    "JobRecord",
    "Journal",
    "JournalEntry",
    "JournalStatistics",
    "JournalStats",
    "PruneResult",
    "RecordOutcome",
    "RecordResult",
    "State",
    "decode_payload",
]

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


class State(enum.StrEnum):
    """The state of a delivery or of one of its jobs."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"


class RecordOutcome(enum.StrEnum):
    """The outcome of :meth:`Journal.record` for one delivery."""

    #: The id was not in the journal, and the delivery is now queued.
    NEW = "new"
    #: The id was finished, so an operator redelivered it: it is queued again.
    RERUN = "rerun"
    #: The id is queued or running, so nothing changed.
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class RecordResult:
    """The outcome of recording one delivery.

    ``seq`` is the delivery's sequence number after the call, ``attempts``
    the number of times it has been accepted, and ``state`` its state after
    the call (for a duplicate, the state it already had).
    """

    outcome: RecordOutcome
    seq: int
    attempts: int
    state: State

    @property
    def accepted(self) -> bool:
        """Whether the delivery was queued by this call and must be dispatched."""
        return self.outcome is not RecordOutcome.DUPLICATE


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A journalled delivery with its sequence number, state and attempt count."""

    seq: int
    delivery: Delivery
    state: State
    attempts: int


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The stored state of one job of a delivery.

    ``report_id`` is the id of the check run or comment that reports the
    job on GitHub. ``updated_at`` is a Unix timestamp in seconds.
    """

    delivery_id: str
    job_name: str
    state: State
    conclusion: str | None
    report_id: int | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class JournalStats:
    """The journal's size and its number of deliveries in each state.

    ``size_bytes`` is the space the journal takes. For SQLite it is the
    database file plus its write-ahead log, and for the memory journal the
    sum of the stored bodies.
    """

    size_bytes: int
    queued: int
    running: int
    finished: int
    jobs: int


@dataclass(frozen=True, slots=True)
class JournalStatistics:
    """Counters for introspection and tests.

    ``commits`` counts committed transactions and ``operations`` the calls
    they carried, so ``operations / commits`` is the mean group-commit size.
    ``max_batch`` is the largest number of calls one transaction carried.
    ``waiting`` is the number of calls submitted and not yet completed.
    """

    commits: int
    operations: int
    max_batch: int
    waiting: int


@dataclass(frozen=True, slots=True)
class PruneResult:
    """The counts of deliveries that :meth:`Journal.prune` deleted, and the size.

    ``expired`` counts finished deliveries deleted for their age and
    ``evicted`` those deleted to bring the journal under ``max_size``.
    """

    expired: int
    evicted: int
    size_bytes: int


def decode_payload(body: bytes, content_type: str) -> dict[str, Any]:
    """Decode a webhook body into its JSON object.

    A form-urlencoded body carries the JSON in its ``payload`` field, as
    GitHub sends it for webhooks configured with that content type. Raise
    ``ValueError`` when the body is not a JSON object.
    """
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == FORM_CONTENT_TYPE:
        fields = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=True)
        if "payload" not in fields:
            raise ValueError("form-urlencoded body has no payload field")
        document = fields["payload"][0]
    else:
        document = body.decode("utf-8")

    payload = json.loads(document)
    if not isinstance(payload, dict):
        raise ValueError(f"payload is a JSON {type(payload).__name__}, not an object")
    return payload


class Journal(Protocol):
    """The durable record of accepted deliveries and of their jobs' states.

    A delivery moves queued -> running -> finished, and back to queued when
    an operator redelivers a finished one. Every method that changes state
    returns only after the change is durable, as far as the implementation
    offers durability. Methods called before :meth:`open` or after
    :meth:`close` raise ``RuntimeError`` or ``trio.ClosedResourceError``.
    Storage failures raise :class:`~daemon.errors.JournalError`.
    """

    async def open(self) -> None:
        """Open the journal and recover from the previous run.

        Deliveries left running by a previous process are queued again.
        Raise :class:`~daemon.errors.JournalError` when the storage cannot
        be opened or is corrupt. The storage is never reset.
        """
        ...

    async def close(self) -> None:
        """Finish the calls already submitted, then close the journal."""
        ...

    async def __aenter__(self) -> Self:
        """Open the journal; implementations that subclass this inherit it."""
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def record(self, delivery: Delivery) -> RecordResult:
        """Record an accepted delivery, committed before this returns.

        A new id is queued with one attempt. A finished id is queued again
        with a new ``seq`` and one more attempt, and keeps its job rows. A
        queued or running id is left as it is.

        If the call is cancelled while it waits, the delivery may still be
        committed: it is then queued, and :meth:`unfinished` returns it at
        the next start.
        """
        ...

    async def mark_running(self, delivery_id: str) -> None:
        """Set a delivery's state to running; raise ``KeyError`` if unknown."""
        ...

    async def mark_finished(self, delivery_id: str) -> None:
        """Set a delivery's state to finished; raise ``KeyError`` if unknown."""
        ...

    async def set_job(
        self,
        delivery_id: str,
        job_name: str,
        *,
        state: State | str,
        conclusion: str | None = None,
        report_id: int | None = None,
    ) -> None:
        """Create or update one job of a delivery.

        ``conclusion`` is always overwritten, so queueing a job again
        clears it. A ``report_id`` of ``None`` keeps the stored one, so a
        rerun reports on the same check run or comment. Raise ``KeyError``
        if the delivery is unknown and ``ValueError`` for an invalid state.
        """
        ...

    async def jobs(self, delivery_id: str) -> list[JobRecord]:
        """Return the jobs of a delivery in the order they were first set."""
        ...

    async def unfinished(self) -> list[JournalEntry]:
        """Return the queued and running deliveries in ``seq`` order.

        A stored body that no longer decodes is logged, its delivery is
        marked finished, and it is left out.
        """
        ...

    async def pending(
        self, installation_id: int | None, *, after_seq: int, limit: int
    ) -> list[JournalEntry]:
        """Return up to ``limit`` queued deliveries of one installation.

        Only deliveries with ``seq > after_seq`` are returned, in ``seq``
        order, so a caller pages by passing the last ``seq`` it read.
        ``installation_id=None`` selects deliveries without an installation.
        """
        ...

    async def prune(self, *, older_than: float) -> PruneResult:
        """Delete finished deliveries and their jobs to bound the journal.

        First delete those received more than ``older_than`` seconds ago.
        Then, while the journal is larger than its ``max_size``, delete the
        oldest finished deliveries and log a warning. Queued and running
        deliveries are never deleted; when they alone exceed ``max_size``
        an error is logged.
        """
        ...

    async def stats(self) -> JournalStats:
        """Return the journal's size and its counts of deliveries per state."""
        ...

    def statistics(self) -> JournalStatistics:
        """Return the commit counters, without waiting."""
        ...

    async def last_received_at(self) -> float | None:
        """Return the latest ``received_at`` ever recorded, or ``None``.

        The value survives pruning of the delivery it came from.
        """
        ...

    async def known(self, ids: Iterable[str]) -> set[str]:
        """Return those of ``ids`` that are in the journal, in any state."""
        ...
