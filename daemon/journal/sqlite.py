"""The SQLite journal: one database file in WAL mode, written by group commit.

Every call, reads included, runs on the writer thread of
:class:`~daemon.journal._writer.GroupCommitWriter`, so the trio loop never
waits on SQLite and a read always returns the writes that its task made
before it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import trio

from daemon.delivery import Delivery
from daemon.errors import JournalError
from daemon.journal import _queries
from daemon.journal._schema import SCHEMA_VERSION, make_directory, open_database
from daemon.journal._writer import GroupCommitWriter
from daemon.journal.interface import (
    JobRecord,
    Journal,
    JournalEntry,
    JournalStatistics,
    JournalStats,
    PruneResult,
    RecordResult,
    State,
)

__all__ = ["SCHEMA_VERSION", "SqliteJournal"]

log = logging.getLogger(__name__)


class SqliteJournal(Journal):
    """Keep the journal in the SQLite database at ``path``.

    ``max_size`` bounds the database size in bytes (page count times page
    size, which is the file's size after a checkpoint). :meth:`prune`
    enforces it, and the write-ahead log adds up to about 8 MiB on top.
    ``max_batch`` caps the number of calls one transaction carries.

    Usable as ``async with SqliteJournal(path=...) as journal:``. Call it
    only from the trio run that opened it, because the writer thread wakes
    callers through that run's token.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        max_size: int | None = None,
        max_batch: int = 1024,
    ) -> None:
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be positive, not {max_size!r}")
        self._path = Path(path)
        self._name = str(self._path)
        self._max_size = max_size
        self._max_batch = max_batch
        self._writer: GroupCommitWriter | None = None
        self._lock_fd: int | None = None

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def open(self) -> None:
        """Open or create the database file and queue interrupted deliveries.

        Create the parent directory (mode 0700) if it is missing. Raise
        :class:`~daemon.errors.JournalError` naming the file when it cannot
        be opened, is not a ghappd journal, fails ``PRAGMA quick_check`` or
        has a newer schema version. The file is never reset. Opening runs
        in a worker thread and cannot be cancelled once it has started.
        """
        if self._writer is not None:
            raise RuntimeError(
                f"journal {self._name!r} was opened before; a SqliteJournal opens "
                f"once, so create a new one"
            )
        self._lock_fd = await trio.to_thread.run_sync(_lock, self._path)
        try:
            connection, requeued = await trio.to_thread.run_sync(
                open_database, self._path
            )
        except BaseException:
            _unlock(self._lock_fd)
            self._lock_fd = None
            raise
        self._writer = GroupCommitWriter(
            connection=connection, path=self._name, max_batch=self._max_batch
        )
        self._writer.start()
        log.info(
            "journal %s opened; deliveries queued again that were running "
            "when it was last closed: %d",
            self._name,
            requeued,
        )

    async def close(self) -> None:
        """Commit the calls already submitted, then close the database.

        Cancellation does not interrupt closing: the file is closed when
        this returns. Later calls raise ``trio.ClosedResourceError``.
        Closing twice is allowed.
        """
        if self._writer is None:
            return
        await self._writer.stop()
        if self._lock_fd is not None:
            _unlock(self._lock_fd)
            self._lock_fd = None
        log.info("journal %s closed", self._name)

    def _started(self) -> GroupCommitWriter:
        if self._writer is None:
            raise RuntimeError(f"journal {self._name!r} is not open; call open()")
        return self._writer

    async def record(self, delivery: Delivery) -> RecordResult:
        """Record an accepted delivery and commit it before returning.

        If the call is cancelled before the writer thread takes the request,
        nothing is written. If it is cancelled later, the delivery is
        committed all the same: it is queued, and :meth:`unfinished` returns
        it at the next start.
        """
        return await self._started().submit(
            lambda connection: _queries.record(connection, delivery),
            name=f"recording delivery {delivery.id!r}",
        )

    async def mark_running(self, delivery_id: str) -> None:
        await self._started().submit(
            lambda connection: _queries.set_state(
                connection, delivery_id, State.RUNNING
            ),
            name=f"marking delivery {delivery_id!r} running",
        )

    async def mark_finished(self, delivery_id: str) -> None:
        await self._started().submit(
            lambda connection: _queries.set_state(
                connection, delivery_id, State.FINISHED
            ),
            name=f"marking delivery {delivery_id!r} finished",
        )

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
        await self._started().submit(
            lambda connection: _queries.set_job(
                connection, delivery_id, job_name, job_state, conclusion, report_id
            ),
            name=f"storing job {job_name!r} of delivery {delivery_id!r}",
        )

    async def jobs(self, delivery_id: str) -> list[JobRecord]:
        return await self._started().submit(
            lambda connection: _queries.jobs(connection, delivery_id),
            name=f"reading the jobs of delivery {delivery_id!r}",
        )

    async def unfinished(self) -> list[JournalEntry]:
        """Return the queued and running deliveries in ``seq`` order.

        Deliveries that were running when the journal was last closed were
        queued again by :meth:`open`. A row whose body no longer decodes is
        logged, marked finished and left out.
        """
        return await self._started().submit(
            _queries.unfinished, name="reading the unfinished deliveries"
        )

    async def pending(
        self, installation_id: int | None, *, after_seq: int, limit: int
    ) -> list[JournalEntry]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, not {limit!r}")
        return await self._started().submit(
            lambda connection: _queries.pending(
                connection, installation_id, after_seq, limit
            ),
            name=f"reading the queued deliveries of installation {installation_id!r}",
        )

    async def prune(self, *, older_than: float) -> PruneResult:
        cutoff = time.time() - older_than
        return await self._started().submit(
            lambda connection: _queries.prune(
                connection, self._name, cutoff, self._max_size
            ),
            name="pruning finished deliveries",
        )

    async def stats(self) -> JournalStats:
        return await self._started().submit(
            lambda connection: _queries.stats(connection, self._path),
            name="reading the journal statistics",
        )

    def statistics(self) -> JournalStatistics:
        return self._started().statistics()

    async def last_received_at(self) -> float | None:
        return await self._started().submit(
            _queries.last_received_at, name="reading the last received time"
        )

    async def known(self, ids: Iterable[str]) -> set[str]:
        wanted = list(ids)
        return await self._started().submit(
            lambda connection: _queries.known(connection, wanted),
            name="looking up delivery ids",
        )


def _lock(path: Path) -> int:
    """Take the journal's lock file, so two daemons never share one journal.

    The lock is ``<path>.lock``, held with ``flock`` for as long as the
    journal is open; the kernel releases it when the process dies.
    Raises :class:`~daemon.errors.JournalError` when another process holds
    it or it cannot be created.
    """
    lock_path = path.with_name(path.name + ".lock")
    make_directory(path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise JournalError(
            f"journal file {str(path)!r}: cannot create its lock file"
            f" {str(lock_path)!r}: {exc.strerror}; check [journal] path and the"
            " folder's permissions"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalError(
            f"journal file {str(path)!r} is in use by another ghappd process"
            f" (it holds {str(lock_path)!r}); stop that daemon, or give this one"
            " its own [journal] path"
        ) from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
