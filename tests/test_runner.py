from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from daemon.jobs.runner import CommandResult, build_environment, run_command

# Bounded polling for real subprocesses: the deadline only limits a failure.
POLL_DEADLINE = 10.0


def minimal_env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(tmp_path)}


async def run(
    argv: list[str],
    tmp_path: Path,
    *,
    timeout: float = 30.0,
    kill_grace: float = 5.0,
    nice: int = 0,
    output_limit: int = 1 << 20,
    env: dict[str, str] | None = None,
) -> CommandResult:
    return await run_command(
        argv,
        cwd=tmp_path,
        env=env if env is not None else minimal_env(tmp_path),
        timeout=timeout,
        kill_grace=kill_grace,
        nice=nice,
        output_limit=output_limit,
    )


async def wait_for_file(path: Path) -> str:
    with trio.fail_after(POLL_DEADLINE):
        while True:
            if path.exists():
                text = path.read_text()
                if text.endswith("\n"):
                    return text
            await trio.sleep(0.01)


def process_is_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # A killed process whose new parent has not reaped it yet is a zombie.
    state = stat.rpartition(")")[2].split()[0]
    return state in {"Z", "X"}


async def wait_until_gone(pid: int) -> bool:
    with trio.move_on_after(POLL_DEADLINE):
        while not process_is_gone(pid):
            await trio.sleep(0.01)
    return process_is_gone(pid)


def nice_of_stat(stat_line: str) -> int:
    # proc(5): field 19 is the nice value, and fields after the ")" of the
    # command name start at field 3.
    return int(stat_line.rpartition(")")[2].split()[16])


async def test_run_command_exit_zero(tmp_path: Path) -> None:
    result = await run(["sh", "-c", "echo hello; echo oops >&2"], tmp_path)
    assert result.exit_code == 0
    assert result.signal is None
    assert result.timed_out is False
    assert result.output == "hello\noops\n"
    assert result.output_bytes == len("hello\noops\n")
    assert result.truncated is False
    assert result.succeeded


async def test_run_command_exit_one(tmp_path: Path) -> None:
    result = await run(["sh", "-c", "exit 1"], tmp_path)
    assert result.exit_code == 1
    assert result.signal is None
    assert not result.succeeded


async def test_run_command_stdin_is_devnull(tmp_path: Path) -> None:
    result = await run(["sh", "-c", "cat; echo done"], tmp_path)
    assert result.output == "done\n"


async def test_run_command_runs_in_cwd(tmp_path: Path) -> None:
    (tmp_path / "tool.sh").write_text("#!/bin/sh\npwd\n")
    (tmp_path / "tool.sh").chmod(0o755)
    result = await run(["./tool.sh"], tmp_path)
    assert result.exit_code == 0
    assert result.output == f"{tmp_path}\n"


