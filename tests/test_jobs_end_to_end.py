"""Lanes and command jobs end to end: signed webhooks in, check runs out.

Every test runs the whole daemon in-process against the emulator over
real HTTP, with real git fetches and real command processes. The
commands are small Python scripts, below, that write what they saw to
files outside their workspace. A test that needs a job to wait makes it
wait for a gate file that the test creates, with a bounded wait in the
script.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures_daemon import (
    Harness,
    StartDaemon,
    fixture_payload,
    pull_request_payload,
)
from fixtures_emulator import ACCOUNT, INSTALLATION_ID

import daemon.jobs.execute
from daemon.routing import JobSpec
from daemon.sandbox import Emulator

REPO = f"{ACCOUNT}/hello"
OTHER_INSTALLATION = 1002
OTHER_ACCOUNT = "other-org"
OTHER_REPO = f"{OTHER_ACCOUNT}/hello"

# The job script: records start and end with the pull request number
# and head commit read from $GITHUB_EVENT_PATH, waits for the gate file
# that GATE_<number> names, and then runs its MODE. A bounded wait in the script
# keeps a broken test from hanging a job.
JOB_SCRIPT = r"""
import json, os, sys, time

out = os.environ["OUT"]
event = json.load(open(os.environ["GITHUB_EVENT_PATH"]))
pull = event.get("pull_request") or event.get("issue") or {}
tag = "%s@%s" % (pull.get("number"), os.environ["GITHUB_SHA"][:12])


def log(word):
    with open(os.path.join(out, "log"), "a") as f:
        f.write("%s %s\n" % (word, tag))


def wait_for(name, seconds=20.0):
    deadline = time.monotonic() + seconds
    path = os.path.join(out, name)
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


log("start")
print("started", tag, flush=True)
mode = os.environ.get("MODE", "")
gate = os.environ.get("GATE_%s" % pull.get("number"))
if gate:
    wait_for(gate)
if mode == "meet":
    # Make my marker, then wait for the other installation's.
    open(os.path.join(out, os.environ["ME"]), "w").close()
    if not wait_for(os.environ["PEER"]):
        print("the other installation's job never started")
        sys.exit(3)
log("end")
"""


@pytest.fixture
async def start(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture, emulator: Emulator
) -> AsyncIterator[StartDaemon]:
    """Start the daemon as ``start_daemon`` does, and check its logs after the test.

    No token the emulator minted, and no credential a request carried, may
    appear in any log record of the test.
    """
    caplog.set_level(logging.DEBUG)
    yield start_daemon
    secrets = secrets_seen(emulator)
    leaking_loggers = {
        record.name
        for record in caplog.records
        for text in [record.getMessage() + str(record.exc_text)]
        if any(secret in text for secret in secrets)
    }
    assert leaking_loggers == set()
    assert not any(secret in caplog.text for secret in secrets)


def secrets_seen(emulator: Emulator) -> set[str]:
    values = set(emulator.authority.tokens)
    for value in list(values):
        values.add(base64.b64encode(f"x-access-token:{value}".encode()).decode())
    for request in emulator.requests:
        credential = request.headers.get("authorization", "").partition(" ")[2]
        if credential:
            values.add(credential)
    return values


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text(JOB_SCRIPT)
    return path


@pytest.fixture
def base(emulator: Emulator) -> str:
    """The repository octo-org/hello with one commit on main; its sha."""
    return emulator.create_repository(REPO, {"README.md": "hello\n", "a.py": "x\n"})


def job(
    name: str, script: Path, out: Path, *, on: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    env = {"OUT": str(out), **extra.pop("env", {})}
    return {
        "name": name,
        "on": on or ["pull_request"],
        "command": [sys.executable, str(script)],
        "env": env,
        "timeout": "30s",
        **extra,
    }


def log_lines(out: Path) -> list[str]:
    path = out / "log"
    return path.read_text().splitlines() if path.exists() else []


def pr(
    number: int,
    sha: str,
    *,
    installation_id: int = INSTALLATION_ID,
    repository: str = REPO,
    action: str = "opened",
) -> dict[str, Any]:
    return pull_request_payload(
        repository=repository,
        number=number,
        head_sha=sha,
        installation_id=installation_id,
        action=action,
    )


def run_of(harness: Harness, delivery_id: str, name: str) -> dict[str, Any]:
    [run] = [
        run
        for run in harness.check_runs(name)
        if run["external_id"] == f"{delivery_id}:{name}"
    ]
    return run


def completed(harness: Harness, delivery_id: str, name: str) -> bool:
    runs = [
        run
        for run in harness.completed(name)
        if run["external_id"] == f"{delivery_id}:{name}"
    ]
    return bool(runs)


def add_other_installation(emulator: Emulator) -> str:
    emulator.add_installation(OTHER_INSTALLATION, account=OTHER_ACCOUNT)
    return emulator.create_repository(OTHER_REPO, {"README.md": "other\n"})


async def assert_daemon_healthy(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    response = await harness.http.get(harness.url + "/healthz")
    assert response.status_code == 200
    assert "token refresher stopped" not in caplog.text
    assert "dispatcher stopped" not in caplog.text


def group_alive(pgid: int) -> bool:
    """Return whether a process of group ``pgid`` still runs (zombies do not)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state not in ("Z", "X"):
            return True
    return False


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# -- ordering -------------------------------------------------------------


