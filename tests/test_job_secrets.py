"""A job's token and secrets: masked in every report, the token revoked after.

Every test runs the whole daemon in-process against the emulator over real
HTTP, with real git fetches and real command processes. The commands print
their ``GITHUB_TOKEN`` and ``secret_env`` values in plain output, in
workflow commands that become annotations, and in annotation titles, and
write the token to a file outside the workspace so the test can read it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures_daemon import Harness, StartDaemon, pull_request_payload
from fixtures_emulator import ACCOUNT, INSTALLATION_ID

from daemon.jobs.execute import MASK
from daemon.sandbox import Emulator

REPO = f"{ACCOUNT}/hello"
API_KEY = "sk-test-4f9a2c7e1b3d5f60"

# Prints the secrets every way a report could carry them, then fails so
# the check run has a failure conclusion with annotations.
LEAKY_COMMAND = r"""
printf '%s' "$GITHUB_TOKEN" > "$OUT/token-$JOB"
echo "token: $GITHUB_TOKEN"
echo "key: $API_KEY"
echo "::error::$GITHUB_TOKEN"
echo "::error file=README.md,line=1,title=title $API_KEY::located $API_KEY"
echo "::warning title=token $GITHUB_TOKEN::unlocated $API_KEY"
exit 1
"""


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """The daemon's directory, with the API key's credential file."""
    path = tmp_path / "daemon"
    path.mkdir()
    (path / "api-key").write_text(API_KEY + "\n")
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def base(emulator: Emulator) -> str:
    return emulator.create_repository(REPO, {"README.md": "hello\n"})


def leaky_job(out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "leaky",
        "on": ["pull_request"],
        "command": ["sh", "-c", LEAKY_COMMAND],
        "token": True,
        "secret_env": {"API_KEY": "api-key"},
        "env": {"OUT": str(out), "JOB": "1"},
        "timeout": "30s",
        **extra,
    }


def pr(number: int, sha: str, **extra: Any) -> dict[str, Any]:
    return pull_request_payload(
        repository=REPO,
        number=number,
        head_sha=sha,
        installation_id=INSTALLATION_ID,
        **extra,
    )


def completed_run(harness: Harness, delivery_id: str) -> dict[str, Any] | None:
    for run in harness.completed():
        if run["external_id"].startswith(f"{delivery_id}:"):
            return run
    return None


async def finished_run(harness: Harness, delivery_id: str) -> dict[str, Any]:
    await harness.wait_until(
        lambda: completed_run(harness, delivery_id) is not None, what=delivery_id
    )
    # Annotations follow the completion; the lane closes after them.
    await harness.wait_until(lambda: not harness.daemon.dispatcher.lanes, what="lane")
    run = completed_run(harness, delivery_id)
    assert run is not None
    return run


def revocations(emulator: Emulator, token: str) -> list[int]:
    """Return the status of each ``DELETE /installation/token`` with ``token``."""
    return [
        request.status
        for request in emulator.requests
        if request.method == "DELETE"
        and request.path == "/installation/token"
        and request.headers.get("authorization", "").endswith(" " + token)
    ]


async def status_with(emulator: Emulator, token: str) -> int:
    async with httpx.AsyncClient(base_url=emulator.api_url) as http:
        response = await http.get(
            f"/repos/{REPO}", headers={"Authorization": f"token {token}"}
        )
    return response.status_code


async def test_report_masks_token_and_secret(
    emulator: Emulator,
    start_daemon: StartDaemon,
    base: str,
    directory: Path,
    out: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    harness = await start_daemon(jobs=[leaky_job(out)], directory=directory)

    await harness.post("pull_request", pr(1, base), delivery_id="leak")

    run = await finished_run(harness, "leak")
    token = (out / "token-1").read_text()
    output = run["output"]
    assert token.startswith("ghs_")
    assert run["conclusion"] == "failure"
    for field in ("title", "summary", "text"):
        assert token not in output[field]
        assert API_KEY not in output[field]
    assert f"token: {MASK}" in output["text"]
    assert f"key: {MASK}" in output["text"]
    assert f"- failure: ` {MASK} `" in output["summary"]
    assert f"- warning: ` unlocated {MASK} `" in output["summary"]
    [annotation] = run["annotations"]
    assert annotation["message"] == f"located {MASK}"
    assert annotation["title"] == f"title {MASK}"
    published = json.dumps(run)
    assert token not in published
    assert API_KEY not in published
    assert token not in caplog.text
    assert API_KEY not in caplog.text


async def test_comment_masks_token_and_secret(
    emulator: Emulator,
    start_daemon: StartDaemon,
    base: str,
    directory: Path,
    out: Path,
) -> None:
    harness = await start_daemon(
        jobs=[leaky_job(out, report="comment")], directory=directory
    )

    await harness.post("pull_request", pr(1, base), delivery_id="comment")

    await harness.wait_until(lambda: bool(emulator.comments), what="comment")
    [comment] = emulator.comments.values()
    token = (out / "token-1").read_text()
    assert token not in comment["body"]
    assert API_KEY not in comment["body"]
    assert f"token: {MASK}" in comment["body"]


async def test_each_job_token_revoked(
    emulator: Emulator,
    start_daemon: StartDaemon,
    base: str,
    directory: Path,
    out: Path,
) -> None:
    harness = await start_daemon(
        jobs=[
            leaky_job(out),
            leaky_job(out, name="again", env={"OUT": str(out), "JOB": "2"}),
        ],
        directory=directory,
    )

    await harness.post("pull_request", pr(1, base), delivery_id="first")
    await finished_run(harness, "first")
    await harness.wait_until(lambda: len(harness.completed()) == 2, what="both")

    first = (out / "token-1").read_text()
    second = (out / "token-2").read_text()
    assert revocations(emulator, first) == [204]
    assert revocations(emulator, second) == [204]
    assert await status_with(emulator, first) == 401
    assert await status_with(emulator, second) == 401
    assert first != second


async def test_next_job_gets_new_token(
    emulator: Emulator,
    start_daemon: StartDaemon,
    base: str,
    directory: Path,
    out: Path,
) -> None:
    harness = await start_daemon(jobs=[leaky_job(out)], directory=directory)

    await harness.post("pull_request", pr(1, base), delivery_id="one")
    await finished_run(harness, "one")
    first = (out / "token-1").read_text()
    await harness.post("pull_request", pr(2, base), delivery_id="two")
    await finished_run(harness, "two")
    second = (out / "token-1").read_text()

    assert second != first
    assert revocations(emulator, first) == [204]
    assert revocations(emulator, second) == [204]
    assert emulator.authority.tokens[second].revoked


async def test_token_revoked_on_shutdown(
    emulator: Emulator,
    start_daemon: StartDaemon,
    base: str,
    directory: Path,
    out: Path,
) -> None:
    command = 'printf %s "$GITHUB_TOKEN" > "$OUT/token"; sleep 30'
    harness = await start_daemon(
        jobs=[
            {
                "name": "slow",
                "on": ["pull_request"],
                "command": ["sh", "-c", command],
                "token": True,
                "env": {"OUT": str(out)},
                "timeout": "60s",
            }
        ],
        sections={"queue": {"shutdown_grace": "0s"}, "runner": {"kill_grace": "1s"}},
        directory=directory,
    )
    await harness.post("pull_request", pr(1, base), delivery_id="slow")
    token_file = out / "token"
    await harness.wait_until(
        lambda: token_file.exists() and token_file.read_text() != "", what="start"
    )
    token = token_file.read_text()

    harness.daemon.shutdown()

    await harness.wait_until(lambda: bool(revocations(emulator, token)), what="DELETE")
    assert revocations(emulator, token) == [204]
    assert await status_with(emulator, token) == 401


async def test_fork_gets_no_token_or_secret(
    emulator: Emulator,
    start_daemon: StartDaemon,
    base: str,
    directory: Path,
    out: Path,
) -> None:
    command = 'printf "%s|%s" "${GITHUB_TOKEN-unset}" "${API_KEY-unset}" > "$OUT/seen"'
    harness = await start_daemon(
        jobs=[
            {
                "name": "fork",
                "on": ["pull_request"],
                "command": ["sh", "-c", command],
                "token": True,
                "secret_env": {"API_KEY": "api-key"},
                "env": {"OUT": str(out)},
            }
        ],
        directory=directory,
    )

    payload = pr(1, base, head_repository="someone/hello")
    await harness.post("pull_request", payload, delivery_id="fork")

    run = await finished_run(harness, "fork")
    assert run["conclusion"] == "success"
    assert (out / "seen").read_text() == "unset|unset"
    assert [r for r in emulator.requests if r.method == "DELETE"] == []


async def test_mask_lines_escapes_not_short(
    emulator: Emulator,
    start_daemon: StartDaemon,
    base: str,
    directory: Path,
    out: Path,
) -> None:
    (directory / "short").write_text("abc123")
    (directory / "lines").write_text("first-line-secret\nsecond-line-secret\n")
    (directory / "percent").write_text("50%-off-secret")
    command = (
        'echo "short=$SHORT"; echo "$LINES" | tail -n 1;'
        " echo '::notice::escaped 50%25-off-secret';"
        " echo '::notice file=README.md,line=1::located 50%25-off-secret'"
    )
    harness = await start_daemon(
        jobs=[
            {
                "name": "values",
                "on": ["pull_request"],
                "command": ["sh", "-c", command],
                "secret_env": {"SHORT": "short", "LINES": "lines", "P": "percent"},
            }
        ],
        directory=directory,
    )

    await harness.post("pull_request", pr(1, base), delivery_id="values")

    run = await finished_run(harness, "values")
    output = run["output"]
    assert "short=abc123" in output["text"]
    assert "second-line-secret" not in output["text"]
    assert f"\n{MASK}\n" in output["text"]
    assert "50%-off-secret" not in output["summary"]
    assert f"- notice: ` escaped {MASK} `" in output["summary"]
    [annotation] = run["annotations"]
    assert annotation["message"] == f"located {MASK}"