async def test_timeout_kills_grandchild(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    result = await run(["sh", "-c", script], tmp_path, timeout=1.5, kill_grace=2.0)
    grandchild = int(pidfile.read_text())
    assert result.timed_out is True
    assert result.exit_code is None
    assert result.signal == signal.SIGTERM
    assert await wait_until_gone(grandchild)


async def test_cancellation_kills_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    results: list[CommandResult] = []

    async def command() -> None:
        results.append(await run(["sh", "-c", script], tmp_path, kill_grace=2.0))

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(command)
            grandchild = int(await wait_for_file(pidfile))
            scope.cancel()
    assert scope.cancelled_caught
    assert results == []
    assert await wait_until_gone(grandchild)


async def test_exited_command_leaves_no_background(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"sleep 300 > /dev/null 2>&1 & echo $! > {pidfile}"
    result = await run(["sh", "-c", script], tmp_path)
    grandchild = int(pidfile.read_text())
    assert result.exit_code == 0
    assert await wait_until_gone(grandchild)


async def test_sigterm_ignored_gets_sigkill(tmp_path: Path) -> None:
    script = "trap '' TERM; sleep 300"
    result = await run(["sh", "-c", script], tmp_path, timeout=1.0, kill_grace=0.5)
    assert result.timed_out is True
    assert result.signal == signal.SIGKILL
    assert result.exit_code is None


async def test_output_keeps_tail(tmp_path: Path) -> None:
    script = "head -c 10000 /dev/zero | tr '\\0' a; printf END"
    result = await run(["sh", "-c", script], tmp_path, output_limit=100)
    assert result.truncated is True
    assert result.output_bytes == 10003
    assert len(result.output) == 100
    assert result.output.endswith("aaaEND")


async def test_output_tail_drops_split_character(tmp_path: Path) -> None:
    # "é" is two bytes in UTF-8, so an odd limit cuts one in half.
    script = "i=0; while [ $i -lt 50 ]; do printf 'é'; i=$((i+1)); done"
    env = minimal_env(tmp_path) | {"LC_ALL": "C.UTF-8"}
    result = await run(["sh", "-c", script], tmp_path, output_limit=51, env=env)
    assert result.truncated is True
    assert result.output == "é" * 25


async def test_output_invalid_utf8_replaced(tmp_path: Path) -> None:
    result = await run(["printf", "a\\377b"], tmp_path)
    assert result.output == "a\ufffdb"


async def test_nice_applied(tmp_path: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    result = await run(["cat", "/proc/self/stat"], tmp_path, nice=5)
    assert result.exit_code == 0
    assert nice_of_stat(result.output) == min(base + 5, 19)


async def test_nice_zero_keeps_priority(tmp_path: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    result = await run(["cat", "/proc/self/stat"], tmp_path, nice=0)
    assert nice_of_stat(result.output) == base


async def test_own_process_group(tmp_path: Path) -> None:
    result = await run(["cat", "/proc/self/stat"], tmp_path)
    fields = result.output.rpartition(")")[2].split()
    # proc(5): fields 5 and 6 are the process group and the session id.
    pgrp, session = int(fields[2]), int(fields[3])
    assert pgrp != os.getpgrp()
    assert session == pgrp


async def test_environment_is_exactly_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GHAPPD_TEST_SECRET", "hunter2")
    env = build_environment(
        event_name="push",
        event_path=tmp_path / "event.json",
        repository="octo-org/hello",
        sha="a" * 40,
        ref="refs/heads/main",
        api_url="http://127.0.0.1:1/",
        server_url="http://127.0.0.1:1",
        workspace=tmp_path,
        home=tmp_path / "home",
    )
    result = await run(["env"], tmp_path, env=env)
    lines = set(result.output.splitlines())
    assert "hunter2" not in result.output
    assert "GHAPPD_TEST_SECRET" not in result.output
    assert lines == {f"{name}={value}" for name, value in env.items()}


async def test_missing_executable_is_result(tmp_path: Path) -> None:
    result = await run(["ghappd-no-such-tool", "--version"], tmp_path)
    assert result.exit_code is None
    assert result.signal is None
    assert "command not found: 'ghappd-no-such-tool'" in result.output


async def test_missing_relative_executable_is_result(tmp_path: Path) -> None:
    result = await run(["./missing.sh"], tmp_path)
    assert result.exit_code is None
    assert "command not found: './missing.sh'" in result.output


async def test_empty_argv_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^argv must name a command"):
        await run([], tmp_path)


def test_build_environment_without_token(tmp_path: Path) -> None:
    env = build_environment(
        event_name="pull_request",
        event_path=tmp_path / "event.json",
        repository="octo-org/hello",
        sha="b" * 40,
        ref=None,
        api_url="http://127.0.0.1:1",
        server_url="http://127.0.0.1:1",
        workspace=tmp_path / "repo",
        home=tmp_path / "home",
        path="/usr/bin:/bin",
    )
    assert "GITHUB_TOKEN" not in env
    assert "GITHUB_ACTIONS" not in env
    assert "GITHUB_REF" not in env
    assert env["CI"] == "true"
    assert env["GITHUB_EVENT_NAME"] == "pull_request"
    assert env["GITHUB_EVENT_PATH"] == str(tmp_path / "event.json")
    assert env["GITHUB_REPOSITORY"] == "octo-org/hello"
    assert env["GITHUB_REPOSITORY_OWNER"] == "octo-org"
    assert env["GITHUB_SHA"] == "b" * 40
    assert env["GITHUB_WORKSPACE"] == str(tmp_path / "repo")
    assert env["HOME"] == str(tmp_path / "home")
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["LANG"] == "C.UTF-8"


def test_build_environment_with_token(tmp_path: Path) -> None:
    env = build_environment(
        event_name="push",
        event_path=tmp_path / "event.json",
        repository="octo-org/hello",
        sha="c" * 40,
        ref="refs/heads/main",
        api_url="http://127.0.0.1:1",
        server_url="http://127.0.0.1:1",
        workspace=tmp_path,
        home=tmp_path,
        token="ghs_example",
    )
    assert env["GITHUB_TOKEN"] == "ghs_example"
    assert env["GITHUB_REF"] == "refs/heads/main"
    assert env["PATH"] == os.environ.get("PATH", os.defpath)
