"""Benchmark Journal.record() on SqliteJournal against MemoryJournal.

Run ``.venv/bin/python bench/journal.py``. For each concurrency level in
``--writers`` (default 1, 16 and 64 concurrent tasks), each journal kind
records ``--count`` deliveries (default 5,000) split among that many
writer tasks, every delivery with its own id. The bodies are the real
``pull_request`` payloads from tests/fixtures/webhooks, in turn, unless
``--small`` replaces them with a 200-byte body. Each SQLite run uses a
new file under ``--dir`` (default: a temporary directory, deleted at the
end), so results depend on the file system and disk under it.

It prints records per second for both journals, the ratio
memory / sqlite, and for SQLite the number of commits and the mean number
of record() calls each commit carried.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.delivery import Delivery  # noqa: E402
from daemon.journal import (  # noqa: E402
    Journal,
    JournalStatistics,
    MemoryJournal,
    SqliteJournal,
)

FIXTURE = REPO / "tests" / "fixtures" / "webhooks" / "pull_request.json"


@dataclass(frozen=True)
class Run:
    seconds: float
    statistics: JournalStatistics

    def rate(self, count: int) -> float:
        return count / self.seconds


def make_deliveries(count: int, *, small: bool) -> list[Delivery]:
    """Build ``count`` deliveries with distinct ids and realistic bodies."""
    if small:
        payloads = [{"action": "opened", "installation": {"id": 1}, "n": "x" * 150}]
    else:
        payloads = json.loads(FIXTURE.read_text())
    bodies = [json.dumps(payload).encode() for payload in payloads]
    now = time.time()
    return [
        Delivery(
            id=f"bench-{number:06}",
            event="pull_request",
            payload=payloads[number % len(payloads)],
            body=bodies[number % len(bodies)],
            received_at=now + number / 1000,
        )
        for number in range(count)
    ]


async def measure(
    open_journal: Callable[[], Journal], deliveries: list[Delivery], writers: int
) -> Run:
    """Record every delivery with ``writers`` concurrent tasks and time it."""

    async def write(journal: Journal, share: list[Delivery]) -> None:
        for delivery in share:
            await journal.record(delivery)

    async with open_journal() as journal:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for writer in range(writers):
                nursery.start_soon(write, journal, deliveries[writer::writers])
        seconds = time.perf_counter() - start
        statistics = journal.statistics()
        stats = await journal.stats()
    if stats.queued != len(deliveries):
        raise RuntimeError(f"expected {len(deliveries)} queued, found {stats.queued}")
    return Run(seconds, statistics)


async def main(arguments: argparse.Namespace, directory: Path) -> None:
    deliveries = make_deliveries(arguments.count, small=arguments.small)
    mean_body = sum(len(delivery.body) for delivery in deliveries) / len(deliveries)
    print(
        f"{arguments.count} records per run, mean body {mean_body:.0f} bytes, "
        f"files under {directory}"
    )
    print(
        f"{'writers':>7} {'memory rec/s':>13} {'sqlite rec/s':>13} "
        f"{'memory/sqlite':>13} {'commits':>8} {'per commit':>10}"
    )

    for writers in arguments.writers:
        memory = await measure(MemoryJournal, deliveries, writers)
        path = directory / f"journal-{writers}.db"
        open_sqlite = functools.partial(SqliteJournal, path=path)
        sqlite = await measure(open_sqlite, deliveries, writers)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

        memory_rate = memory.rate(arguments.count)
        sqlite_rate = sqlite.rate(arguments.count)
        commits = sqlite.statistics.commits
        per_commit = sqlite.statistics.operations / max(commits, 1)
        print(
            f"{writers:>7} {memory_rate:>13.0f} {sqlite_rate:>13.0f} "
            f"{memory_rate / sqlite_rate:>13.1f} {commits:>8} {per_commit:>10.1f}"
        )


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count",
        type=int,
        default=5000,
        help="records per journal and concurrency level (default %(default)s)",
    )
    parser.add_argument(
        "--writers",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 16, 64],
        help="comma-separated numbers of concurrent writer tasks (default 1,16,64)",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="record a 200-byte body instead of the pull_request fixtures"
        " (default: the fixtures, 25 kB on average)",
    )
    parser.add_argument(
        "--dir", type=Path, help="directory for the SQLite files (default: temporary)"
    )
    arguments = parser.parse_args()
    if arguments.count < 1 or min(arguments.writers) < 1:
        parser.error("--count and every --writers level must be at least 1")
    return arguments


if __name__ == "__main__":
    arguments = parse_arguments()
    if arguments.dir is not None:
        arguments.dir.mkdir(parents=True, exist_ok=True)
        trio.run(main, arguments, arguments.dir)
    else:
        with tempfile.TemporaryDirectory(prefix="ghappd-bench-") as directory:
            trio.run(main, arguments, Path(directory))
