"""Limits on what a command's output can make ghappd send to GitHub."""

from __future__ import annotations

from fixtures_daemon import StartDaemon, pull_request_payload
from fixtures_emulator import ACCOUNT, INSTALLATION_ID

from daemon.sandbox import Emulator

REPO = f"{ACCOUNT}/hello"


def open_pull_request(emulator: Emulator) -> str:
    emulator.create_repository(REPO, {"README.md": "hello\n"})
    head = emulator.commit(REPO, {"a.py": "x = 1\n"}, branch="feature")
    emulator.pull_ref(REPO, 7, head)
    return head


async def test_annotations_capped(
    emulator: Emulator, start_daemon: StartDaemon
) -> None:
    head = open_pull_request(emulator)
    script = 'for i in $(seq 1 130); do echo "::error file=a.py,line=$i::e$i"; done'
    harness = await start_daemon(
        jobs=[
            {"name": "lint", "on": ["pull_request"], "command": ["sh", "-c", script]}
        ],
        sections={"runner": {"max_annotations": 60}},
    )
    payload = pull_request_payload(
        repository=REPO, number=7, head_sha=head, installation_id=INSTALLATION_ID
    )

    await harness.post("pull_request", payload)

    await harness.wait_until(lambda: harness.completed("lint"), what="check run")
    await harness.wait_until(lambda: not harness.daemon.dispatcher.lanes, what="lane")
    [run] = harness.check_runs("lint")
    assert len(run["annotations"]) == 60
    assert "It reported 130 annotations." in run["output"]["summary"]
    assert "Only the first 60 are shown" in run["output"]["summary"]


async def test_unlocated_message_is_inline_code(
    emulator: Emulator, start_daemon: StartDaemon
) -> None:
    head = open_pull_request(emulator)
    message = "@octocat hi ![p](http://198.51.100.1/p.png)"
    harness = await start_daemon(
        jobs=[
            {
                "name": "lint",
                "on": ["pull_request"],
                "command": ["sh", "-c", f"echo '::error::{message}'; exit 1"],
            }
        ]
    )
    payload = pull_request_payload(
        repository=REPO, number=7, head_sha=head, installation_id=INSTALLATION_ID
    )

    await harness.post("pull_request", payload)

    await harness.wait_until(lambda: harness.completed("lint"), what="check run")
    [run] = harness.check_runs("lint")
    assert f"- failure: ` {message} `" in run["output"]["summary"]


async def test_long_job_name_and_delivery_id_check_out(
    emulator: Emulator, start_daemon: StartDaemon
) -> None:
    head = open_pull_request(emulator)
    name = "n" * 95
    harness = await start_daemon(
        jobs=[{"name": name, "on": ["pull_request"], "command": ["true"]}]
    )
    payload = pull_request_payload(
        repository=REPO, number=7, head_sha=head, installation_id=INSTALLATION_ID
    )

    await harness.post("pull_request", payload, delivery_id="-" + "d" * 120)

    await harness.wait_until(lambda: harness.completed(name), what="check run")
    [run] = harness.check_runs(name)
    assert run["conclusion"] == "success"
