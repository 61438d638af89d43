"""The SQL behind each SqliteJournal method, run on the writer thread.

Each function takes the writer's connection inside an open transaction and
leaves committing to the writer.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

from daemon.delivery import Delivery
from daemon.journal.interface import (
    JobRecord,
    JournalEntry,
    JournalStats,
    PruneResult,
    RecordOutcome,
    RecordResult,
    State,
    decode_payload,
)

__all__ = [
    "jobs",
    "known",
    "last_received_at",
    "pending",
    "prune",
    "record",
    "set_job",
    "set_state",
    "stats",
    "unfinished",
]

log = logging.getLogger(__name__)

# Bound on the number of host parameters in one statement. SQLite before
# 3.32 allowed 999.
_MAX_PARAMETERS = 500

# The number of finished deliveries prune() considers per round when it
# enforces max_size.
_EVICTION_ROUND = 500

_ENTRY_COLUMNS = "seq, id, event, received_at, content_type, body, state, attempts"


def record(connection: sqlite3.Connection, delivery: Delivery) -> RecordResult:
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


def set_state(connection: sqlite3.Connection, delivery_id: str, state: State) -> None:
    cursor = connection.execute(
        "UPDATE deliveries SET state = ? WHERE id = ?", (state.value, delivery_id)
    )
    if cursor.rowcount == 0:
        raise KeyError(f"delivery {delivery_id!r} is not in the journal")


def set_job(
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


def jobs(connection: sqlite3.Connection, delivery_id: str) -> list[JobRecord]:
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


def unfinished(connection: sqlite3.Connection) -> list[JournalEntry]:
    return _entries(
        connection,
        f"SELECT {_ENTRY_COLUMNS} FROM deliveries"
        " WHERE state IN ('queued', 'running') ORDER BY seq",
        (),
    )


def pending(
    connection: sqlite3.Connection,
    installation_id: int | None,
    after_seq: int,
    limit: int,
) -> list[JournalEntry]:
    return _entries(
        connection,
        f"SELECT {_ENTRY_COLUMNS} FROM deliveries"
        " WHERE state = 'queued' AND installation_id IS ? AND seq > ?"
        " ORDER BY seq LIMIT ?",
        (installation_id, after_seq, limit),
    )


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


def prune(
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
            "SELECT seq, sum(size) OVER (ORDER BY seq) FROM"
            " (SELECT seq, length(body) AS size FROM deliveries"
            " WHERE state = 'finished' ORDER BY seq LIMIT ?)",
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


def stats(connection: sqlite3.Connection, path: Path) -> JournalStats:
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


def last_received_at(connection: sqlite3.Connection) -> float | None:
    row = connection.execute(
        "SELECT value FROM meta WHERE key = 'last_received_at'"
    ).fetchone()
    return None if row is None else float(row[0])


def known(connection: sqlite3.Connection, ids: list[str]) -> set[str]:
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
