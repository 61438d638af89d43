"""Benchmark the intake with the SQLite journal against the memory journal.

Run ``.venv/bin/python bench/intake_journal.py``. The script serves the
GitHub emulator on 127.0.0.1 (the daemon checks its App credentials
there), then starts ``ghappd run`` as a child process twice per round:
once with ``[journal] enabled = true`` (SqliteJournal, one file in a
temporary directory) and once with ``enabled = false`` (MemoryJournal).
The only job rule matches ``push`` events, so no job runs and what is
measured is the intake, the router and the journal: each accepted
delivery is one committed insert and one committed state change.

This process is the load generator. It sends ``--warmup`` unmeasured
requests, then ``--requests`` signed ``pull_request.opened`` deliveries
over ``--connections`` keep-alive connections. Every delivery has the
real payload from tests/fixtures/webhooks and its own delivery id. For
each run it prints requests per second, latency percentiles and the
daemon's CPU time per request. At the end it prints the medians over
``--rounds`` rounds and the ratio of the journal's throughput to the
memory journal's. Every loop is
bounded by the request count and by ``--timeout`` seconds per request.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import loadgen
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.sandbox import Emulator, generate_app_key  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "webhooks" / "pull_request.json"
SECRET = b"intake journal bench secret"
PATH = "/webhooks/github"
INSTALLATION_ID = 1001
# Seconds the daemon gets to start, and to stop after SIGTERM.
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0


def _body() -> bytes:
    payloads = json.loads(FIXTURE.read_text())
    payload = next(p for p in payloads if p.get("action") == "opened")
    payload["installation"] = {"id": INSTALLATION_ID}
    return json.dumps(payload).encode()


def build_requests(host: str, port: int, count: int, prefix: str) -> list[bytes]:
    """Return ``count`` raw HTTP/1.1 requests, each with its own delivery id."""
    return loadgen.build_requests(
        host, port, path=PATH, body=_body(), secret=SECRET, count=count, prefix=prefix
    )


def write_config(directory: Path, emulator: Emulator, *, journal: bool) -> Path:
    """Write the daemon's configuration for one variant into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "webhook-secret").write_bytes(SECRET)
    text = f"""
[app]
id = {emulator.app_id}
private_key_file = "{directory.parent / "app-key.pem"}"
webhook_secret_files = ["webhook-secret"]
api_url = "{emulator.api_url}"
git_url = "{emulator.git_url}"

[server]
listen = ["fd://3"]

[queue]
shutdown_grace = "5s"

[workspaces]
root = "{directory / "workspaces"}"

[journal]
enabled = {"true" if journal else "false"}
path = "{directory / "journal.sqlite3"}"
redeliver_missed = false

[logging]
format = "console"
level = "warning"

[[jobs]]
name = "push-only"
on = ["push"]
command = ["true"]
"""
    path = directory / "config.toml"
    path.write_text(text)
    return path


# Runs argv[2:] as this same process with fd argv[1] moved to fd 3 and
# LISTEN_FDS/LISTEN_PID set, as systemd's socket activation passes a
# socket (sd_listen_fds(3)). The bench binds the socket, so it has the
# daemon's URL before the daemon starts.
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


async def start_daemon(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``ghappd run`` on a socket bound here; wait until /readyz is 200."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC"):
        environment.pop(name, None)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    host, port = listener.getsockname()
    url = f"http://{host}:{port}"
    fd = listener.fileno()
    wrapper = [sys.executable, "-c", _LISTEN_WRAPPER, str(fd)]
    ghappd = [sys.executable, "-m", "daemon", "run", "--config", str(config)]
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*wrapper, *ghappd],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=environment,
            cwd=str(config.parent),
            pass_fds=(fd,),
        )
    listener.close()
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"ghappd exited with {process.returncode}:\n{log.read_text()}"
            )
        if await _ready(url):
            return process, url
        await trio.sleep(0.05)
    process.kill()
    raise RuntimeError(f"ghappd did not become ready in {_START_TIMEOUT} s")