async def test_one_installation_runs_in_arrival_order(
    start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    harness = await start(jobs=[job("order", script, out, env={"GATE_1": "go"})])
    numbers = list(range(1, 21))

    for number in numbers:
        response = await harness.post("pull_request", pr(number, base))
        assert response.status_code == 202
    (out / "go").touch()

    await harness.wait_until(
        lambda: len(harness.completed("order")) == 20, what="20 check runs"
    )
    tags = [f"{n}@{base[:12]}" for n in numbers]
    expected = [f"{word} {tag}" for tag in tags for word in ("start", "end")]
    assert log_lines(out) == expected
    assert {run["conclusion"] for run in harness.completed("order")} == {"success"}
    await harness.wait_until(lambda: not harness.daemon.dispatcher.lanes, what="lane")
    assert harness.daemon.dispatcher.lanes_started == 1


async def test_two_installations_overlap(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    other = add_other_installation(emulator)
    harness = await start(
        jobs=[
            job(
                "meet-a",
                script,
                out,
                repositories=[REPO],
                env={"MODE": "meet", "ME": "a", "PEER": "b"},
            ),
            job(
                "meet-b",
                script,
                out,
                repositories=[OTHER_REPO],
                env={"MODE": "meet", "ME": "b", "PEER": "a"},
            ),
        ]
    )

    await harness.post("pull_request", pr(1, base))
    await harness.post(
        "pull_request",
        pr(1, other, installation_id=OTHER_INSTALLATION, repository=OTHER_REPO),
    )

    await harness.wait_until(
        lambda: len(harness.completed()) == 2, what="both check runs"
    )
    assert [run["conclusion"] for run in harness.completed("meet-a")] == ["success"]
    assert [run["conclusion"] for run in harness.completed("meet-b")] == ["success"]
    assert harness.daemon.dispatcher.lanes_started == 2


# -- isolation ------------------------------------------------------------


async def test_job_that_raises_is_reported(
    emulator: Emulator,
    start: StartDaemon,
    base: str,
    script: Path,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = add_other_installation(emulator)
    real_job_id = daemon.jobs.execute._job_id

    def job_id(spec: JobSpec) -> str:
        if spec.name == "explode":
            raise RuntimeError("fault injected for one job")
        return real_job_id(spec)

    monkeypatch.setattr(daemon.jobs.execute, "_job_id", job_id)
    harness = await start(
        jobs=[
            job("explode", script, out, repositories=[REPO]),
            job("fine", script, out),
        ]
    )

    await harness.post("pull_request", pr(1, base), delivery_id="boom")
    await harness.post(
        "pull_request",
        pr(2, other, installation_id=OTHER_INSTALLATION, repository=OTHER_REPO),
        delivery_id="other",
    )

    await harness.wait_until(lambda: len(harness.completed()) == 3, what="reports")
    run = run_of(harness, "boom", "explode")
    assert run["conclusion"] == "failure"
    assert "RuntimeError" in run["output"]["summary"]
    assert "delivery boom" in run["output"]["summary"]
    assert run_of(harness, "boom", "fine")["conclusion"] == "success"
    assert run_of(harness, "other", "fine")["conclusion"] == "success"
    await assert_daemon_healthy(harness, caplog)


async def test_timed_out_job_loses_its_whole_group(
    emulator: Emulator,
    start: StartDaemon,
    base: str,
    out: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = add_other_installation(emulator)
    # The shell leads the group; sleep is its child, the daemon's grandchild.
    command = ["sh", "-c", 'sleep 30 & echo $$ $! > "$OUT/pids"; wait']
    harness = await start(
        jobs=[
            {
                "name": "slow",
                "on": ["pull_request"],
                "command": command,
                "timeout": "1s",
                "repositories": [REPO],
                "env": {"OUT": str(out)},
            },
            {"name": "quick", "on": ["pull_request"], "command": ["true"]},
        ],
        sections={"runner": {"kill_grace": "1s"}},
    )

    await harness.post("pull_request", pr(1, base), delivery_id="slow")
    await harness.post(
        "pull_request",
        pr(2, other, installation_id=OTHER_INSTALLATION, repository=OTHER_REPO),
        delivery_id="other",
    )

    await harness.wait_until(lambda: completed(harness, "slow", "slow"), what="slow")
    run = run_of(harness, "slow", "slow")
    assert run["conclusion"] == "timed_out"
    assert "timeout" in run["output"]["summary"]
    leader, grandchild = (int(pid) for pid in (out / "pids").read_text().split())
    await harness.wait_until(lambda: not process_alive(grandchild), what="grandchild")
    assert not group_alive(leader)
    await harness.wait_until(
        lambda: completed(harness, "other", "quick"), what="other installation"
    )
    assert run_of(harness, "other", "quick")["conclusion"] == "success"
    await harness.wait_until(lambda: completed(harness, "slow", "quick"), what="next")
    await assert_daemon_healthy(harness, caplog)


async def test_clone_of_missing_repository_is_reported(
    emulator: Emulator,
    start: StartDaemon,
    base: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = await start(
        jobs=[{"name": "check", "on": ["pull_request"], "command": ["true"]}]
    )
    # The git server returns what GitHub returns for a deleted repository.
    emulator.inject(
        method="GET",
        path=f"/git/{REPO}.git/info/refs",
        status=404,
        body="Repository not found.",
    )

    await harness.post("pull_request", pr(1, base), delivery_id="gone")
    await harness.post("pull_request", pr(2, base), delivery_id="next")

    await harness.wait_until(lambda: len(harness.completed()) == 2, what="reports")
    run = run_of(harness, "gone", "check")
    assert run["conclusion"] == "failure"
    assert run["output"]["title"] == "Checkout failed"
    assert "repository was not found" in run["output"]["summary"]
    assert run_of(harness, "next", "check")["conclusion"] == "success"
    await assert_daemon_healthy(harness, caplog)


async def test_delivery_for_unknown_repository_leaves_lane_running(
    start: StartDaemon, base: str, caplog: pytest.LogCaptureFixture
) -> None:
    harness = await start(
        jobs=[{"name": "check", "on": ["pull_request"], "command": ["true"]}]
    )

    await harness.post(
        "pull_request", pr(1, base, repository=f"{ACCOUNT}/nowhere"), delivery_id="x"
    )
    await harness.post("pull_request", pr(2, base), delivery_id="next")

    await harness.wait_until(lambda: completed(harness, "next", "check"), what="next")
    assert [run["external_id"] for run in harness.check_runs()] == ["next:check"]
    await assert_daemon_healthy(harness, caplog)


async def test_hung_fetch_times_out_and_lane_goes_on(
    emulator: Emulator,
    start: StartDaemon,
    base: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = add_other_installation(emulator)
    harness = await start(
        jobs=[{"name": "check", "on": ["pull_request"], "command": ["true"]}],
        sections={"runner": {"git_timeout": "2s"}},
    )
    # The server accepts the fetch and does not respond within the test.
    emulator.inject(
        method="GET", path=f"/git/{REPO}.git/info/refs", status=500, delay=60
    )

    await harness.post("pull_request", pr(1, base), delivery_id="hung")
    await harness.post("pull_request", pr(2, base), delivery_id="next")
    await harness.post(
        "pull_request",
        pr(3, other, installation_id=OTHER_INSTALLATION, repository=OTHER_REPO),
        delivery_id="other",
    )

    await harness.wait_until(lambda: len(harness.completed()) == 3, what="reports")
    run = run_of(harness, "hung", "check")
    assert run["conclusion"] == "failure"
    assert run["output"]["title"] == "Checkout failed"
    assert "timed out after 2 s" in run["output"]["summary"]
    assert run_of(harness, "next", "check")["conclusion"] == "success"
    assert run_of(harness, "other", "check")["conclusion"] == "success"
    await assert_daemon_healthy(harness, caplog)


# -- superseding and coalescing -------------------------------------------


async def test_newest_synchronize_supersedes_queued_ones(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    harness = await start(jobs=[job("check", script, out, env={"GATE_1": "go"})])
    heads = [
        emulator.commit(REPO, {"a.py": f"x = {n}\n"}, branch="feature")
        for n in range(3)
    ]
    emulator.pull_ref(REPO, 7, heads[-1])

    await harness.post("pull_request", pr(1, base), delivery_id="slow")
    for n, head in enumerate(heads):
        payload = pr(7, head, action="synchronize")
        await harness.post("pull_request", payload, delivery_id=f"sync-{n}")
    (out / "go").touch()

    await harness.wait_until(lambda: len(harness.completed()) == 4, what="reports")
    for n in (0, 1):
        run = run_of(harness, f"sync-{n}", "check")
        assert run["conclusion"] == "skipped"
        assert heads[-1] in run["output"]["summary"]
    assert run_of(harness, "sync-2", "check")["conclusion"] == "success"
    assert [line for line in log_lines(out) if line.startswith("start")] == [
        f"start 1@{base[:12]}",
        f"start 7@{heads[-1][:12]}",
    ]


async def test_same_commit_twice_runs_once(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    harness = await start(jobs=[job("check", script, out, env={"GATE_1": "go"})])
    head = emulator.commit(REPO, {"a.py": "y\n"}, branch="feature")

    await harness.post("pull_request", pr(1, base), delivery_id="slow")
    await harness.post("pull_request", pr(7, head), delivery_id="first")
    await harness.post(
        "pull_request", pr(7, head, action="reopened"), delivery_id="2nd"
    )
    (out / "go").touch()

    await harness.wait_until(lambda: len(harness.completed()) == 3, what="reports")
    assert run_of(harness, "first", "check")["conclusion"] == "skipped"
    assert "2nd" in run_of(harness, "first", "check")["output"]["summary"]
    assert run_of(harness, "2nd", "check")["conclusion"] == "success"
    assert log_lines(out).count(f"start 7@{head[:12]}") == 1


async def test_commit_checked_again_runs_again(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    harness = await start(jobs=[job("check", script, out)])
    head = emulator.commit(REPO, {"a.py": "y\n"}, branch="feature")

    await harness.post("pull_request", pr(7, head), delivery_id="first")
    await harness.wait_until(lambda: completed(harness, "first", "check"), what="1st")
    await harness.post(
        "pull_request", pr(7, head, action="reopened"), delivery_id="2nd"
    )

    # A skipped check run over the finished one would count as passing on
    # GitHub, so the reopened pull request is checked again.
    await harness.wait_until(lambda: completed(harness, "2nd", "check"), what="2nd")
    assert run_of(harness, "2nd", "check")["conclusion"] == "success"
    assert run_of(harness, "first", "check")["conclusion"] == "success"
    assert log_lines(out).count(f"start 7@{head[:12]}") == 2


async def test_force_pushed_head_is_skipped(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    harness = await start(jobs=[job("check", script, out, env={"GATE_1": "go"})])
    old = emulator.commit(REPO, {"a.py": "old\n"}, branch="feature")
    emulator.pull_ref(REPO, 7, old)

    await harness.post("pull_request", pr(1, base), delivery_id="slow")
    await harness.post("pull_request", pr(7, old), delivery_id="old")
    await harness.wait_until(
        lambda: any(run["head_sha"] == old for run in harness.check_runs()),
        what="queued check run",
    )
    emulator.force_push(REPO, {"a.py": "new\n"}, branch="feature")
    (out / "go").touch()

    await harness.wait_until(lambda: completed(harness, "old", "check"), what="old")
    run = run_of(harness, "old", "check")
    assert run["conclusion"] == "skipped"
    assert "force-pushed" in run["output"]["summary"]
    assert f"start 7@{old[:12]}" not in log_lines(out)


async def test_fork_with_same_branch_name_fetches_pull_ref(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    harness = await start(jobs=[job("check", script, out)])
    # The fork's commit exists in the base repository only as the pull
    # request's head ref, as GitHub keeps it.
    head = emulator.commit(REPO, {"a.py": "fork\n"}, branch="from-fork")
    emulator.pull_ref(REPO, 7, head)
    emulator.store.git(REPO, "update-ref", "-d", "refs/heads/from-fork")
    payload = pull_request_payload(
        repository=REPO,
        number=7,
        head_sha=head,
        installation_id=INSTALLATION_ID,
        head_repository="contributor/hello",
        head_ref="main",
    )

    await harness.post("pull_request", payload, delivery_id="fork")

    await harness.wait_until(lambda: completed(harness, "fork", "check"), what="run")
    assert run_of(harness, "fork", "check")["conclusion"] == "success"
    assert log_lines(out) == [f"start 7@{head[:12]}", f"end 7@{head[:12]}"]
    git_paths = {r.path for r in emulator.requests if r.path.startswith("/git/")}
    assert git_paths == {
        f"/git/{REPO}.git/info/refs",
        f"/git/{REPO}.git/git-upload-pack",
    }


# -- installation events --------------------------------------------------


@pytest.mark.parametrize("action", ["deleted", "suspend"])
async def test_installation_event_cancels_its_jobs(
    emulator: Emulator,
    start: StartDaemon,
    base: str,
    script: Path,
    out: Path,
    action: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = add_other_installation(emulator)
    command = ["sh", "-c", 'echo $$ >> "$OUT/pids"; sleep 30']
    harness = await start(
        jobs=[
            {
                "name": "wait",
                "on": ["pull_request"],
                "command": command,
                "repositories": [REPO],
                "env": {"OUT": str(out)},
            },
            job("other", script, out, repositories=[OTHER_REPO], env={"GATE_3": "go"}),
        ],
        sections={"runner": {"kill_grace": "1s"}},
    )
    await harness.post("pull_request", pr(1, base), delivery_id="running")
    await harness.post("pull_request", pr(2, base), delivery_id="queued")
    await harness.post(
        "pull_request",
        pr(3, other, installation_id=OTHER_INSTALLATION, repository=OTHER_REPO),
        delivery_id="other",
    )
    await harness.wait_until(lambda: (out / "pids").exists(), what="running job")
    await harness.wait_until(lambda: log_lines(out) != [], what="other job")
    payload = fixture_payload("installation", action)
    payload["installation"]["id"] = INSTALLATION_ID

    response = await harness.post("installation", payload)

    assert response.status_code == 202
    await harness.wait_until(
        lambda: INSTALLATION_ID not in harness.daemon.dispatcher.lanes, what="cancel"
    )
    [pid] = (out / "pids").read_text().split()
    await harness.wait_until(lambda: not group_alive(int(pid)), what="group gone")
    for delivery_id in ("running", "queued"):
        run = run_of(harness, delivery_id, "wait")
        if action == "deleted":
            # The emulator, like GitHub until the uninstall has gone
            # through, still accepts reports.
            assert run["conclusion"] == "cancelled"
            assert "uninstalled" in run["output"]["summary"]
        else:
            # A suspended installation gets no token, so nothing is sent.
            assert run["status"] != "completed"
    assert OTHER_INSTALLATION in harness.daemon.dispatcher.lanes
    (out / "go").touch()
    await harness.wait_until(lambda: completed(harness, "other", "other"), what="B")
    assert run_of(harness, "other", "other")["conclusion"] == "success"
    await assert_daemon_healthy(harness, caplog)


# -- reports --------------------------------------------------------------


async def test_issue_comment_on_pull_request_reports_as_comment(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    head = emulator.commit(REPO, {"a.py": "z\n"}, branch="feature")
    emulator.pull_ref(REPO, 7, head)
    harness = await start(
        jobs=[job("review", script, out, on=["issue_comment.created"])]
    )
    payload = fixture_payload("issue_comment", "created")
    payload["installation"] = {"id": INSTALLATION_ID}
    payload["repository"]["full_name"] = REPO
    payload["repository"]["default_branch"] = "main"
    payload["issue"]["number"] = 7
    payload["issue"]["pull_request"] = {"url": f"{emulator.api_url}/pulls/7"}

    await harness.post("issue_comment", payload, delivery_id="comment")

    await harness.wait_until(lambda: emulator.comments, what="comment")
    [comment] = emulator.comments.values()
    assert emulator.comment_issue[comment["id"]] == (REPO, 7)
    assert "<!-- ghappd:comment:review -->" in comment["body"]
    assert "**review**: success" in comment["body"]
    assert f"started 7@{head[:12]}" in comment["body"]
    assert harness.check_runs() == []


def issue_payload(emulator: Emulator, *, default_branch: str) -> dict[str, Any]:
    payload = fixture_payload("issues", "opened")
    payload["installation"] = {"id": INSTALLATION_ID}
    payload["repository"]["full_name"] = REPO
    payload["repository"]["default_branch"] = default_branch
    payload["issue"]["number"] = 5
    return payload


async def test_issue_runs_on_default_branch_tip(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    tip = emulator.commit(REPO, {"a.py": "tip\n"})
    harness = await start(jobs=[job("triage", script, out, on=["issues.opened"])])

    await harness.post(
        "issues", issue_payload(emulator, default_branch="main"), delivery_id="issue"
    )

    await harness.wait_until(lambda: emulator.comments, what="comment")
    [comment] = emulator.comments.values()
    assert emulator.comment_issue[comment["id"]] == (REPO, 5)
    assert "**triage**: success" in comment["body"]
    assert log_lines(out) == [f"start 5@{tip[:12]}", f"end 5@{tip[:12]}"]


async def test_invalid_default_branch_never_reaches_api_path(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    harness = await start(jobs=[job("triage", script, out, on=["issues.opened"])])
    payload = issue_payload(emulator, default_branch="../../../app")

    await harness.post("issues", payload, delivery_id="bad-branch")

    await harness.wait_until(lambda: emulator.comments, what="comment")
    [comment] = emulator.comments.values()
    assert "**triage**: failure" in comment["body"]
    assert "invalid git ref" in comment["body"]
    assert not any("/commits/" in request.path for request in emulator.requests)
    assert log_lines(out) == []


async def test_many_annotations_go_fifty_per_request(
    emulator: Emulator, start: StartDaemon, base: str
) -> None:
    lines = "".join(f"::warning file=a.py,line={n}::note {n}\\n" for n in range(120))
    harness = await start(
        jobs=[
            {
                "name": "lint",
                "on": ["pull_request"],
                "command": ["printf", lines],
            }
        ]
    )

    await harness.post("pull_request", pr(1, base), delivery_id="notes")

    def batches() -> list[int]:
        # The emulator records a request after its route has run, so the
        # recorded requests, not the check run, show when all were sent.
        return [
            len(body["output"]["annotations"])
            for request in emulator.requests
            if request.method == "PATCH" and "/check-runs/" in request.path
            for body in [json.loads(request.body)]
            if body.get("output", {}).get("annotations")
        ]

    await harness.wait_until(lambda: sum(batches()) >= 120, what="all batches")
    assert batches() == [50, 50, 20]
    run = run_of(harness, "notes", "lint")
    assert run["conclusion"] == "success"
    messages = sorted(a["message"] for a in run["annotations"])
    assert messages == sorted(f"note {n}" for n in range(120))


async def test_long_output_keeps_its_tail(
    start: StartDaemon, base: str, tmp_path: Path
) -> None:
    printer = tmp_path / "print.py"
    printer.write_text(
        "print('FIRST LINE')\n"
        "for n in range(20000):\n    print('line', n, 'x' * 20)\n"
        "print('LAST LINE')\n"
    )
    harness = await start(
        jobs=[
            {
                "name": "noisy",
                "on": ["pull_request"],
                "command": [sys.executable, str(printer)],
            }
        ]
    )

    await harness.post("pull_request", pr(1, base), delivery_id="noisy")

    await harness.wait_until(lambda: completed(harness, "noisy", "noisy"), what="run")
    text = run_of(harness, "noisy", "noisy")["output"]["text"]
    assert len(text) <= 65535
    assert "LAST LINE" in text
    assert "FIRST LINE" not in text
    assert text.startswith("```\n")
    assert text.endswith("\n```")


async def test_token_only_when_asked_and_scoped(
    emulator: Emulator,
    start: StartDaemon,
    base: str,
    tmp_path: Path,
    out: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator.create_repository(f"{ACCOUNT}/private", {"README.md": "secret\n"})
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import hashlib, json, os, shutil, sys, urllib.request, urllib.error\n"
        "out = os.path.join(os.environ['OUT'], sys.argv[1])\n"
        "token = os.environ.get('GITHUB_TOKEN')\n"
        "seen = {'token': token is not None}\n"
        "if token:\n"
        "    seen['hash'] = hashlib.sha256(token.encode()).hexdigest()\n"
        "    for repo in ('hello', 'private'):\n"
        "        url = os.environ['GITHUB_API_URL'] + '/repos/octo-org/' + repo\n"
        "        url += '/commits/main'\n"
        "        request = urllib.request.Request(\n"
        "            url, headers={'Authorization': 'token ' + token})\n"
        "        try:\n"
        "            seen[repo] = urllib.request.urlopen(request).status\n"
        "        except urllib.error.HTTPError as exc:\n"
        "            seen[repo] = exc.code\n"
        "shutil.copytree(os.path.dirname(os.getcwd()), out + '-workspace',\n"
        "                symlinks=True)\n"
        "open(out + '.json', 'w').write(json.dumps(seen))\n"
    )
    harness = await start(
        jobs=[
            {
                "name": "with-token",
                "on": ["pull_request"],
                "command": [sys.executable, str(probe), "with"],
                "token": True,
                "permissions": {"contents": "read"},
                "env": {"OUT": str(out)},
            },
            {
                "name": "without-token",
                "on": ["pull_request"],
                "command": [sys.executable, str(probe), "without"],
                "env": {"OUT": str(out)},
            },
        ]
    )

    await harness.post("pull_request", pr(1, base), delivery_id="tokens")

    await harness.wait_until(lambda: len(harness.completed()) == 2, what="both jobs")
    with_token = json.loads((out / "with.json").read_text())
    without_token = json.loads((out / "without.json").read_text())
    assert without_token == {"token": False}
    assert with_token["hello"] == 200
    assert with_token["private"] == 403
    [minted] = [
        token
        for value, token in emulator.authority.tokens.items()
        if hashlib.sha256(value.encode()).hexdigest() == with_token["hash"]
    ]
    assert minted.repositories == frozenset({REPO})
    assert minted.permissions == {"contents": "read"}
    secrets = secrets_seen(emulator)
    for snapshot in ("with-workspace", "without-workspace"):
        for path in (out / snapshot).rglob("*"):
            if path.is_file() and not path.is_symlink():
                content = path.read_bytes()
                assert [s for s in secrets if s.encode() in content] == []
    assert not any(s in caplog.text for s in secrets)


# -- security -------------------------------------------------------------


async def test_option_like_head_sha_never_reaches_git(
    emulator: Emulator,
    start: StartDaemon,
    base: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    marker = tmp_path / "x"
    harness = await start(
        jobs=[{"name": "check", "on": ["pull_request"], "command": ["true"]}]
    )
    evil = f"--upload-pack=touch {marker}"

    await harness.post("pull_request", pr(1, evil), delivery_id="evil")
    await harness.post("pull_request", pr(2, base), delivery_id="next")

    await harness.wait_until(lambda: completed(harness, "next", "check"), what="next")
    assert not marker.exists()
    assert not (harness.daemon.config.workspaces.root / "x").exists()
    assert [run["external_id"] for run in harness.check_runs()] == ["next:check"]
    assert not any("touch" in request.path for request in emulator.requests)
    assert "is not a commit id" in caplog.text


async def test_option_like_ref_is_rejected_and_reported(
    emulator: Emulator,
    start: StartDaemon,
    base: str,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "x"
    harness = await start(jobs=[{"name": "check", "on": ["push"], "command": ["true"]}])
    payload = fixture_payload("push")
    payload["installation"] = {"id": INSTALLATION_ID}
    payload["repository"]["full_name"] = REPO
    payload["after"] = base
    payload["deleted"] = False
    payload["ref"] = f"--upload-pack=touch {marker}"

    await harness.post("push", payload, delivery_id="evil-ref")

    await harness.wait_until(
        lambda: completed(harness, "evil-ref", "check"), what="run"
    )
    run = run_of(harness, "evil-ref", "check")
    assert run["conclusion"] == "failure"
    assert "invalid git ref" in run["output"]["summary"]
    assert not marker.exists()
    assert [r.path for r in emulator.requests if r.path.startswith("/git/")] == []


# -- reruns ---------------------------------------------------------------


async def test_redelivery_after_finish_updates_same_check_run(
    emulator: Emulator, start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    harness = await start(jobs=[job("check", script, out)])

    await harness.post("pull_request", pr(1, base), delivery_id="again")
    await harness.wait_until(lambda: completed(harness, "again", "check"), what="1st")
    await harness.wait_until(lambda: not harness.daemon.dispatcher.lanes, what="idle")
    response = await harness.post("pull_request", pr(1, base), delivery_id="again")

    def completions() -> list[str]:
        return [
            request.path
            for request in emulator.requests
            if request.method == "PATCH"
            and "/check-runs/" in request.path
            and json.loads(request.body).get("status") == "completed"
        ]

    assert response.status_code == 202
    await harness.wait_until(lambda: len(completions()) == 2, what="2nd completion")
    [run] = harness.check_runs()
    assert completions() == [f"/repos/{REPO}/check-runs/{run['id']}"] * 2
    assert len(log_lines(out)) == 4
    creations = [
        r
        for r in emulator.requests
        if r.method == "POST" and r.path.endswith("/check-runs")
    ]
    assert len(creations) == 1
    assert run["conclusion"] == "success"


async def test_healthz_answers_while_jobs_run(
    start: StartDaemon, base: str, script: Path, out: Path
) -> None:
    harness = await start(jobs=[job("check", script, out, env={"GATE_1": "go"})])
    await harness.post("pull_request", pr(1, base))
    await harness.wait_until(lambda: log_lines(out) != [], what="job start")

    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(harness.url + "/healthz")

    assert response.status_code == 200
    (out / "go").touch()
    await harness.wait_until(lambda: harness.completed("check"), what="run")


async def test_group_alive_sees_this_process() -> None:
    assert group_alive(os.getpgrp())
