"""The whole daemon, end to end: signed webhook in, check run out."""

from __future__ import annotations

from fixtures_daemon import StartDaemon, pull_request_payload
from fixtures_emulator import ACCOUNT, INSTALLATION_ID

from daemon.sandbox import Emulator

REPO = f"{ACCOUNT}/hello"
LINT_ERRORS = "import os\n\n\ndef greet():\n    return undefined_name\n"
RUFF = ["ruff", "check", "--no-cache", "--output-format=github", "."]


def make_pull_request(emulator: Emulator, files: dict[str, str]) -> str:
    emulator.create_repository(REPO, {"README.md": "hello\n"})
    head = emulator.commit(REPO, files, branch="feature")
    emulator.pull_ref(REPO, 7, head)
    return head


async def test_pull_request_gets_check_run(
    emulator: Emulator, start_daemon: StartDaemon
) -> None:
    head = make_pull_request(emulator, {"app.py": LINT_ERRORS})
    harness = await start_daemon(
        jobs=[{"name": "ruff", "on": ["pull_request.opened"], "command": RUFF}]
    )
    payload = pull_request_payload(
        repository=REPO, number=7, head_sha=head, installation_id=INSTALLATION_ID
    )

    response = await harness.post("pull_request", payload, delivery_id="e2e-1")

    assert response.status_code == 202
    # Annotations follow the completion in further updates; the lane
    # closes once the job is done with them.
    await harness.wait_until(lambda: harness.completed("ruff"), what="check run")
    await harness.wait_until(lambda: not harness.daemon.dispatcher.lanes, what="lane")
    [run] = harness.check_runs("ruff")
    assert run["head_sha"] == head
    assert run["external_id"] == "e2e-1:ruff"
    assert run["conclusion"] == "failure"
    codes = sorted(a["message"].split()[1] for a in run["annotations"])
    assert codes == ["F401", "F821"]
    assert {a["path"] for a in run["annotations"]} == {"app.py"}
    assert "ruff check" in run["output"]["summary"]


async def test_workspace_removed_after_job(
    emulator: Emulator, start_daemon: StartDaemon
) -> None:
    head = make_pull_request(emulator, {"ok.py": "x = 1\n"})
    harness = await start_daemon(
        jobs=[{"name": "true", "on": ["pull_request"], "command": ["true"]}]
    )
    payload = pull_request_payload(
        repository=REPO, number=7, head_sha=head, installation_id=INSTALLATION_ID
    )

    await harness.post("pull_request", payload)

    await harness.wait_until(lambda: harness.completed("true"), what="check run")
    [run] = harness.completed("true")
    assert run["conclusion"] == "success"
    await harness.wait_until(lambda: not harness.daemon.dispatcher.lanes, what="lane")
    root = harness.daemon.config.workspaces.root
    assert [p.name for p in root.iterdir()] == [".lock"]


async def test_check_run_queued_before_it_runs(
    emulator: Emulator, start_daemon: StartDaemon
) -> None:
    head = make_pull_request(emulator, {"ok.py": "x = 1\n"})
    harness = await start_daemon(
        jobs=[{"name": "true", "on": ["pull_request"], "command": ["true"]}]
    )
    payload = pull_request_payload(
        repository=REPO, number=7, head_sha=head, installation_id=INSTALLATION_ID
    )

    await harness.post("pull_request", payload)

    await harness.wait_until(lambda: harness.completed("true"), what="check run")
    statuses = [
        request.json().get("status")
        for request in emulator.requests
        if request.path.endswith("/check-runs") or "/check-runs/" in request.path
        if request.method in ("POST", "PATCH")
    ]
    assert statuses[0] == "queued"
    assert "in_progress" in statuses
    assert statuses[-1] == "completed"
    assert len(harness.check_runs("true")) == 1
