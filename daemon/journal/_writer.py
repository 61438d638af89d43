"""Group commit: one thread runs every journal call on one SQLite connection.

Trio tasks submit work functions to a queue. The writer thread takes every
request waiting in the queue (up to ``max_batch``), runs them in one
transaction with a savepoint each, commits once, and then wakes all their
callers with one callback into the trio loop. While it commits, new
requests collect in the queue and form the next batch, so concurrent calls
share the cost of one ``fsync``.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from daemon.errors import JournalError
from daemon.journal.interface import JournalStatistics

__all__ = ["GroupCommitWriter"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Request(Generic[T]):
    __slots__ = ("abandoned", "done", "error", "name", "result", "work")

    def __init__(self, work: Callable[[sqlite3.Connection], T], name: str) -> None:
        self.work = work
        self.name = name
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        # Set from the trio thread, read by the writer thread. A stale read
        # only means that an abandoned request still runs.
        self.abandoned = False


class _Stop:
    pass


_STOP = _Stop()


def _failure_hint(exc: Exception) -> str:
    if getattr(exc, "sqlite_errorname", None) == "SQLITE_BUSY":
        return "another process holds a lock on the file, so stop it"
    return "check free disk space and the kernel log for I/O errors"


class GroupCommitWriter:
    """Own a SQLite connection in a thread and run submitted work in batches.

    The connection must be in autocommit mode (``isolation_level=None``),
    because the writer issues ``BEGIN IMMEDIATE`` and ``COMMIT`` itself.
    After :meth:`start` no other thread may use it, and :meth:`stop`
    closes it.
    """

    def __init__(
        self,
        *,
        connection: sqlite3.Connection,
        path: str,
        max_batch: int = 1024,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch!r}")
        self._connection = connection
        self._path = path
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Request[object] | _Stop] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stopping = False

        # Written by the writer thread only.
        self._commits = 0
        self._operations = 0
        self._max_batch_seen = 0
        # Written by the trio thread only.
        self._waiting = 0

    def start(self) -> None:
        """Start the writer thread; call from the trio thread that will submit."""
        if self._thread is not None:
            raise RuntimeError("the journal writer is already started")
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._run, name="ghappd-journal-writer", daemon=True
        )
        self._thread.start()
        log.debug("journal writer for %s started", self._path)

    async def submit(self, work: Callable[[sqlite3.Connection], T], *, name: str) -> T:
        """Run ``work(connection)`` in the next batch and return its result.

        ``name`` describes the work, for error messages. A
        ``sqlite3.Error`` from the work or from the commit is raised as
        :class:`~daemon.errors.JournalError`; other exceptions from the work
        propagate unchanged, and in both cases the work's changes are rolled
        back. If the caller is cancelled before the writer takes its request,
        the work is skipped. Once the writer has taken it, the work runs
        and commits even though the caller is gone.
        """
        if self._stopping or self._thread is None:
            raise trio.ClosedResourceError("the journal is closed or not open")
        await trio.lowlevel.checkpoint_if_cancelled()

        request: _Request[T] = _Request(work, name)
        self._waiting += 1
        self._queue.put(request)  # type: ignore[arg-type]
        try:
            await request.done.wait()
        except BaseException:
            request.abandoned = True
            raise

        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    async def stop(self) -> None:
        """Run the requests already submitted, then close the connection.

        The wait for the thread is shielded from cancellation, so the last
        batch is committed and the file closed before this returns, even
        during shutdown.
        """
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        self._queue.put(_STOP)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._thread.join)
        log.debug("journal writer for %s stopped", self._path)

    def statistics(self) -> JournalStatistics:
        return JournalStatistics(
            commits=self._commits,
            operations=self._operations,
            max_batch=self._max_batch_seen,
            waiting=self._waiting,
        )

    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                batch, stop = self._take_batch()
                if batch:
                    self._run_batch(batch)
        finally:
            try:
                self._connection.close()
            except sqlite3.Error:
                log.exception("closing journal file %s failed", self._path)

    def _take_batch(self) -> tuple[list[_Request[object]], bool]:
        first = self._queue.get()
        if isinstance(first, _Stop):
            return [], True
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                return batch, True
            batch.append(item)
        return batch, False

    def _run_batch(self, batch: list[_Request[object]]) -> None:
        live = [request for request in batch if not request.abandoned]
        if live:
            try:
                self._transact(live)
            except Exception as exc:
                log.exception(
                    "journal transaction on %s failed, %d calls rolled back",
                    self._path,
                    len(live),
                )
                self._rollback()
                for request in live:
                    request.result = None
                    request.error = JournalError(
                        f"journal file {self._path!r}: writing failed ({exc}); "
                        f"{_failure_hint(exc)}"
                    )
        self._wake(batch)

    def _transact(self, live: list[_Request[object]]) -> None:
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        for request in live:
            connection.execute("SAVEPOINT request")
            try:
                request.result = request.work(connection)
            except sqlite3.Error as exc:
                connection.execute("ROLLBACK TO request")
                request.error = JournalError(
                    f"journal file {self._path!r}: {request.name} failed ({exc})"
                )
                request.error.__cause__ = exc
            except Exception as exc:
                connection.execute("ROLLBACK TO request")
                request.error = exc
            connection.execute("RELEASE request")
        connection.execute("COMMIT")

        self._commits += 1
        self._operations += len(live)
        self._max_batch_seen = max(self._max_batch_seen, len(live))

    def _rollback(self) -> None:
        if not self._connection.in_transaction:
            return
        try:
            self._connection.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rolling back on journal file %s failed", self._path)

    def _wake(self, batch: list[_Request[object]]) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(self._deliver, batch)
        except trio.RunFinishedError:
            # The trio run that submitted the batch has ended, so no task waits.
            log.debug("journal writer for %s outlived its trio run", self._path)

    def _deliver(self, batch: list[_Request[object]]) -> None:
        self._waiting -= len(batch)
        for request in batch:
            request.done.set()
