"""Crash recovery of ``ghappd run`` as a process: kill -9, restart, dedup."""

from __future__ import annotations

import signal
from pathlib import Path

from fixtures_daemon import pull_request_payload, write_config
from fixtures_emulator import ACCOUNT, INSTALLATION_ID
from fixtures_process import SpawnDaemon, ends, gated_job, starts, wait_for

from daemon.sandbox import Emulator

REPO = f"{ACCOUNT}/hello"
OTHER_INSTALLATION = 2002
OTHER_ACCOUNT = "other-org"
OTHER_REPO = f"{OTHER_ACCOUNT}/world"


def _setup(emulator: Emulator) -> dict[int, tuple[str, str]]:
    """Create one repository per installation; return id -> (repo, head)."""
    emulator.add_installation(OTHER_INSTALLATION, account=OTHER_ACCOUNT)
    heads = {}
    for installation_id, repo in (
        (INSTALLATION_ID, REPO),
        (OTHER_INSTALLATION, OTHER_REPO),
    ):
        emulator.create_repository(repo, {"README.md": "hello\n"})
        heads[installation_id] = (
            repo,
            emulator.commit(repo, {"a.txt": "1\n"}, branch="feature"),
        )
    return heads


def _config(
    tmp_path: Path, emulator: Emulator, key: Path, joblog: Path, gate: Path
) -> Path:
    directory = tmp_path / "daemon"
    directory.mkdir(exist_ok=True)
    return write_config(
        directory,
        emulator=emulator,
        key_file=key,
        jobs=[gated_job("slow", log=joblog, gate=gate)],
        sections={"logging": {"level": "info"}},
    )


def _completions(emulator: Emulator, run_id: object) -> int:
    """Count the PATCH requests that completed check run ``run_id``."""
    return sum(
        1
        for request in emulator.requests
        if request.method == "PATCH" and request.path.endswith(f"/check-runs/{run_id}")
        if request.json().get("status") == "completed"
    )


def _runs_by_external_id(emulator: Emulator) -> dict[str, list[dict[str, object]]]:
    runs: dict[str, list[dict[str, object]]] = {}
    for run in emulator.check_runs.values():
        runs.setdefault(str(run["external_id"]), []).append(run)
    return runs


