"""Run a job's command in its own process group and capture its output.

The command runs in a new session, so its process group contains the
command and everything it starts (unless a descendant calls ``setsid``
itself). Stopping a command always signals that whole group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

__all__ = ["CommandResult", "build_environment", "run_command"]

log = logging.getLogger(__name__)

# After the command's group is gone, a descendant that left the group can
# still hold the output pipe open. Reading stops this many seconds later.
_DRAIN_SECONDS = 2.0

_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class CommandResult:
    """Outcome of one command run.

    ``exit_code`` is None when the command was killed by a signal (then
    ``signal`` is set) or could not be started (then ``output`` contains the reason).
    ``output`` is the tail of the merged stdout and stderr, at most the
    ``output_limit`` bytes before UTF-8 decoding, and ``output_bytes`` is
    the total count of bytes the command wrote. ``duration`` is in seconds.
    """

    exit_code: int | None
    signal: int | None
    timed_out: bool
    output: str
    output_bytes: int
    truncated: bool
    duration: float

    @property
    def succeeded(self) -> bool:
        """Whether the command exited with status 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out


class _OutputTail:
    """The last ``limit`` bytes of a stream, and the count of all bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.buffer = bytearray()

    def append(self, chunk: bytes | bytearray) -> None:
        self.total += len(chunk)
        self.buffer += chunk
        excess = len(self.buffer) - self.limit
        if excess > 0:
            del self.buffer[:excess]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.buffer)

    def text(self) -> str:
        data = bytes(self.buffer)
        if self.truncated:
            # The cut can fall inside a UTF-8 sequence: drop its
            # continuation bytes (0b10xxxxxx) instead of decoding them
            # as replacement characters.
            start = 0
            while start < min(len(data), 3) and data[start] & 0xC0 == 0x80:
                start += 1
            data = data[start:]
        return data.decode("utf-8", errors="replace")


def build_environment(
    *,
    event_name: str,
    event_path: Path,
    repository: str,
    sha: str,
    ref: str | None,
    api_url: str,
    server_url: str,
    workspace: Path,
    home: Path,
    token: str | None = None,
    path: str | None = None,
) -> dict[str, str]:
    """Return the minimal environment for a job's command.

    The names are the ones GitHub Actions documents for its default
    variables, except ``GITHUB_ACTIONS``, which stays unset because the
    command does not run under Actions. ``CI`` is ``true``. ``PATH`` is
    ``path``, or the daemon's own ``PATH`` when None. ``GITHUB_REF`` is set
    only when ``ref`` is given, and ``GITHUB_TOKEN`` only when ``token`` is.
    Nothing else of the daemon's environment is passed on.
    """
    environment = {
        "CI": "true",
        "GITHUB_EVENT_NAME": event_name,
        "GITHUB_EVENT_PATH": str(event_path),
        "GITHUB_REPOSITORY": repository,
        "GITHUB_REPOSITORY_OWNER": repository.partition("/")[0],
        "GITHUB_SHA": sha,
        "GITHUB_API_URL": api_url.rstrip("/"),
        "GITHUB_SERVER_URL": server_url.rstrip("/"),
        "GITHUB_WORKSPACE": str(workspace),
        "HOME": str(home),
        "PATH": path if path is not None else os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
    }
    if ref is not None:
        environment["GITHUB_REF"] = ref
    if token is not None:
        environment["GITHUB_TOKEN"] = token
    return environment


def _resolve_executable(name: str, *, cwd: Path, search_path: str) -> str | None:
    if "/" in name:
        candidate = Path(name) if os.path.isabs(name) else cwd / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        return None
    return shutil.which(name, path=search_path)


def _valid_prefix(sandbox: Sequence[str]) -> bool:
    return len(sandbox) >= 2 and os.path.isabs(sandbox[0]) and sandbox[-1] == "--"


def _signal_group(pgid: int, signum: int) -> None:
    # ESRCH: the group has no members left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


async def _stop_group(process: trio.Process, *, kill_grace: float) -> None:
    """Send SIGTERM to the group, then SIGKILL after ``kill_grace`` seconds.

    SIGKILL goes to the group once the leader has exited or the grace is
    over, whichever comes first, so no member outlives this call. Returns
    once the leader is reaped.
    """
    pgid = process.pid
    _signal_group(pgid, signal.SIGTERM)
    with trio.move_on_after(kill_grace):
        await process.wait()
    _signal_group(pgid, signal.SIGKILL)
    await process.wait()


async def _pump_output(
    stream: trio.abc.ReceiveStream, tail: _OutputTail, done: trio.Event
) -> None:
    try:
        while chunk := await stream.receive_some(_READ_SIZE):
            tail.append(chunk)
    finally:
        done.set()


def _start_failure(message: str) -> CommandResult:
    return CommandResult(
        exit_code=None,
        signal=None,
        timed_out=False,
        output=message + "\n",
        output_bytes=0,
        truncated=False,
        duration=0.0,
    )


async def run_command(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    kill_grace: float,
    nice: int,
    output_limit: int,
    sandbox: Sequence[str] | None = None,
) -> CommandResult:
    """Run ``argv`` in ``cwd`` with exactly ``env`` and return its result.

    The command gets stdin from /dev/null and one pipe for stdout and
    stderr together. It runs in a new session (its own process group), with
    its nice value raised by ``nice`` above the daemon's. ``nice(1)`` applies
    the increment before the command is executed, so every child inherits
    it. ``preexec_fn`` is unsafe in a process with threads, and
    ``setpriority`` after the spawn would miss children started before it.
    ``argv[0]`` is looked up in ``env["PATH"]``, or in ``cwd`` when it
    contains a slash.

    ``sandbox``, when given, is an argv prefix that ends with ``--`` (such
    as bubblewrap's options), put before the ``nice``-wrapped command. Its
    first element must be an absolute path. The process group and the
    signals below then apply to the sandbox's own process.

    After ``timeout`` seconds the group gets SIGTERM, then SIGKILL
    ``kill_grace`` seconds later, and the result has ``timed_out`` set.
    When the command exits by itself, any members left in its group get
    SIGKILL. A command that cannot be started returns a result with
    ``exit_code`` None and the reason in ``output``. This function raises
    ValueError for invalid arguments and nothing else.

    Cancellation: the group is stopped as on a timeout, inside a shielded
    scope, and then the cancellation propagates. This can take up to
    ``kill_grace`` seconds.
    """
    if not argv:
        raise ValueError("argv must name a command, got an empty sequence")
    if output_limit < 1:
        raise ValueError(f"output_limit must be at least 1 byte, got {output_limit!r}")
    if sandbox is not None and not _valid_prefix(sandbox):
        raise ValueError(
            "sandbox must start with an absolute path and end with '--',"
            f" got {list(sandbox)!r}"
        )

    search_path = env.get("PATH", os.defpath)
    executable = _resolve_executable(argv[0], cwd=cwd, search_path=search_path)
    if executable is None:
        log.warning("command %r not found in PATH %r", argv[0], search_path)
        return _start_failure(
            f"ghappd: command not found: {argv[0]!r} (looked in PATH={search_path!r})"
        )
    command = [executable, *argv[1:]]
    if nice:
        nice_executable = shutil.which("nice", path=search_path)
        if nice_executable is None:
            log.warning("nice(1) not found in PATH %r", search_path)
            return _start_failure(
                f"ghappd: nice(1) not found in PATH={search_path!r}; "
                "install coreutils or set the job's nice value to 0"
            )
        command = [nice_executable, "-n", str(nice), "--", *command]
    if sandbox is not None:
        command = [*sandbox, *command]

    started = trio.current_time()
    try:
        process = await trio.lowlevel.open_process(
            command,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("command %r failed to start: %s", argv[0], exc)
        return _start_failure(f"ghappd: failed to start {argv[0]!r}: {exc}")
    log.info("command %r started as process group %d", argv[0], process.pid)

    assert process.stdout is not None
    tail = _OutputTail(output_limit)
    drained = trio.Event()
    timed_out = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_output, process.stdout, tail, drained)

            with trio.move_on_after(timeout) as deadline:
                await process.wait()
            if deadline.cancelled_caught:
                timed_out = True
                log.info(
                    "command %r timed out after %s s; stopping group %d",
                    argv[0],
                    timeout,
                    process.pid,
                )
                await _stop_group(process, kill_grace=kill_grace)
            else:
                _signal_group(process.pid, signal.SIGKILL)

            with trio.move_on_after(_DRAIN_SECONDS):
                await drained.wait()
            nursery.cancel_scope.cancel()
    except BaseException:
        with trio.CancelScope(shield=True):
            log.info("command %r interrupted; stopping group %d", argv[0], process.pid)
            await _stop_group(process, kill_grace=kill_grace)
        raise
    finally:
        with trio.CancelScope(shield=True):
            await process.stdout.aclose()

    duration = trio.current_time() - started
    returncode = process.returncode
    assert returncode is not None
    result = CommandResult(
        exit_code=returncode if returncode >= 0 else None,
        signal=-returncode if returncode < 0 else None,
        timed_out=timed_out,
        output=tail.text(),
        output_bytes=tail.total,
        truncated=tail.truncated,
        duration=duration,
    )
    log.info(
        "command %r finished: exit code %s, signal %s, %d output bytes",
        argv[0],
        result.exit_code,
        result.signal,
        result.output_bytes,
    )
    return result
