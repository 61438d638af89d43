"""The SQLite journal: one database file in WAL mode, written by group commit.

Every call, reads included, runs on the writer thread of
:class:`~daemon.journal._writer.GroupCommitWriter`, so the trio loop never
waits on SQLite and a read always sees the writes its task made before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

import trio

from daemon.delivery import Delivery
from daemon.errors import JournalError
from daemon.journal._writer import GroupCommitWriter
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
    decode_payload,
)

__all__ = ["SCHEMA_VERSION", "SqliteJournal"]

log = logging.getLogger(__name__)

#: The ``PRAGMA user_version`` this code writes and reads.
SCHEMA_VERSION = 1

# How long a statement waits for a lock held by another connection (for
# example an operator's sqlite3 shell) before it fails, in milliseconds.
_BUSY_TIMEOUT_MS = 10_000

# The WAL file is truncated back to this size after a checkpoint, in bytes.
_WAL_SIZE_LIMIT = 8 * 1024 * 1024

# Bound on the number of host parameters in one statement. SQLite before
# 3.32 allowed 999.
_MAX_PARAMETERS = 500

# The number of finished deliveries prune() considers per round when it
# enforces max_size.
_EVICTION_ROUND = 500

# The errors SQLite reports when the file exists but cannot be opened or
# written, as opposed to a file whose content is not a valid database.
_ACCESS_ERRORS = frozenset(
    {"SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_READONLY", "SQLITE_AUTH"}
)

_SCHEMA = """
CREATE TABLE deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    action TEXT,
    installation_id INTEGER,
    received_at REAL NOT NULL,
    content_type TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'finished')),
    attempts INTEGER NOT NULL
) STRICT;
CREATE INDEX deliveries_queued ON deliveries (installation_id, seq)
    WHERE state = 'queued';
CREATE INDEX deliveries_finished ON deliveries (received_at)
    WHERE state = 'finished';
CREATE TABLE jobs (
    delivery_id TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'finished')),
    conclusion TEXT,
    report_id INTEGER,
    updated_at REAL NOT NULL,
    PRIMARY KEY (delivery_id, name)
) STRICT;
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value ANY
) STRICT;
"""

_ENTRY_COLUMNS = "seq, id, event, received_at, content_type, body, state, attempts"


class SqliteJournal(Journal):
    """Keep the journal in the SQLite database at ``path``.

    ``max_size`` bounds the database size in bytes (page count times page
    size, which is the file's size after a checkpoint). :meth:`prune`
    enforces it, and the write-ahead log adds up to about 8 MiB on top.
    ``max_batch`` caps the number of calls one transaction carries.

    Usable as ``async with SqliteJournal(path=...) as journal:``.
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

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def open(self) -> None:
        """Open or create the database file and queue interrupted deliveries.

        Create the parent directory (mode 0700) if it is missing. Raise
        :class:`~daemon.errors.JournalError` naming the file when it cannot
        be opened, is not a ghappd journal, fails ``PRAGMA quick_check`` or
        has a newer schema version; the file is never reset. Opening runs
        in a worker thread and cannot be cancelled once it has started.
        """
        if self._writer is not None:
            raise RuntimeError(f"journal {self._name!r} is already open")
        connection, requeued = await trio.to_thread.run_sync(_open_database, self._path)
        self._writer = GroupCommitWriter(
            connection=connection, path=self._name, max_batch=self._max_batch
        )
        self._writer.start()
        log.info(
            "journal %s opened, %d deliveries queued again that were running "
            "when it was last closed",
            self._name,
            requeued,
        )

    async def close(self) -> None:
        """Commit the calls already submitted, then close the database.

        Later calls raise ``trio.ClosedResourceError``. Closing twice is
        allowed.
        """
        if self._writer is None:
            return
        await self._writer.stop()
        log.info("journal %s closed", self._name)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

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
            lambda connection: _record(connection, delivery),
            name=f"recording delivery {delivery.id!r}",
        )

    async def mark_running(self, delivery_id: str) -> None:
        await self._started().submit(
            lambda connection: _set_state(connection, delivery_id, State.RUNNING),
            name=f"marking delivery {delivery_id!r} running",
        )

    async def mark_finished(self, delivery_id: str) -> None:
        await self._started().submit(
            lambda connection: _set_state(connection, delivery_id, State.FINISHED),
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
            lambda connection: _set_job(
                connection, delivery_id, job_name, job_state, conclusion, report_id
            ),
            name=f"storing job {job_name!r} of delivery {delivery_id!r}",
        )

    async def jobs(self, delivery_id: str) -> list[JobRecord]:
        return await self._started().submit(
            lambda connection: _jobs(connection, delivery_id),
            name=f"reading the jobs of delivery {delivery_id!r}",
        )

    async def unfinished(self) -> list[JournalEntry]:
        """Return the queued and running deliveries in ``seq`` order.

        Deliveries that were running when the journal was last closed were
        queued again by :meth:`open`. A row whose body no longer decodes is
        logged, marked finished and left out.
        """
        return await self._started().submit(
            lambda connection: _entries(
                connection,
                f"SELECT {_ENTRY_COLUMNS} FROM deliveries"
                " WHERE state IN ('queued', 'running') ORDER BY seq",
                (),
            ),
            name="reading the unfinished deliveries",
        )

    async def pending(
        self, installation_id: int | None, *, after_seq: int, limit: int
    ) -> list[JournalEntry]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, not {limit!r}")
        return await self._started().submit(
            lambda connection: _entries(
                connection,
                f"SELECT {_ENTRY_COLUMNS} FROM deliveries"
                " WHERE state = 'queued' AND installation_id IS ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (installation_id, after_seq, limit),
            ),
            name=f"reading the queued deliveries of installation {installation_id!r}",
        )

    async def prune(self, *, older_than: float) -> PruneResult:
        cutoff = time.time() - older_than
        return await self._started().submit(
            lambda connection: _prune(connection, self._name, cutoff, self._max_size),
            name="pruning finished deliveries",
        )

    async def stats(self) -> JournalStats:
        return await self._started().submit(
            lambda connection: _stats(connection, self._path),
            name="reading the journal statistics",
        )

    def statistics(self) -> JournalStatistics:
        return self._started().statistics()

    async def last_received_at(self) -> float | None:
        return await self._started().submit(
            _last_received_at, name="reading the last received time"
        )

    async def known(self, ids: Iterable[str]) -> set[str]:
        wanted = list(ids)
        return await self._started().submit(
            lambda connection: _known(connection, wanted),
            name="looking up delivery ids",
        )