async def test_kill_9_loses_no_delivery(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    heads = _setup(emulator)
    joblog, gate = tmp_path / "slow.joblog", tmp_path / "gate"
    config = _config(tmp_path, emulator, app_key_file, joblog, gate)
    first = await spawn_daemon(config)

    posted: dict[int, list[str]] = {INSTALLATION_ID: [], OTHER_INSTALLATION: []}
    for number in (1, 2, 3):
        for installation_id, (repo, head) in heads.items():
            payload = pull_request_payload(
                repository=repo,
                number=number,
                head_sha=head,
                installation_id=installation_id,
            )
            delivery_id = f"crash-{installation_id}-{number}"
            response = await first.post(
                "pull_request", payload, delivery_id=delivery_id
            )
            assert response.status_code == 202, response.text
            posted[installation_id].append(delivery_id)
    await wait_for(
        lambda: (
            starts(joblog, INSTALLATION_ID) == [1]
            and starts(joblog, OTHER_INSTALLATION) == [1]
        ),
        what="the first job of each installation to run",
    )

    first.signal(signal.SIGKILL)
    assert await first.wait_exit() == -signal.SIGKILL
    second = await spawn_daemon(config)
    gate.touch()

    expected = {f"{d}:slow" for ids in posted.values() for d in ids}
    await wait_for(
        lambda: (
            {
                run["external_id"]
                for run in emulator.check_runs.values()
                if run["status"] == "completed"
            }
            >= expected
        ),
        what="every check run completed",
    )
    for installation_id in posted:
        assert starts(joblog, installation_id) == [1, 1, 2, 3]
        # The killed daemon's job process also ends "1" once the gate exists.
        assert list(dict.fromkeys(ends(joblog, installation_id))) == [1, 2, 3]
    runs = _runs_by_external_id(emulator)
    assert set(runs) == expected
    for external_id in expected:
        assert len(runs[external_id]) == 1, external_id
        [run] = runs[external_id]
        assert run["conclusion"] == "success", external_id
    assert second.running()


async def test_redelivery_across_restart_is_duplicate(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    heads = _setup(emulator)
    repo, head = heads[INSTALLATION_ID]
    joblog, gate = tmp_path / "slow.joblog", tmp_path / "gate"
    config = _config(tmp_path, emulator, app_key_file, joblog, gate)
    payload = pull_request_payload(
        repository=repo, number=5, head_sha=head, installation_id=INSTALLATION_ID
    )
    queued = pull_request_payload(
        repository=repo, number=6, head_sha=head, installation_id=INSTALLATION_ID
    )
    first = await spawn_daemon(config)
    assert (
        await first.post("pull_request", payload, delivery_id="dup-run")
    ).status_code == 202
    assert (
        await first.post("pull_request", queued, delivery_id="dup-queued")
    ).status_code == 202
    await wait_for(lambda: starts(joblog) == [5], what="the job to start")
    first.signal(signal.SIGKILL)
    await first.wait_exit()

    second = await spawn_daemon(config)
    await wait_for(lambda: starts(joblog) == [5, 5], what="the job to run again")
    running_again = await second.post("pull_request", payload, delivery_id="dup-run")
    queued_again = await second.post("pull_request", queued, delivery_id="dup-queued")
    assert running_again.status_code == 200
    assert running_again.json()["status"] == "duplicate"
    assert queued_again.status_code == 200

    gate.touch()
    # The job process of the killed daemon also finds the gate and ends.
    await wait_for(lambda: ends(joblog) == [5, 5, 6], what="both jobs to finish")
    await wait_for(
        lambda: (
            len(emulator.check_runs) == 2
            and all(
                run["status"] == "completed" for run in emulator.check_runs.values()
            )
        ),
        what="the check runs to complete",
    )
    [run] = _runs_by_external_id(emulator)["dup-run:slow"]
    assert _completions(emulator, run["id"]) == 1

    rerun = await second.post("pull_request", payload, delivery_id="dup-run")

    assert rerun.status_code == 202
    await wait_for(
        lambda: _completions(emulator, run["id"]) == 2,
        what="the rerun to complete its check run again",
    )
    runs = _runs_by_external_id(emulator)
    assert len(runs["dup-run:slow"]) == 1
    assert len(runs["dup-queued:slow"]) == 1
    assert starts(joblog) == [5, 5, 6, 5]


async def test_kill_right_after_accept(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    # The kill lands while queued check runs are being created, so some
    # may exist on GitHub without their id in the journal.
    heads = _setup(emulator)
    joblog, gate = tmp_path / "slow.joblog", tmp_path / "gate"
    gate.touch()
    config = _config(tmp_path, emulator, app_key_file, joblog, gate)
    first = await spawn_daemon(config)
    expected = set()
    for number in range(1, 6):
        for installation_id, (repo, head) in heads.items():
            payload = pull_request_payload(
                repository=repo,
                number=number,
                head_sha=head,
                installation_id=installation_id,
            )
            delivery_id = f"early-{installation_id}-{number}"
            response = await first.post(
                "pull_request", payload, delivery_id=delivery_id
            )
            assert response.status_code == 202
            expected.add(f"{delivery_id}:slow")

    first.signal(signal.SIGKILL)
    await first.wait_exit()
    await spawn_daemon(config)

    await wait_for(
        lambda: (
            {
                run["external_id"]
                for run in emulator.check_runs.values()
                if run["status"] == "completed"
            }
            >= expected
        ),
        what="every check run completed",
    )
    runs = _runs_by_external_id(emulator)
    assert set(runs) == expected
    for external_id in expected:
        assert len(runs[external_id]) == 1, external_id
    for installation_id in heads:
        numbers = list(dict.fromkeys(starts(joblog, installation_id)))
        assert numbers == [1, 2, 3, 4, 5]
