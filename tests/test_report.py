"""The reporter's check run updates, against a fake GitHub client.

The fake records every request and fails the ones a test names, so the
order and contents of the requests are checked without a server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemon.config import JobRule
from daemon.delivery import Delivery
from daemon.errors import GitHubError
from daemon.jobs.report import Reporter
from daemon.journal import MemoryJournal
from daemon.routing import JobSpec, route

SHA = "a" * 40
RULE = JobRule(name="lint", on=("pull_request",), command=("true",))


@dataclass
class FakeClient:
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    # Indexes (0-based, over all requests) that raise a 502.
    failing: set[int] = field(default_factory=set)

    async def installation_request(
        self,
        installation_id: int,
        method: str,
        path: str,
        *,
        json: Any = None,
        idempotent: bool | None = None,
    ) -> Any:
        index = len(self.requests)
        self.requests.append((method, path, json))
        if index in self.failing:
            raise GitHubError(
                f"GitHub answered {method} {path} with 502",
                status_code=502,
                installation_id=installation_id,
                method=method,
                path=path,
            )
        if method == "POST":
            return {"id": 99}
        return {}

    async def paginate(self, path: str, **kwargs: Any) -> AsyncIterator[Any]:
        for item in ():
            yield item


def make_job() -> JobSpec:
    payload = {
        "action": "opened",
        "number": 3,
        "installation": {"id": 1},
        "repository": {"full_name": "octo-org/hello", "default_branch": "main"},
        "sender": {"login": "octocat", "type": "User"},
        "pull_request": {"number": 3, "head": {"sha": SHA}},
    }
    delivery = Delivery(
        id="d1",
        event="pull_request",
        payload=payload,
        body=json.dumps(payload).encode(),
        received_at=0.0,
    )
    [job] = route(delivery, [RULE], app_slug=None).jobs
    return job


def annotations(count: int) -> list[dict[str, str | int]]:
    return [
        {
            "path": "a.py",
            "start_line": n + 1,
            "end_line": n + 1,
            "annotation_level": "warning",
            "message": f"note {n}",
        }
        for n in range(count)
    ]


@pytest.fixture
async def journal() -> AsyncIterator[MemoryJournal]:
    async with MemoryJournal() as journal:
        job = make_job()
        await journal.record(job.delivery)
        yield journal


async def test_completion_carries_no_annotations(journal: MemoryJournal) -> None:
    client = FakeClient()
    reporter = Reporter(client=client, journal=journal)  # type: ignore[arg-type]

    await reporter.complete(
        make_job(),
        conclusion="success",
        title="Passed",
        summary="ok",
        annotations=annotations(120),
    )

    [create, *updates] = client.requests
    assert create[0] == "POST"
    assert create[2]["status"] == "completed"
    assert "annotations" not in create[2]["output"]
    sizes = [len(body["output"]["annotations"]) for _, _, body in updates]
    assert sizes == [50, 50, 20]


async def test_lost_annotation_batch_keeps_conclusion(
    journal: MemoryJournal, caplog: pytest.LogCaptureFixture
) -> None:
    # Request 0 creates the completed check run, 1 and 2 are batches.
    client = FakeClient(failing={2})
    reporter = Reporter(client=client, journal=journal)  # type: ignore[arg-type]
    job = make_job()

    await reporter.complete(
        job,
        conclusion="success",
        title="Passed",
        summary="ok",
        annotations=annotations(120),
    )

    assert len(client.requests) == 3
    [record] = await journal.jobs(job.delivery.id)
    assert record.conclusion == "success"
    assert "annotations 51 to 120 of 120 not sent" in caplog.text