async def _ready(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        stream = await trio.open_tcp_stream(host, int(port))
    except OSError:
        return False
    async with stream:
        await stream.send_all(
            f"GET /readyz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        )
        status, _, _ = await loadgen.read_response(stream, b"")
    return status == 200


async def measure(
    emulator: Emulator,
    directory: Path,
    *,
    variant: str,
    round_number: int,
    arguments: argparse.Namespace,
) -> loadgen.LoadResult:
    """Start a fresh daemon for ``variant``, load it, stop it, return the run."""
    journal = variant == "sqlite"
    workdir = directory / f"{variant}-{round_number}"
    config = write_config(workdir, emulator, journal=journal)
    process, url = await start_daemon(config, workdir / "stderr.log")
    try:
        host, port = url.removeprefix("http://").split(":")
        batch = build_requests(
            host,
            int(port),
            arguments.warmup + arguments.requests,
            f"{variant}-{round_number}",
        )
        return await loadgen.run_load(
            host,
            int(port),
            batch,
            label=variant,
            warmup=arguments.warmup,
            server_pid=process.pid,
            connections=arguments.connections,
            timeout=arguments.timeout,
        )
    finally:
        loadgen.stop_process(process, timeout=_STOP_TIMEOUT)


def report(run: loadgen.LoadResult) -> str:
    return (
        f"{run.label:>7}: {run.rps:7.0f} req/s"
        f"  p50 {run.percentile(0.50) * 1000:6.2f} ms"
        f"  p99 {run.percentile(0.99) * 1000:6.2f} ms"
        f"  daemon CPU {run.server_cpu / run.requests * 1e6:6.0f} us/req"
        f"  statuses {dict(sorted(run.statuses.items()))}"
    )


async def main(arguments: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ghappd-bench-") as name:
        directory = Path(name)
        key = generate_app_key()
        (directory / "app-key.pem").write_bytes(key)
        (directory / "app-key.pem").chmod(0o600)
        emulator = Emulator(app_id=4242, public_key=key, repos_root=directory / "repos")
        emulator.add_installation(INSTALLATION_ID, account="octo-org")
        runs: dict[str, list[loadgen.LoadResult]] = {"sqlite": [], "memory": []}
        async with trio.open_nursery() as nursery:
            await nursery.start(emulator.serve)
            print(
                f"{arguments.requests} requests after {arguments.warmup} warm-up,"
                f" {arguments.connections} connections,"
                f" {len(_body())} byte body, {os.cpu_count()} CPUs"
            )
            for round_number in range(arguments.rounds):
                for variant in ("sqlite", "memory"):
                    run = await measure(
                        emulator,
                        directory,
                        variant=variant,
                        round_number=round_number,
                        arguments=arguments,
                    )
                    runs[variant].append(run)
                    print(f"round {round_number + 1} {report(run)}")
            nursery.cancel_scope.cancel()

    medians = {
        variant: statistics.median(run.rps for run in found)
        for variant, found in runs.items()
    }
    p99 = {
        variant: statistics.median(run.percentile(0.99) for run in found)
        for variant, found in runs.items()
    }
    cpu = {
        variant: statistics.median(run.server_cpu / run.requests for run in found)
        for variant, found in runs.items()
    }
    for variant in ("sqlite", "memory"):
        print(
            f"median {variant:>7}: {medians[variant]:7.0f} req/s,"
            f" p99 {p99[variant] * 1000:6.2f} ms,"
            f" daemon CPU {cpu[variant] * 1e6:6.0f} us/req"
        )
    ratio = medians["sqlite"] / medians["memory"]
    print(
        f"sqlite / memory throughput: {ratio:.2f}"
        f" (the journal costs {(1 - ratio) * 100:.0f}% of the requests per second)"
    )
    print(
        f"sqlite / memory daemon CPU per request: {cpu['sqlite'] / cpu['memory']:.2f}"
    )


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests",
        type=int,
        default=3000,
        help="measured requests per run (default %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=300,
        help="unmeasured requests before them (default %(default)s)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="concurrent keep-alive connections (default %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds, each running both journals once (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="time limit of one request, in seconds (default %(default)s)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_arguments())