def _open_database(path: Path) -> tuple[sqlite3.Connection, int]:
    """Open the journal at ``path``, creating it if needed.

    Return the connection and the number of deliveries queued again.
    """
    name = str(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise JournalError(
            f"journal file {name!r}: creating the directory "
            f"{str(path.parent)!r} failed ({exc.strerror}); make it a directory "
            f"that the ghappd user can write, or choose another path"
        ) from exc

    try:
        connection = sqlite3.connect(
            path,
            isolation_level=None,
            check_same_thread=False,
            timeout=_BUSY_TIMEOUT_MS / 1000,
        )
    except sqlite3.Error as exc:
        raise _open_error(name, exc) from exc

    try:
        requeued = _prepare(connection, name)
    except sqlite3.Error as exc:
        connection.close()
        raise _open_error(name, exc) from exc
    except BaseException:
        connection.close()
        raise
    return connection, requeued


def _open_error(name: str, exc: sqlite3.Error) -> JournalError:
    if getattr(exc, "sqlite_errorname", None) in _ACCESS_ERRORS:
        return JournalError(
            f"journal file {name!r} cannot be opened for writing ({exc}); make it "
            f"a regular file that the ghappd user can read and write, in a "
            f"writable directory"
        )
    return JournalError(
        f"journal file {name!r} is not a valid SQLite database ({exc}); move it "
        f"aside (for example to {name + '.corrupt'!r}) and restart to begin an "
        f"empty journal, or restore it from a backup"
    )


def _prepare(connection: sqlite3.Connection, name: str) -> int:
    connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"journal file {name!r} has schema version {version}, newer than "
            f"version {SCHEMA_VERSION} that this ghappd reads; run a newer ghappd, "
            f"or move the file aside to begin an empty journal"
        )

    problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise JournalError(
            f"journal file {name!r} failed PRAGMA quick_check "
            f"({'; '.join(map(str, problems[:3]))}); move it aside (for example "
            f"to {name + '.corrupt'!r}) and restart to begin an empty journal, "
            f"or restore it from a backup"
        )

    if version == 0:
        tables = connection.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if tables:
            raise JournalError(
                f"journal file {name!r} is a SQLite database but not a ghappd "
                f"journal (it has tables and no schema version); choose another "
                f"path for the journal"
            )
        # auto_vacuum takes effect only if set before the first table is
        # created; INCREMENTAL lets prune() give freed pages back to the file
        # system with PRAGMA incremental_vacuum.
        connection.execute("PRAGMA auto_vacuum = INCREMENTAL")

    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise JournalError(
            f"journal file {name!r} cannot use write-ahead logging (journal mode "
            f"is {mode!r}); put the journal on a local file system"
        )
    # In WAL mode, synchronous=NORMAL syncs the WAL only at checkpoints, so
    # a commit survives a crash of the process but may be rolled back by a
    # power failure or an operating system crash (SQLite documentation,
    # "PRAGMA synchronous"). A delivery is answered 202 only once it is
    # committed, so FULL syncs the WAL at every commit; group commit shares
    # that fsync among concurrent record() calls.
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")

    connection.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        requeued = connection.execute(
            "UPDATE deliveries SET state = 'queued' WHERE state = 'running'"
        ).rowcount
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return requeued


