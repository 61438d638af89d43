"""Run ``ghappd run`` as a child process against the in-test emulator.

``spawn_daemon(config, ...)`` starts ``python -m daemon run --config FILE``
with its stdout and stderr going to files, and returns a
:class:`DaemonProcess` that waits for its log lines, signals it and posts
signed webhooks to it. The fixture kills every child it started, and every
job process group the slow job wrote down, when the test ends.

The slow job (:func:`gated_job`) appends ``start``/``end`` lines to a log
file and waits, bounded, for a gate file the test creates, so a test can
kill or stop the daemon while the job runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fixtures_daemon import sign

# The maximum time a test waits for a child process to act, in seconds. Waits
# end as soon as their condition holds; this bound only stops a broken test.
PROCESS_WAIT = 30.0
GHAPPD = (sys.executable, "-m", "daemon")
REPO_ROOT = Path(__file__).resolve().parent.parent

# argv: LOG GATE. Appends "start INSTALLATION NUMBER PGID" to LOG, waits
# up to 20 s for the file GATE, then appends "end INSTALLATION NUMBER".
_GATED_SCRIPT = """
import json, os, sys, time
log, gate = sys.argv[1], sys.argv[2]
event = json.load(open(os.environ["GITHUB_EVENT_PATH"]))
who = f"{event['installation']['id']} {event['number']}"
with open(log, "a") as out:
    out.write(f"start {who} {os.getpgid(0)}\\n")
deadline = time.monotonic() + 20
while not os.path.exists(gate):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.02)
with open(log, "a") as out:
    out.write(f"end {who}\\n")
"""

# Runs argv[2:] as this same process, with fd argv[1] moved to fd 3 and
# LISTEN_FDS/LISTEN_PID set as systemd's socket activation sets them
# (sd_listen_fds(3)), so LISTEN_PID matches the pid of ghappd itself.
_LISTEN_WRAPPER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""

_READY = re.compile(r"ghappd ready on (http://[0-9.]+:[0-9]+)")


def gated_job(
    name: str, *, log: Path, gate: Path, on: Sequence[str] = ("pull_request.opened",)
) -> dict[str, Any]:
    """Return a job rule whose command waits for ``gate`` and logs to ``log``."""
    return {
        "name": name,
        "on": list(on),
        "command": [sys.executable, "-c", _GATED_SCRIPT, str(log), str(gate)],
        "timeout": "30s",
    }


def socket_activation_prefix(fd: int) -> list[str]:
    """Return the exec wrapper argv that passes ``fd`` to ghappd as fd 3.

    Start the child with ``pass_fds=[fd]``.
    """
    return [sys.executable, "-c", _LISTEN_WRAPPER, str(fd)]


@dataclass(frozen=True)
class JobLine:
    """One line of a gated job's log."""

    kind: str
    installation_id: int
    number: int
    pgid: int | None


