"""Fixtures that run the whole daemon in-process against the emulator.

``start_daemon(jobs=[...], **sections)`` writes a configuration file,
starts :class:`daemon.supervisor.Daemon` in the test's nursery and returns
a :class:`Harness` that signs and posts webhooks and waits on the
emulator's records. Everything talks over real HTTP on 127.0.0.1, and jobs
fetch over git smart HTTP from the emulator.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemon.config import load_config
from daemon.sandbox import Emulator
from daemon.supervisor import Daemon

FIXTURES = Path(__file__).parent / "fixtures" / "webhooks"
WEBHOOK_SECRET = "test-webhook-secret"
# The longest a test waits for the daemon to act, in seconds. Waits end as
# soon as their condition holds; this bound only stops a broken test.
WAIT = 60.0


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()
        )
        return "{" + items + "}"
    raise TypeError(value)


def write_config(
    directory: Path,
    *,
    emulator: Emulator,
    key_file: Path,
    jobs: Iterable[Mapping[str, Any]],
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a configuration for the emulator; ``sections`` override tables."""
    (directory / "webhook-secret").write_text(WEBHOOK_SECRET)
    tables: dict[str, dict[str, Any]] = {
        "app": {
            "id": emulator.app_id,
            "private_key_file": str(key_file),
            "webhook_secret_files": ["webhook-secret"],
            "api_url": emulator.api_url,
            "git_url": emulator.git_url,
        },
        "server": {"listen": ["127.0.0.1:0"]},
        "queue": {"shutdown_grace": "5s"},
        "github": {"max_retries": 2},
        "runner": {"kill_grace": "2s", "git_timeout": "30s"},
        "workspaces": {"root": str(directory / "workspaces")},
        "journal": {
            "path": str(directory / "journal.sqlite3"),
            "redeliver_missed": False,
        },
        "logging": {"format": "console", "level": "debug"},
    }
    for name, values in (sections or {}).items():
        tables.setdefault(name, {}).update(values)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    for job in jobs:
        lines.append("[[jobs]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in job.items()]
        lines.append("")
    path = directory / "config.toml"
    path.write_text("\n".join(lines))
    return path


def sign(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def fixture_payload(event: str, action: str | None = None) -> dict[str, Any]:
    """Return a deep copy of the first fixture payload of ``event`` (and action)."""
    payloads = json.loads((FIXTURES / f"{event}.json").read_text())
    for payload in payloads:
        if action is None or payload.get("action") == action:
            return copy.deepcopy(payload)
    raise LookupError(f"no {event}.{action} fixture")


def pull_request_payload(
    *,
    repository: str,
    number: int,
    head_sha: str,
    installation_id: int,
    action: str = "opened",
    head_repository: str | None = None,
    head_ref: str = "feature",
) -> dict[str, Any]:
    """Return the real ``pull_request.opened`` fixture aimed at a test repo."""
    payload = fixture_payload("pull_request", "opened")
    payload["action"] = action
    payload["installation"] = {"id": installation_id}
    payload["number"] = number
    pull = payload["pull_request"]
    pull["number"] = number
    pull["draft"] = False
    pull["head"]["sha"] = head_sha
    pull["head"]["ref"] = head_ref
    pull["base"]["ref"] = "main"
    owner, name = repository.split("/")
    payload["repository"]["full_name"] = repository
    payload["repository"]["name"] = name
    payload["repository"]["owner"]["login"] = owner
    payload["repository"]["default_branch"] = "main"
    pull["base"]["repo"]["full_name"] = repository
    pull["head"]["repo"]["full_name"] = head_repository or repository
    return payload


@dataclass
class Harness:
    emulator: Emulator
    daemon: Daemon
    url: str
    directory: Path
    http: httpx.AsyncClient
    posted: list[str] = field(default_factory=list)

    @property
    def webhook_url(self) -> str:
        return self.url + self.daemon.config.server.webhook_path

    async def post(
        self,
        event: str,
        payload: Mapping[str, Any],
        *,
        delivery_id: str | None = None,
        secret: str = WEBHOOK_SECRET,
    ) -> httpx.Response:
        body = json.dumps(payload).encode()
        delivery_id = delivery_id or str(uuid.uuid4())
        self.posted.append(delivery_id)
        return await self.http.post(
            self.webhook_url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": event,
                "X-GitHub-Delivery": delivery_id,
                "X-Hub-Signature-256": sign(body, secret),
            },
        )

    async def wait_until(
        self, condition: Callable[[], bool], *, timeout: float = WAIT, what: str = ""
    ) -> None:
        """Wait until ``condition()`` holds, checking every 20 ms."""
        with trio.move_on_after(timeout):
            while not condition():
                await trio.sleep(0.02)
            return
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what or condition}"
        )

    def check_runs(self, name: str | None = None) -> list[dict[str, Any]]:
        runs = list(self.emulator.check_runs.values())
        return [run for run in runs if name is None or run["name"] == name]

    def completed(self, name: str | None = None) -> list[dict[str, Any]]:
        return [run for run in self.check_runs(name) if run["status"] == "completed"]

    async def ready(self) -> None:
        await self.wait_until(lambda: self.daemon.readiness.ready, what="readiness")


StartDaemon = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_daemon(
    nursery: trio.Nursery, emulator: Emulator, app_key_file: Path, tmp_path: Path
) -> StartDaemon:
    """Return a function that starts a daemon with the given job rules."""

    async def start(
        *,
        jobs: Iterable[Mapping[str, Any]],
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        directory: Path | None = None,
    ) -> Harness:
        directory = directory or tmp_path / "daemon"
        directory.mkdir(exist_ok=True)
        config = load_config(
            write_config(
                directory,
                emulator=emulator,
                key_file=app_key_file,
                jobs=jobs,
                sections=sections,
            ),
            environ={},
        )
        daemon = Daemon(config, environ={})
        urls = await nursery.start(daemon.run)
        http = httpx.AsyncClient(timeout=30)
        harness = Harness(
            emulator=emulator,
            daemon=daemon,
            url=urls[0],
            directory=directory,
            http=http,
        )
        await harness.ready()
        return harness

    return start
