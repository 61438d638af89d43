"""Tests of the journal: SqliteJournal on real files, MemoryJournal alongside."""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from daemon.delivery import Delivery
from daemon.errors import JournalError
from daemon.journal import (
    SCHEMA_VERSION,
    Journal,
    MemoryJournal,
    RecordOutcome,
    SqliteJournal,
    State,
)
from daemon.journal._writer import GroupCommitWriter


def make_delivery(
    delivery_id: str,
    *,
    installation_id: int | None = 1,
    received_at: float | None = None,
    padding: int = 0,
    form: bool = False,
) -> Delivery:
    payload: dict[str, object] = {"action": "opened", "number": 7}
    if installation_id is not None:
        payload["installation"] = {"id": installation_id}
    if padding:
        payload["padding"] = "x" * padding
    document = json.dumps(payload)
    if form:
        body = urllib.parse.urlencode({"payload": document}).encode()
        content_type = "application/x-www-form-urlencoded"
    else:
        body = document.encode()
        content_type = "application/json"
    return Delivery(
        id=delivery_id,
        event="pull_request",
        payload=payload,
        body=body,
        received_at=time.time() if received_at is None else received_at,
        content_type=content_type,
    )


def file_error(path: Path, rest: str) -> str:
    """Return a pattern for a message that starts with the file's name."""
    return "^journal file " + re.escape(repr(str(path))) + rest


@pytest.fixture(params=["sqlite", "memory"])
async def journal(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Journal]:
    implementation: Journal
    if request.param == "sqlite":
        implementation = SqliteJournal(path=tmp_path / "journal.db")
    else:
        implementation = MemoryJournal()
    async with implementation:
        yield implementation


# Record, duplicate and rerun semantics, for both implementations.


async def test_record_new_delivery(journal: Journal) -> None:
    result = await journal.record(make_delivery("a"))
    assert result.outcome is RecordOutcome.NEW
    assert result.attempts == 1
    assert result.state is State.QUEUED
    assert result.accepted


async def test_record_queued_is_duplicate(journal: Journal) -> None:
    first = await journal.record(make_delivery("a"))
    again = await journal.record(make_delivery("a"))
    assert again.outcome is RecordOutcome.DUPLICATE
    assert again.seq == first.seq
    assert again.attempts == 1
    assert not again.accepted
    assert len(await journal.unfinished()) == 1


async def test_record_running_is_duplicate(journal: Journal) -> None:
    await journal.record(make_delivery("a"))
    await journal.mark_running("a")
    again = await journal.record(make_delivery("a"))
    assert again.outcome is RecordOutcome.DUPLICATE
    assert again.state is State.RUNNING


async def test_record_finished_is_rerun(journal: Journal) -> None:
    first = await journal.record(make_delivery("a"))
    await journal.record(make_delivery("b"))
    await journal.set_job(
        "a", "lint", state="finished", conclusion="success", report_id=99
    )
    await journal.mark_finished("a")

    rerun = await journal.record(make_delivery("a"))

    assert rerun.outcome is RecordOutcome.RERUN
    assert rerun.attempts == 2
    assert rerun.seq > first.seq
    entries = await journal.unfinished()
    assert [entry.delivery.id for entry in entries] == ["b", "a"]
    assert entries[1].attempts == 2
    jobs = await journal.jobs("a")
    assert [job.report_id for job in jobs] == [99]


async def test_set_job_keeps_report_id(journal: Journal) -> None:
    await journal.record(make_delivery("a"))
    await journal.set_job("a", "lint", state="queued", report_id=5)
    await journal.set_job("a", "tests", state="queued")
    await journal.set_job("a", "lint", state=State.FINISHED, conclusion="failure")
    await journal.set_job("a", "lint", state="queued")

    jobs = await journal.jobs("a")

    assert [job.job_name for job in jobs] == ["lint", "tests"]
    assert jobs[0].state is State.QUEUED
    assert jobs[0].conclusion is None
    assert jobs[0].report_id == 5
    assert jobs[1].report_id is None


async def test_set_job_rejects_invalid_state(journal: Journal) -> None:
    await journal.record(make_delivery("a"))
    with pytest.raises(ValueError, match=r"^'done' is not a valid State$"):
        await journal.set_job("a", "lint", state="done")


