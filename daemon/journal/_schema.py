"""Open a journal database file: checks, schema creation and pragmas."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from daemon.errors import JournalError

__all__ = ["SCHEMA_VERSION", "open_database"]

#: The ``PRAGMA user_version`` this code writes and reads.
SCHEMA_VERSION = 1

# How long a statement waits for a lock held by another connection (for
# example an operator's sqlite3 shell) before it fails, in milliseconds.
_BUSY_TIMEOUT_MS = 10_000

# The WAL file is truncated back to this size after a checkpoint, in bytes.
_WAL_SIZE_LIMIT = 8 * 1024 * 1024

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


def make_directory(path: Path) -> None:
    """Create the journal's folder (mode 0700) if it is missing."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise JournalError(
            f"journal file {str(path)!r}: creating the directory "
            f"{str(path.parent)!r} failed ({exc.strerror}); make it a directory "
            f"that the ghappd user can write, or choose another path"
        ) from exc


def open_database(path: Path) -> tuple[sqlite3.Connection, int]:
    """Open the journal at ``path``, creating it if needed.

    Return the connection and the number of deliveries queued again.
    """
    name = str(path)
    make_directory(path)

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
    # power failure or an operating system crash (Android's reference for
    # SQLiteDatabase.SYNC_MODE_NORMAL, which restates SQLite's "PRAGMA
    # synchronous" page). The intake sends 202 only after the commit, so
    # FULL syncs the WAL at every commit, and group commit shares that fsync
    # among concurrent record() calls.
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