def _record(connection: sqlite3.Connection, delivery: Delivery) -> RecordResult:
    connection.execute(
        "INSERT INTO meta (key, value) VALUES ('last_received_at', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
        (delivery.received_at,),
    )
    row = connection.execute(
        "SELECT seq, state, attempts FROM deliveries WHERE id = ?", (delivery.id,)
    ).fetchone()
    if row is None:
        seq = _insert(connection, delivery, attempts=1)
        return RecordResult(RecordOutcome.NEW, seq, 1, State.QUEUED)

    seq, state, attempts = row
    if state != State.FINISHED:
        return RecordResult(RecordOutcome.DUPLICATE, seq, attempts, State(state))

    # Deleting and inserting again gives the rerun a new seq, so a lane that
    # pages through pending() past the old one still finds it. Its job rows
    # are keyed by delivery id and stay.
    connection.execute("DELETE FROM deliveries WHERE seq = ?", (seq,))
    seq = _insert(connection, delivery, attempts=attempts + 1)
    return RecordResult(RecordOutcome.RERUN, seq, attempts + 1, State.QUEUED)


def _insert(
    connection: sqlite3.Connection, delivery: Delivery, *, attempts: int
) -> int:
    row = connection.execute(
        "INSERT INTO deliveries (id, event, action, installation_id, received_at,"
        " content_type, body, state, attempts)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?) RETURNING seq",
        (
            delivery.id,
            delivery.event,
            delivery.action,
            delivery.installation_id,
            delivery.received_at,
            delivery.content_type,
            delivery.body,
            attempts,
        ),
    ).fetchone()
    seq: int = row[0]
    return seq


def _set_state(connection: sqlite3.Connection, delivery_id: str, state: State) -> None:
    cursor = connection.execute(
        "UPDATE deliveries SET state = ? WHERE id = ?", (state.value, delivery_id)
    )
    if cursor.rowcount == 0:
        raise KeyError(f"delivery {delivery_id!r} is not in the journal")


def _set_job(
    connection: sqlite3.Connection,
    delivery_id: str,
    job_name: str,
    state: State,
    conclusion: str | None,
    report_id: int | None,
) -> None:
    exists = connection.execute(
        "SELECT 1 FROM deliveries WHERE id = ?", (delivery_id,)
    ).fetchone()
    if exists is None:
        raise KeyError(f"delivery {delivery_id!r} is not in the journal")
    connection.execute(
        "INSERT INTO jobs (delivery_id, name, state, conclusion, report_id,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (delivery_id, name) DO UPDATE SET state = excluded.state,"
        " conclusion = excluded.conclusion,"
        " report_id = coalesce(excluded.report_id, jobs.report_id),"
        " updated_at = excluded.updated_at",
        (delivery_id, job_name, state.value, conclusion, report_id, time.time()),
    )


def _jobs(connection: sqlite3.Connection, delivery_id: str) -> list[JobRecord]:
    rows = connection.execute(
        "SELECT name, state, conclusion, report_id, updated_at FROM jobs"
        " WHERE delivery_id = ? ORDER BY rowid",
        (delivery_id,),
    )
    return [
        JobRecord(delivery_id, name, State(state), conclusion, report_id, updated_at)
        for name, state, conclusion, report_id, updated_at in rows
    ]


def _entries(
    connection: sqlite3.Connection, query: str, parameters: tuple[object, ...]
) -> list[JournalEntry]:
    entries = []
    undecodable = []
    for (
        seq,
        delivery_id,
        event,
        received_at,
        content_type,
        body,
        state,
        attempts,
    ) in connection.execute(query, parameters):
        try:
            payload = decode_payload(body, content_type)
        except ValueError as exc:
            log.error(
                "journal delivery %s (seq %d) has a body that does not decode "
                "(%s); marked finished without running",
                delivery_id,
                seq,
                exc,
            )
            undecodable.append(seq)
            continue
        delivery = Delivery(
            id=delivery_id,
            event=event,
            payload=payload,
            body=body,
            received_at=received_at,
            content_type=content_type,
        )
        entries.append(JournalEntry(seq, delivery, State(state), attempts))

    connection.executemany(
        "UPDATE deliveries SET state = 'finished' WHERE seq = ?",
        [(seq,) for seq in undecodable],
    )
    return entries


