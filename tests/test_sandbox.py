"""Job commands under ``[runner] sandbox = "bwrap"``, end to end.

The daemon runs in-process against the emulator, as in
test_jobs_end_to_end.py. The test's files live under /var/tmp, not /tmp,
so a path the command cannot read is hidden by its own tmpfs and not only
by the sandbox's private /tmp. The probe command prints what it could read
and which processes it saw, and the tests read that from the check run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fixtures_daemon import Harness, StartDaemon, pull_request_payload
from fixtures_emulator import ACCOUNT, INSTALLATION_ID

import daemon.jobs.execute
from daemon.jobs.execute import config_folders, sandbox_argv
from daemon.jobs.runner import run_command
from daemon.sandbox import Emulator

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bwrap (Debian package bubblewrap) is not installed",
)

REPO = f"{ACCOUNT}/hello"

# Prints "readable PATH" or "hidden PATH" for each path in PROBE (separated
# by os.pathsep), the PIDs in /proc, and /proc/1's command; with ORPHAN
# set, first starts `setsid sleep ORPHAN`, which leaves the process group.
PROBE_SCRIPT = r"""
import os, subprocess

orphan = os.environ.get("ORPHAN")
if orphan:
    subprocess.Popen(["setsid", "sleep", orphan], start_new_session=True)
for path in filter(None, os.environ.get("PROBE", "").split(os.pathsep)):
    try:
        with open(path, "rb") as f:
            f.read(1)
        print("readable", path)
    except OSError:
        print("hidden", path)
pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
print("pids", " ".join(map(str, pids)))
with open("/proc/1/cmdline", "rb") as f:
    print("init", os.path.basename(f.read().split(b"\0")[0].decode()))
print("cwd", os.getcwd())
print("tmp", " ".join(sorted(os.listdir("/tmp"))) or "-")
"""


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A temporary folder outside /tmp, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="ghappd-sandbox-", dir="/var/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def app_key_file(tmp_path: Path, app_key_pem: bytes) -> Path:
    """The App's private key, alone in its own folder."""
    path = tmp_path / "keys" / "app-key.pem"
    path.parent.mkdir()
    path.write_bytes(app_key_pem)
    path.chmod(0o600)
    return path


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(PROBE_SCRIPT)
    return path


@pytest.fixture
def base(emulator: Emulator) -> str:
    return emulator.create_repository(REPO, {"README.md": "hello\n"})


def probe_job(script: Path, **env: str) -> dict[str, Any]:
    return {
        "name": "probe",
        "on": ["pull_request"],
        "command": [sys.executable, str(script)],
        "env": env,
        "timeout": "30s",
    }


async def run_probe(harness: Harness, sha: str) -> dict[str, Any]:
    """Post a pull request for ``sha``; return the completed check run."""
    payload = pull_request_payload(
        repository=REPO, number=1, head_sha=sha, installation_id=INSTALLATION_ID
    )
    response = await harness.post("pull_request", payload)
    assert response.status_code == 202
    await harness.wait_until(lambda: bool(harness.completed("probe")), what="probe")
    [run] = harness.completed("probe")
    return run


def output_lines(run: dict[str, Any]) -> list[str]:
    return str(run["output"]["text"]).splitlines()