async def test_unknown_delivery_raises_key_error(journal: Journal) -> None:
    with pytest.raises(KeyError, match=r"^\"delivery 'nope' is not in the journal\"$"):
        await journal.mark_running("nope")
    with pytest.raises(KeyError, match=r"^\"delivery 'nope' is not in the journal\"$"):
        await journal.mark_finished("nope")
    with pytest.raises(KeyError, match=r"^\"delivery 'nope' is not in the journal\"$"):
        await journal.set_job("nope", "lint", state="queued")


async def test_unfinished_rebuilds_delivery(journal: Journal) -> None:
    original = make_delivery("a", installation_id=42, received_at=1000.5)
    await journal.record(original)

    [entry] = await journal.unfinished()

    assert entry.delivery == original
    assert entry.delivery.payload == original.payload
    assert entry.delivery.installation_id == 42
    assert entry.delivery.action == "opened"


async def test_form_body_round_trip(journal: Journal) -> None:
    original = make_delivery("a", form=True)
    await journal.record(original)

    [entry] = await journal.unfinished()

    assert entry.delivery.body == original.body
    assert entry.delivery.payload == original.payload
    assert entry.delivery.content_type == "application/x-www-form-urlencoded"


async def test_pending_pages_one_installation(journal: Journal) -> None:
    for number in range(10):
        await journal.record(make_delivery(f"one-{number}", installation_id=1))
        await journal.record(make_delivery(f"two-{number}", installation_id=2))
    await journal.record(make_delivery("none-0", installation_id=None))
    await journal.mark_running("one-0")
    await journal.mark_finished("one-5")

    seen = []
    after_seq = 0
    while page := await journal.pending(1, after_seq=after_seq, limit=3):
        assert len(page) <= 3
        seen.extend(entry.delivery.id for entry in page)
        after_seq = page[-1].seq

    expected = [f"one-{number}" for number in (1, 2, 3, 4, 6, 7, 8, 9)]
    assert seen == expected
    none_page = await journal.pending(None, after_seq=0, limit=10)
    assert [entry.delivery.id for entry in none_page] == ["none-0"]


async def test_pending_rejects_zero_limit(journal: Journal) -> None:
    with pytest.raises(ValueError, match=r"^limit must be positive, not 0$"):
        await journal.pending(1, after_seq=0, limit=0)


async def test_prune_by_age_keeps_unfinished(journal: Journal) -> None:
    old = time.time() - 7200
    await journal.record(make_delivery("old-finished", received_at=old))
    await journal.record(make_delivery("old-queued", received_at=old))
    await journal.record(make_delivery("old-running", received_at=old))
    await journal.record(make_delivery("new-finished"))
    await journal.set_job("old-finished", "lint", state="finished")
    await journal.mark_finished("old-finished")
    await journal.mark_running("old-running")
    await journal.mark_finished("new-finished")

    result = await journal.prune(older_than=3600)

    assert result.expired == 1
    assert result.evicted == 0
    remaining = await journal.known(
        ["old-finished", "old-queued", "old-running", "new-finished"]
    )
    assert remaining == {"old-queued", "old-running", "new-finished"}
    assert await journal.jobs("old-finished") == []


async def test_rerun_after_prune_is_new(journal: Journal) -> None:
    await journal.record(make_delivery("a", received_at=time.time() - 7200))
    await journal.mark_finished("a")
    await journal.prune(older_than=3600)

    result = await journal.record(make_delivery("a"))

    assert result.outcome is RecordOutcome.NEW


async def test_last_received_at_survives_prune(journal: Journal) -> None:
    assert await journal.last_received_at() is None
    await journal.record(make_delivery("b", received_at=2000.0))
    await journal.record(make_delivery("a", received_at=1000.0))
    await journal.mark_finished("a")
    await journal.mark_finished("b")
    await journal.prune(older_than=0)

    assert await journal.known(["a", "b"]) == set()
    assert await journal.last_received_at() == 2000.0


async def test_known_returns_stored_ids(journal: Journal) -> None:
    for number in range(0, 1200, 2):
        await journal.record(make_delivery(f"d{number}"))
    await journal.mark_finished("d0")

    found = await journal.known(f"d{number}" for number in range(1200))

    assert len(found) == 600
    assert "d0" in found
    assert "d1" not in found
    assert "d1198" in found