def _database_size(connection: sqlite3.Connection) -> int:
    pages: int = connection.execute("PRAGMA page_count").fetchone()[0]
    page_size: int = connection.execute("PRAGMA page_size").fetchone()[0]
    return pages * page_size


def _release_free_pages(connection: sqlite3.Connection) -> None:
    # Python's sqlite3 steps a statement that returns no columns only once,
    # and each step of incremental_vacuum frees one page, so run it once per
    # free page.
    free: int = connection.execute("PRAGMA freelist_count").fetchone()[0]
    for _ in range(free):
        connection.execute("PRAGMA incremental_vacuum")


def _delete_deliveries(
    connection: sqlite3.Connection, where: str, parameters: tuple[object, ...]
) -> int:
    connection.execute(
        f"DELETE FROM jobs WHERE delivery_id IN (SELECT id FROM deliveries {where})",
        parameters,
    )
    return connection.execute(f"DELETE FROM deliveries {where}", parameters).rowcount


def _prune(
    connection: sqlite3.Connection, name: str, cutoff: float, max_size: int | None
) -> PruneResult:
    expired = _delete_deliveries(
        connection, "WHERE state = 'finished' AND received_at < ?", (cutoff,)
    )
    _release_free_pages(connection)
    size = _database_size(connection)
    if expired:
        log.info(
            "journal %s deleted %d finished deliveries received before %.0f",
            name,
            expired,
            cutoff,
        )

    evicted = 0
    if max_size is None or size <= max_size:
        return PruneResult(expired=expired, evicted=0, size_bytes=size)

    # Delete the oldest finished deliveries whose bodies add up to the
    # excess, then measure again: pages of index and table overhead make
    # the body sizes an estimate of what deleting a row frees.
    while size > max_size:
        excess = size - max_size
        rows = connection.execute(
            "SELECT seq, sum(length(body)) OVER (ORDER BY seq) FROM deliveries"
            " WHERE state = 'finished' ORDER BY seq LIMIT ?",
            (_EVICTION_ROUND,),
        ).fetchall()
        if not rows:
            break
        last = rows[-1][0]
        for seq, cumulative in rows:
            if cumulative >= excess:
                last = seq
                break
        evicted += _delete_deliveries(
            connection, "WHERE state = 'finished' AND seq <= ?", (last,)
        )
        _release_free_pages(connection)
        size = _database_size(connection)

    if evicted:
        log.warning(
            "journal %s exceeded max_size %d bytes; deleted the %d oldest finished "
            "deliveries, now %d bytes",
            name,
            max_size,
            evicted,
            size,
        )
    if size > max_size:
        log.error(
            "journal %s takes %d bytes with no finished deliveries left, more than "
            "max_size %d; no unfinished delivery was deleted, raise max_size or "
            "find out why deliveries do not finish",
            name,
            size,
            max_size,
        )
    return PruneResult(expired=expired, evicted=evicted, size_bytes=size)


def _stats(connection: sqlite3.Connection, path: Path) -> JournalStats:
    counts = dict.fromkeys(State, 0)
    for state, count in connection.execute(
        "SELECT state, count(*) FROM deliveries GROUP BY state"
    ):
        counts[State(state)] = count
    jobs: int = connection.execute("SELECT count(*) FROM jobs").fetchone()[0]

    size = 0
    for file in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            size += file.stat().st_size
    return JournalStats(
        size_bytes=size,
        queued=counts[State.QUEUED],
        running=counts[State.RUNNING],
        finished=counts[State.FINISHED],
        jobs=jobs,
    )


def _last_received_at(connection: sqlite3.Connection) -> float | None:
    row = connection.execute(
        "SELECT value FROM meta WHERE key = 'last_received_at'"
    ).fetchone()
    return None if row is None else float(row[0])


def _known(connection: sqlite3.Connection, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), _MAX_PARAMETERS):
        chunk = ids[start : start + _MAX_PARAMETERS]
        placeholders = ", ".join("?" * len(chunk))
        found.update(
            row[0]
            for row in connection.execute(
                f"SELECT id FROM deliveries WHERE id IN ({placeholders})", chunk
            )
        )
    return found