def orphans(argument: str) -> list[int]:
    """Return the host PIDs of processes whose argv is ``sleep ARGUMENT``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.split(b"\0")[:2] == [b"sleep", argument.encode()]:
            found.append(int(name))
    return found


def sandboxed(**runner: Any) -> dict[str, dict[str, Any]]:
    return {"runner": {"sandbox": "bwrap", **runner}}


async def test_sandbox_hides_daemon_files(
    start_daemon: StartDaemon,
    base: str,
    script: Path,
    tmp_path: Path,
    app_key_file: Path,
) -> None:
    harness_directory = tmp_path / "daemon"
    other = harness_directory / "workspaces" / "job-other" / "repo" / "planted.txt"
    journal = harness_directory / "journal.sqlite3"
    config = harness_directory / "config.toml"
    visible = tmp_path / "visible.txt"
    visible.write_text("anyone\n")
    probe = os.pathsep.join(map(str, [app_key_file, journal, config, other, visible]))
    harness = await start_daemon(
        jobs=[probe_job(script, PROBE=probe)], sections=sandboxed()
    )
    other.parent.mkdir(parents=True)
    other.write_text("another job's file\n")
    # The supervisor hides the folders of the configuration's files.
    hidden = harness.daemon.executor.settings().hidden_paths
    assert app_key_file.parent in hidden
    assert set(config_folders(harness.daemon.config)) <= set(hidden)

    run = await run_probe(harness, base)

    lines = output_lines(run)
    assert run["conclusion"] == "success"
    assert f"hidden {app_key_file}" in lines
    assert f"hidden {journal}" in lines
    assert f"hidden {config}" in lines
    assert f"hidden {other}" in lines
    assert f"readable {visible}" in lines
    assert app_key_file.parent in hidden


async def test_sandbox_hides_credentials_directory(
    start_daemon: StartDaemon,
    base: str,
    script: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    marker = credentials / "app-key.pem"
    marker.write_text("not a key\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    harness = await start_daemon(
        jobs=[probe_job(script, PROBE=str(marker))], sections=sandboxed()
    )

    run = await run_probe(harness, base)

    assert run["conclusion"] == "success"
    assert f"hidden {marker}" in output_lines(run)


async def test_sandbox_shows_only_its_own_processes(
    start_daemon: StartDaemon, base: str, script: Path
) -> None:
    harness = await start_daemon(jobs=[probe_job(script)], sections=sandboxed())

    run = await run_probe(harness, base)

    lines = output_lines(run)
    [pid_line] = [line for line in lines if line.startswith("pids ")]
    pids = [int(pid) for pid in pid_line.split()[1:]]
    assert os.getpid() not in pids
    assert len(pids) <= 3
    assert "init bwrap" in lines


async def test_sandbox_runs_in_checkout_with_empty_tmp(
    start_daemon: StartDaemon, base: str, script: Path
) -> None:
    harness = await start_daemon(jobs=[probe_job(script)], sections=sandboxed())

    run = await run_probe(harness, base)

    lines = output_lines(run)
    [cwd_line] = [line for line in lines if line.startswith("cwd ")]
    assert run["conclusion"] == "success"
    assert cwd_line.endswith("/repo")
    # /tmp is empty, except for the path to ghappd's own Python when it
    # lives under /tmp (as in a checkout there), which stays mounted.
    software = {Path(sys.prefix), Path(sys.base_prefix)}
    expected = sorted(
        {p.relative_to("/tmp").parts[0] for p in software if p.is_relative_to("/tmp")}
    )
    assert f"tmp {' '.join(expected) or '-'}" in lines


async def test_sandbox_kills_setsid_child(
    start_daemon: StartDaemon, base: str, script: Path
) -> None:
    argument = f"299.{random.randrange(10**6)}"
    harness = await start_daemon(
        jobs=[probe_job(script, ORPHAN=argument)], sections=sandboxed()
    )

    run = await run_probe(harness, base)

    assert run["conclusion"] == "success"
    left: list[int] = []
    with trio.move_on_after(10):
        while left := orphans(argument):
            await trio.sleep(0.02)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


async def test_missing_bwrap_fails_the_job(
    start_daemon: StartDaemon,
    base: str,
    script: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    which = shutil.which

    def which_without_bwrap(name: str, *args: Any, **kwargs: Any) -> str | None:
        return None if name == "bwrap" else which(name, *args, **kwargs)

    monkeypatch.setattr(daemon.jobs.execute.shutil, "which", which_without_bwrap)
    harness = await start_daemon(jobs=[probe_job(script)], sections=sandboxed())

    run = await run_probe(harness, base)

    assert run["conclusion"] == "failure"
    summary = str(run["output"]["summary"])
    assert 'set [runner] sandbox = "none" or install bubblewrap' in summary


def test_sandbox_argv_hides_parents_first(tmp_path: Path) -> None:
    root = tmp_path / "workspaces"
    checkout = root / "job-1" / "repo"
    checkout.mkdir(parents=True)
    (checkout.parent / "home").mkdir()

    argv = sandbox_argv(
        bwrap="/usr/bin/bwrap",
        checkout=checkout,
        hidden=[root, tmp_path, tmp_path / "missing", Path("/etc")],
    )

    covered = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--tmpfs"]
    assert covered == [str(tmp_path), str(root)]
    assert argv[-1] == "--"
    assert argv.index("--tmpfs") < argv.index("--bind")


async def test_run_command_rejects_relative_sandbox(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^sandbox must start with an absolute"):
        await run_command(
            ["true"],
            cwd=tmp_path,
            env={"PATH": os.defpath},
            timeout=5,
            kill_grace=1,
            nice=0,
            output_limit=100,
            sandbox=["bwrap", "--"],
        )