def read_job_log(path: Path) -> list[JobLine]:
    """Return the lines of a gated job's log, oldest first."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        parts = text.split()
        if len(parts) < 3:
            continue
        pgid = int(parts[3]) if len(parts) > 3 else None
        lines.append(JobLine(parts[0], int(parts[1]), int(parts[2]), pgid))
    return lines


def starts(path: Path, installation_id: int | None = None) -> list[int]:
    """Return the pull request numbers whose job started, in start order."""
    return [
        line.number
        for line in read_job_log(path)
        if line.kind == "start"
        if installation_id is None or line.installation_id == installation_id
    ]


def ends(path: Path, installation_id: int | None = None) -> list[int]:
    """Return the pull request numbers whose job ended, in end order."""
    return [
        line.number
        for line in read_job_log(path)
        if line.kind == "end"
        if installation_id is None or line.installation_id == installation_id
    ]


def group_alive(pgid: int) -> bool:
    """Return whether any process of group ``pgid`` exists (zombies included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def wait_for(
    condition: Callable[[], bool], *, timeout: float = PROCESS_WAIT, what: str
) -> None:
    """Poll ``condition`` every 20 ms; raise AssertionError after ``timeout``."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def webhook_request(
    event: str, payload: Mapping[str, Any], delivery_id: str
) -> tuple[bytes, dict[str, str]]:
    """Return the body and headers GitHub sends for one signed delivery."""
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id,
        "X-Hub-Signature-256": sign(body),
    }
    return body, headers


@dataclass
class DaemonProcess:
    """A running ``ghappd run`` child and its captured output."""

    process: trio.Process
    stderr_path: Path
    stdout_path: Path
    url: str = ""
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient())

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    async def wait_log(self, pattern: str, *, timeout: float = PROCESS_WAIT) -> None:
        """Wait until stderr matches the regular expression ``pattern``."""
        compiled = re.compile(pattern)

        def found() -> bool:
            if compiled.search(self.stderr()):
                return True
            if not self.running():
                raise AssertionError(
                    f"ghappd exited with {self.process.returncode} before"
                    f" logging {pattern!r}:\n{self.stderr()[-4000:]}"
                )
            return False

        await wait_for(found, timeout=timeout, what=f"log line {pattern!r}")

    async def wait_ready(self, *, timeout: float = PROCESS_WAIT) -> str:
        """Wait for the ready log line; return and keep the intake's URL."""
        await self.wait_log(_READY.pattern, timeout=timeout)
        match = _READY.search(self.stderr())
        assert match is not None
        self.url = match.group(1)
        return self.url

    async def post(
        self,
        event: str,
        payload: Mapping[str, Any],
        *,
        delivery_id: str | None = None,
        url: str | None = None,
    ) -> httpx.Response:
        body, headers = webhook_request(
            event, payload, delivery_id or str(uuid.uuid4())
        )
        target = url or f"{self.url}/webhooks/github"
        return await self.http.post(target, content=body, headers=headers, timeout=30)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self, *, timeout: float = PROCESS_WAIT) -> int:
        """Wait for the child to exit; return its exit status."""
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def kill(self) -> None:
        """Send SIGKILL and reap the child."""
        if self.running():
            self.process.kill()
        await self.process.wait()
        await self.http.aclose()


SpawnDaemon = Callable[..., Awaitable[DaemonProcess]]


@pytest.fixture
async def spawn_daemon(tmp_path: Path) -> AsyncIterator[SpawnDaemon]:
    """Return a function that starts ``ghappd run --config FILE`` as a child.

    Keyword arguments: ``env`` (added to this process's environment),
    ``pass_fds`` and ``prefix`` (argv put before the ghappd command, for an
    exec wrapper). Every child still running at teardown is killed, and
    so is every process group written to a ``*.joblog`` file in tmp_path.
    """
    children: list[DaemonProcess] = []

    async def spawn(
        config: Path,
        *,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        prefix: Sequence[str] = (),
        wait_ready: bool = True,
    ) -> DaemonProcess:
        index = len(children)
        stderr_path = tmp_path / f"ghappd-{index}.stderr"
        stdout_path = tmp_path / f"ghappd-{index}.stdout"
        environment = dict(os.environ)
        environment.pop("NOTIFY_SOCKET", None)
        environment.pop("LISTEN_FDS", None)
        environment.pop("LISTEN_PID", None)
        environment["PYTHONPATH"] = str(REPO_ROOT)
        environment.update(env or {})
        with stderr_path.open("wb") as err, stdout_path.open("wb") as out:
            process = await trio.lowlevel.open_process(
                [*prefix, *GHAPPD, "run", "--config", str(config)],
                stdout=out,
                stderr=err,
                env=environment,
                pass_fds=tuple(pass_fds),
                cwd=str(tmp_path),
            )
        child = DaemonProcess(
            process=process, stderr_path=stderr_path, stdout_path=stdout_path
        )
        children.append(child)
        if wait_ready:
            await child.wait_ready()
        return child

    yield spawn

    for child in children:
        with trio.CancelScope(shield=True):
            await child.kill()
    for log in tmp_path.glob("*.joblog"):
        for line in read_job_log(log):
            if line.pgid is not None and _is_gated_job(line.pgid, log):
                os.killpg(line.pgid, signal.SIGKILL)


def _is_gated_job(pgid: int, log: Path) -> bool:
    # The group leader's command line names the log, so a recycled pid
    # of an unrelated process is never killed.
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(log).encode() in cmdline
