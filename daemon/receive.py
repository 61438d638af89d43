"""One-shot commands: ``ghappd receive`` and ``ghappd redeliver``.

``receive`` runs one payload through routing and the jobs against the
configured GitHub, without the intake, lanes or durable journal, for
trying a rule. ``redeliver`` asks GitHub for deliveries that failed and
that the journal never recorded; it reads the journal without changing it,
so it is safe while the daemon runs.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import trio

from daemon import routing
from daemon.config import Config
from daemon.delivery import Delivery
from daemon.errors import JournalError
from daemon.github.app import AppAuth, load_private_key
from daemon.github.client import GitHubClient
from daemon.jobs.execute import JobExecutor, JobSettings, config_folders
from daemon.jobs.workspace import WorkspaceRoot
from daemon.journal import MemoryJournal
from daemon.redeliver import redeliver_missed

__all__ = ["receive", "redeliver"]

log = logging.getLogger(__name__)


def _client(config: Config) -> GitHubClient:
    key = load_private_key(
        config.app.private_key.reveal(), source=str(config.app.private_key_file)
    )
    auth = AppAuth(
        app_id=config.app.id, private_key=key, client_id=config.app.client_id
    )
    return GitHubClient(
        api_url=config.app.api_url,
        app=auth,
        max_concurrent_requests=config.github.max_concurrent_requests,
        max_rate_limit_wait=config.github.max_rate_limit_wait,
        max_attempts=config.github.max_retries + 1,
        timeout=config.github.request_timeout,
    )


async def receive(config: Config, delivery: Delivery) -> int:
    """Run the jobs ``delivery`` matches, one after another; return 0 or 1.

    Returns 1 when no rule matched, so a typo in a rule shows.
    """
    client = _client(config)
    journal = MemoryJournal()
    # A workspace root of its own, because a running daemon holds the lock
    # of the configured one.
    with tempfile.TemporaryDirectory(prefix="ghappd-receive-") as scratch:
        root = WorkspaceRoot(root=Path(scratch) / "workspaces")
        async with client, journal, root as workspaces:
            identity = await client.verify_app()
            result = routing.route(delivery, config.jobs, app_slug=identity.slug)
            for reason in result.reasons:
                print(f"not run: {reason}")
            if not result.jobs:
                print(f"no rule runs for {delivery.event}.{delivery.action or ''}")
                return 1
            await journal.record(delivery)
            executor = JobExecutor(
                client=client,
                journal=journal,
                workspaces=workspaces,
                settings=lambda: JobSettings(
                    api_url=config.app.api_url,
                    git_url=config.app.git_url,
                    runner=config.runner,
                    hidden_paths=config_folders(config),
                ),
            )
            for job in result.jobs:
                target = job.sha or job.fetch_ref
                print(f"running {job.name} on {job.repository} {target}")
                await executor.queued(job, ahead=0)
                await executor.run(job)
                for record in await journal.jobs(delivery.id):
                    if record.job_name == job.name:
                        print(f"{job.name}: {record.conclusion}")
    return 0


class _JournalReader:
    """Read-only access to a SQLite journal for the missed-delivery scan."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _query(
        self, sql: str, parameters: Iterable[object] = ()
    ) -> list[tuple[object, ...]]:
        try:
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise JournalError(
                f"cannot open journal {self.path!r} read-only: {exc}"
            ) from exc
        try:
            return connection.execute(sql, tuple(parameters)).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read journal {self.path!r}: {exc}") from exc
        finally:
            connection.close()

    async def known(self, ids: Iterable[str]) -> set[str]:
        wanted = list(ids)
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = await trio.to_thread.run_sync(
                self._query, f"SELECT id FROM deliveries WHERE id IN ({marks})", chunk
            )
            found.update(str(row[0]) for row in rows)
        return found

    async def last_received_at(self) -> float | None:
        return None


async def redeliver(config: Config, *, since: float) -> int:
    """Ask GitHub to redeliver failed deliveries of the last ``since`` seconds."""
    reader = _JournalReader(str(config.journal.path))
    async with _client(config) as client:
        asked = await redeliver_missed(
            client=client,
            journal=reader,
            window=since,
            since=time.time() - since,
        )
    return len(asked)