async def test_stats_counts_states(journal: Journal) -> None:
    for delivery_id in "abcd":
        await journal.record(make_delivery(delivery_id))
    await journal.mark_running("b")
    await journal.mark_finished("c")
    await journal.mark_finished("d")
    await journal.set_job("b", "lint", state="running")

    stats = await journal.stats()

    assert stats.queued == 1
    assert stats.running == 1
    assert stats.finished == 2
    assert stats.jobs == 1
    assert stats.size_bytes > 0


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_prune_by_size_keeps_unfinished(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    max_size = 200 * 1024
    bounded: Journal
    if kind == "sqlite":
        bounded = SqliteJournal(path=tmp_path / "journal.db", max_size=max_size)
    else:
        bounded = MemoryJournal(max_size=max_size)
    ids = [f"d{number:03}" for number in range(100)]
    async with bounded:
        for delivery_id in ids:
            await bounded.record(make_delivery(delivery_id, padding=8000))
        for delivery_id in ids[:90]:
            await bounded.mark_finished(delivery_id)

        with caplog.at_level(logging.WARNING, logger="daemon.journal"):
            result = await bounded.prune(older_than=86400)
        remaining = await bounded.known(ids)
        stats = await bounded.stats()

    assert result.expired == 0
    assert result.evicted > 0
    assert result.size_bytes <= max_size
    assert set(ids[90:]) <= remaining
    assert ids[0] not in remaining
    assert ids[89] in remaining
    kept_finished = sorted(remaining - set(ids[90:]))
    assert kept_finished == ids[90 - len(kept_finished) : 90]
    assert stats.queued == 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "exceeded max_size" in warnings[0].getMessage()


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_prune_unfinished_over_size_logs(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    max_size = 50 * 1024
    bounded: Journal
    if kind == "sqlite":
        bounded = SqliteJournal(path=tmp_path / "journal.db", max_size=max_size)
    else:
        bounded = MemoryJournal(max_size=max_size)
    async with bounded:
        for number in range(20):
            await bounded.record(make_delivery(f"d{number}", padding=8000))
        for number in range(10):
            await bounded.mark_finished(f"d{number}")

        with caplog.at_level(logging.WARNING, logger="daemon.journal"):
            result = await bounded.prune(older_than=86400)
        stats = await bounded.stats()

    assert result.evicted == 10
    assert stats.finished == 0
    assert stats.queued == 10
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "no unfinished delivery was deleted" in errors[0].getMessage()


# Durability across closing and reopening.


async def test_dedup_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteJournal(path=path) as journal:
        await journal.record(make_delivery("queued"))
        await journal.record(make_delivery("finished"))
        await journal.mark_finished("finished")

    async with SqliteJournal(path=path) as journal:
        duplicate = await journal.record(make_delivery("queued"))
        rerun = await journal.record(make_delivery("finished"))

    assert duplicate.outcome is RecordOutcome.DUPLICATE
    assert rerun.outcome is RecordOutcome.RERUN


async def test_unfinished_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteJournal(path=path) as journal:
        for delivery_id in ["first", "second", "third", "fourth"]:
            await journal.record(make_delivery(delivery_id))
        await journal.mark_running("second")
        await journal.mark_finished("third")
        await journal.set_job("second", "lint", state="running", report_id=12)

    async with SqliteJournal(path=path) as journal:
        entries = await journal.unfinished()
        jobs = await journal.jobs("second")

    assert [entry.delivery.id for entry in entries] == ["first", "second", "fourth"]
    assert [entry.state for entry in entries] == [State.QUEUED] * 3
    assert entries[0].seq < entries[1].seq < entries[2].seq
    assert jobs[0].report_id == 12


async def test_seq_never_reused_after_prune(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteJournal(path=path) as journal:
        last = await journal.record(make_delivery("a"))
        await journal.mark_finished("a")
        await journal.prune(older_than=0)

    async with SqliteJournal(path=path) as journal:
        following = await journal.record(make_delivery("b"))

    assert following.seq > last.seq


async def test_undecodable_row_marked_finished(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteJournal(path=path) as journal:
        await journal.record(make_delivery("good"))
        await journal.record(make_delivery("bad"))
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("UPDATE deliveries SET body = x'ff00' WHERE id = 'bad'")
    connection.close()

    async with SqliteJournal(path=path) as journal:
        entries = await journal.unfinished()
        stats = await journal.stats()

    assert [entry.delivery.id for entry in entries] == ["good"]
    assert stats.finished == 1


# Opening files that are not usable journals.


async def test_open_creates_private_directory(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ghappd" / "journal.db"
    async with SqliteJournal(path=path) as journal:
        await journal.record(make_delivery("a"))

    assert path.is_file()
    assert path.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("content", ["random", "text", "truncated"])
async def test_open_corrupt_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "journal.db"
    if content == "random":
        path.write_bytes(os.urandom(64 * 1024))
    elif content == "text":
        path.write_text("[journal]\npath = 'journal.db'\n" * 100)
    else:
        async with SqliteJournal(path=path) as journal:
            for number in range(200):
                await journal.record(make_delivery(f"d{number}", padding=2000))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    with pytest.raises(JournalError, match=file_error(path, " is not a valid SQLite")):
        await SqliteJournal(path=path).open()
    assert path.stat().st_size > 0


async def test_open_directory_in_place(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.mkdir()

    with pytest.raises(JournalError, match=file_error(path, " cannot be opened")):
        await SqliteJournal(path=path).open()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file with mode 000")
async def test_open_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteJournal(path=path):
        pass
    path.chmod(0)

    with pytest.raises(JournalError, match=file_error(path, " cannot be opened")):
        await SqliteJournal(path=path).open()


async def test_open_parent_is_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    path = tmp_path / "state" / "journal.db"

    with pytest.raises(
        JournalError, match=file_error(path, ": creating the directory ")
    ):
        await SqliteJournal(path=path).open()


async def test_open_newer_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteJournal(path=path):
        pass
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()

    with pytest.raises(JournalError, match=file_error(path, " has schema version 2,")):
        await SqliteJournal(path=path).open()


async def test_open_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (text TEXT)")
    connection.close()

    with pytest.raises(
        JournalError, match=file_error(path, " is a SQLite database but")
    ):
        await SqliteJournal(path=path).open()


async def test_open_quick_check_failure(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteJournal(path=path) as journal:
        for number in range(50):
            await journal.record(make_delivery(f"d{number}", padding=100))
    # Dropping the index from the schema table under writable_schema leaves
    # its pages behind, which quick_check reports as never used.
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA writable_schema = ON")
    connection.execute("DELETE FROM sqlite_schema WHERE name = 'deliveries_queued'")
    connection.close()

    with pytest.raises(
        JournalError, match=file_error(path, " failed PRAGMA quick_check")
    ):
        await SqliteJournal(path=path).open()


async def test_calls_after_close_raise(tmp_path: Path) -> None:
    journal = SqliteJournal(path=tmp_path / "journal.db")
    async with journal:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await journal.record(make_delivery("a"))


async def test_calls_before_open_raise(tmp_path: Path) -> None:
    journal = SqliteJournal(path=tmp_path / "journal.db")
    with pytest.raises(
        RuntimeError, match=r"^journal '.*' is not open; call open\(\)$"
    ):
        await journal.record(make_delivery("a"))


# Group commit and the trio loop.


async def test_group_commit_shares_commits(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteJournal(path=path) as journal:
        before = journal.statistics()
        # A second connection holds the write lock, so the writer thread
        # stalls on its first batch while the other calls queue up.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        results = []

        async def record(number: int) -> None:
            results.append(await journal.record(make_delivery(f"d{number}")))

        async with trio.open_nursery() as nursery:
            for number in range(200):
                nursery.start_soon(record, number)
            await trio.testing.wait_all_tasks_blocked()
            waiting = journal.statistics().waiting
            blocker.execute("ROLLBACK")
        blocker.close()
        after = journal.statistics()

    assert waiting == 200
    assert len(results) == 200
    assert all(result.outcome is RecordOutcome.NEW for result in results)
    assert after.operations - before.operations == 200
    assert after.commits - before.commits <= 2
    assert after.max_batch >= 100
    assert after.waiting == 0


async def test_loop_runs_while_writer_waits(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with SqliteJournal(path=path) as journal:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        recorded = trio.Event()
        ticks = 0

        async def record_batch() -> None:
            async with trio.open_nursery() as nursery:
                for number in range(1000):
                    nursery.start_soon(journal.record, make_delivery(f"d{number}"))
            recorded.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(record_batch)
            for _ in range(100):
                await trio.sleep(0)
                ticks += 1
            ticked_before_commit = not recorded.is_set()
            blocker.execute("ROLLBACK")
            await recorded.wait()
        blocker.close()
        stats = await journal.stats()

    assert ticks == 100
    assert ticked_before_commit
    assert stats.queued == 1000


async def test_writer_survives_failed_commit(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    # With a busy timeout of 0, BEGIN IMMEDIATE fails at once while the
    # blocker holds the write lock.
    connection = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=0
    )
    connection.execute("CREATE TABLE notes (text TEXT)")
    writer = GroupCommitWriter(connection=connection, path=str(path))
    writer.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")

    def insert(connection: sqlite3.Connection) -> int:
        connection.execute("INSERT INTO notes VALUES ('a')")
        count: int = connection.execute("SELECT count(*) FROM notes").fetchone()[0]
        return count

    try:
        with pytest.raises(
            JournalError,
            match=file_error(path, r": writing failed \(database is locked\); another"),
        ):
            await writer.submit(insert, name="inserting a note")
        blocker.execute("ROLLBACK")
        count = await writer.submit(insert, name="inserting a note")
    finally:
        blocker.close()
        await writer.stop()

    assert count == 1
    assert writer.statistics().commits == 1


async def test_failed_call_rolls_back_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("CREATE TABLE notes (text TEXT)")
    writer = GroupCommitWriter(connection=connection, path=str(path))
    writer.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    outcomes: dict[str, str] = {}

    def insert_then_fail(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO notes VALUES ('rolled back')")
        raise ValueError("invalid note")

    def insert(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO notes VALUES ('kept')")

    async def call(label: str, work: Callable[[sqlite3.Connection], None]) -> None:
        try:
            await writer.submit(work, name=label)
        except ValueError as exc:
            outcomes[label] = str(exc)
        else:
            outcomes[label] = "ok"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "first", insert)
        nursery.start_soon(call, "failing", insert_then_fail)
        nursery.start_soon(call, "last", insert)
        await trio.testing.wait_all_tasks_blocked()
        blocker.execute("ROLLBACK")
    await writer.stop()
    notes = blocker.execute("SELECT text FROM notes").fetchall()
    blocker.close()

    assert outcomes == {"first": "ok", "failing": "invalid note", "last": "ok"}
    assert notes == [("kept",), ("kept",)]


async def test_burst_read_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    writers = 50
    per_writer = 100
    seqs: dict[str, int] = {}

    async def write(writer: int) -> None:
        for number in range(per_writer):
            delivery_id = f"w{writer:02}-{number:03}"
            result = await journal.record(make_delivery(delivery_id, installation_id=7))
            seqs[delivery_id] = result.seq

    async with SqliteJournal(path=path) as journal:
        async with trio.open_nursery() as nursery:
            for writer in range(writers):
                nursery.start_soon(write, writer)

        read = []
        after_seq = 0
        while page := await journal.pending(7, after_seq=after_seq, limit=500):
            read.extend(page)
            after_seq = page[-1].seq
        commits = journal.statistics().commits

    read_seqs = [entry.seq for entry in read]
    assert len(read) == writers * per_writer
    assert read_seqs == sorted(set(read_seqs))
    assert {entry.delivery.id: entry.seq for entry in read} == seqs
    for writer in range(writers):
        prefix = f"w{writer:02}-"
        own = [
            entry.delivery.id for entry in read if entry.delivery.id.startswith(prefix)
        ]
        assert own == sorted(own)
    assert commits < writers * per_writer


async def test_close_waits_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = SqliteJournal(path=path)
    await journal.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    closed = trio.Event()

    async def close_cancelled() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await journal.close()
        closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(journal.record, make_delivery("a"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(close_cancelled)
        await trio.testing.wait_all_tasks_blocked()
        closed_while_locked = closed.is_set()
        blocker.execute("ROLLBACK")
        await closed.wait()
    stored = blocker.execute("SELECT id, state FROM deliveries").fetchall()
    blocker.close()

    assert not closed_while_locked
    assert stored == [("a", "queued")]


async def test_cancelled_record_stays_consistent(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    delivery = make_delivery("a")
    async with SqliteJournal(path=path) as journal:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        scope = trio.CancelScope()

        async def record() -> None:
            with scope:
                await journal.record(delivery)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(record)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        blocker.execute("ROLLBACK")
        blocker.close()
        await journal.stats()

    assert scope.cancelled_caught
    async with SqliteJournal(path=path) as journal:
        committed = "a" in await journal.known(["a"])
        again = await journal.record(delivery)
        unfinished = await journal.unfinished()

    expected = RecordOutcome.DUPLICATE if committed else RecordOutcome.NEW
    assert again.outcome is expected
    assert [entry.delivery.id for entry in unfinished] == ["a"]


async def test_second_open_of_same_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    async with SqliteJournal(path=path):
        in_use = r"^journal file '.*' is in use by another ghappd process"
        with pytest.raises(JournalError, match=in_use):
            await SqliteJournal(path=path).open()
    async with SqliteJournal(path=path):
        pass
