"""Benchmark one command job: the wait before it starts, and the daemon's CPU.

Run ``.venv/bin/python bench/job_latency.py``. The GitHub emulator runs
in a child process, so its CPU time is not counted. The daemon runs in
this process, as ``ghappd run`` does, with the configuration the tests
use (SQLite journal, ``nice = 10``), and log records below WARNING are
dropped. The
job's command is ``date +%s.%N``, through ``sh`` so the line also goes to
a file this process reads: it prints the wall clock as its first line
the moment it starts.

Two measurements:

- Latency: ``--runs`` deliveries, one at a time, each to an idle
  installation (its lane closed after the previous job). For each, the
  time from the 202 response to the timestamp the command printed: the
  journal update, the queued check run, the token, the in-progress check
  run, the depth-1 fetch and the command's start.
- CPU: ``--batch`` deliveries posted at once, then
  ``resource.getrusage`` around the batch. ``RUSAGE_SELF`` is the
  daemon's own CPU time (plus this process's small HTTP client);
  ``RUSAGE_CHILDREN`` is that of the reaped children, which are git and
  the command. Both are given per job, with their ratio.

``--profile FILE`` runs the batch under cProfile and writes its
statistics to FILE, with the top functions by cumulative time in
FILE.txt.

Everything listens on 127.0.0.1, and every wait is bounded by
``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import hashlib
import hmac
import io
import json
import logging
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.config import load_config  # noqa: E402
from daemon.sandbox import Emulator, generate_app_key  # noqa: E402
from daemon.supervisor import Daemon  # noqa: E402

APP_ID = 4242
INSTALLATION_ID = 1001
REPOSITORY = "octo-org/bench"
SECRET = "bench-webhook-secret"
FIXTURE = REPO / "tests" / "fixtures" / "webhooks" / "pull_request.json"


# -- the emulator's process -------------------------------------------------


async def _serve_emulator(directory: Path, key: bytes, commits: int) -> None:
    emulator = Emulator(app_id=APP_ID, public_key=key, repos_root=directory / "repos")
    emulator.add_installation(INSTALLATION_ID, account="octo-org")
    emulator.create_repository(REPOSITORY, {"README.md": "bench\n"})
    # One commit per pull request, so no job's check run lookup lists the
    # check runs of the jobs before it.
    shas = [
        emulator.commit(REPOSITORY, {"app.py": f"x = {n}\n"}, branch=f"pr-{n}")
        for n in range(commits)
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(emulator.serve)
        urls = {"api": emulator.api_url, "git": emulator.git_url, "shas": shas}
        print(json.dumps(urls))
        sys.stdout.flush()
        # Serve until the parent process closes stdin.
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()


# -- the daemon's process ---------------------------------------------------


def _config(directory: Path, urls: dict[str, str], key_file: Path) -> Path:
    (directory / "webhook-secret").write_text(SECRET)
    stamps = directory / "stamps"
    text = f"""
[app]
id = {APP_ID}
private_key_file = {json.dumps(str(key_file))}
webhook_secret_files = ["webhook-secret"]
api_url = {json.dumps(urls["api"])}
git_url = {json.dumps(urls["git"])}

[server]
listen = ["127.0.0.1:0"]

[workspaces]
root = {json.dumps(str(directory / "workspaces"))}

[journal]
path = {json.dumps(str(directory / "journal.sqlite3"))}
redeliver_missed = false

[logging]
level = "warning"

[[jobs]]
name = "stamp"
on = ["pull_request"]
command = ["sh", "-c", 'date +%s.%N | tee -a "$STAMPS"']
env = {{ STAMPS = {json.dumps(str(stamps))} }}
timeout = "30s"
"""
    path = directory / "config.toml"
    path.write_text(text)
    return path


def _payload(template: dict[str, Any], number: int, sha: str) -> bytes:
    payload = copy.deepcopy(template)
    payload["installation"] = {"id": INSTALLATION_ID}
    payload["number"] = number
    pull = payload["pull_request"]
    pull["number"] = number
    pull["draft"] = False
    pull["head"]["sha"] = sha
    payload["repository"]["full_name"] = REPOSITORY
    payload["repository"]["default_branch"] = "main"
    return json.dumps(payload).encode()


class _Poster:
    def __init__(self, http: httpx.AsyncClient, url: str, shas: list[str]) -> None:
        self.http = http
        self.url = url
        self.shas = shas
        self.number = 0
        fixtures = json.loads(FIXTURE.read_text())
        self.template = next(p for p in fixtures if p.get("action") == "opened")

    async def post(self) -> float:
        """Post the delivery of a new pull request; return the time of the 202."""
        self.number += 1
        body = _payload(self.template, self.number, self.shas[self.number - 1])
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        response = await self.http.post(
            self.url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": "pull_request",
                "X-GitHub-Delivery": f"bench-{self.number}",
                "X-Hub-Signature-256": f"sha256={signature}",
            },
        )
        answered = time.time()
        if response.status_code != 202:
            raise RuntimeError(
                f"the intake returned HTTP {response.status_code} for delivery"
                f" bench-{self.number}; expected 202"
            )
        return answered


async def _wait(condition: Any, *, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.002)
        return
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def _stamps(path: Path) -> list[float]:
    if not path.exists():
        return []
    return [float(line) for line in path.read_text().split()]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def _bench(args: argparse.Namespace, directory: Path) -> None:
    key = generate_app_key()
    key_file = directory / "app-key.pem"
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    (directory / "emulator").mkdir()

    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-emulator",
            str(directory / "emulator"),
            "--commits",
            str(args.warmup + args.runs + args.batch),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "BENCH_KEY": key.decode()},
    )
    try:
        assert child.stdout is not None
        urls = json.loads(child.stdout.readline())
        config = load_config(_config(directory, urls, key_file), environ={})
        daemon = Daemon(config, environ={})
        stamps = directory / "stamps"
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            [url] = await nursery.start(daemon.run)
            await _wait(
                lambda: daemon.readiness.ready, timeout=args.timeout, what="ready"
            )
            poster = _Poster(http, url + config.server.webhook_path, urls["shas"])

            latencies = []
            for _ in range(args.warmup + args.runs):
                count = len(_stamps(stamps))
                answered = await poster.post()
                await _wait(
                    lambda count=count: len(_stamps(stamps)) > count,
                    timeout=args.timeout,
                    what="the job's first line",
                )
                latencies.append(_stamps(stamps)[-1] - answered)
                await _wait(
                    lambda: not daemon.dispatcher.lanes,
                    timeout=args.timeout,
                    what="the lane to close",
                )
            latencies = latencies[args.warmup :]

            count = len(_stamps(stamps))
            profiler = cProfile.Profile() if args.profile else None
            if profiler is not None:
                profiler.enable()
            self_before = resource.getrusage(resource.RUSAGE_SELF)
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall_before = time.perf_counter()
            for _ in range(args.batch):
                await poster.post()
            await _wait(
                lambda: (
                    len(_stamps(stamps)) >= count + args.batch
                    and not daemon.dispatcher.lanes
                ),
                timeout=args.timeout * args.batch,
                what="the batch",
            )
            wall = time.perf_counter() - wall_before
            self_after = resource.getrusage(resource.RUSAGE_SELF)
            children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if profiler is not None:
                profiler.disable()
                _write_profile(profiler, args.profile)

            daemon.shutdown()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=args.timeout)

    def cpu(after: Any, before: Any) -> float:
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    own = cpu(self_after, self_before) / args.batch
    children = cpu(children_after, children_before) / args.batch
    ms = 1000.0
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"latency, 202 to the job's first line, {args.runs} idle runs:")
    print(f"  median {statistics.median(latencies) * ms:7.1f} ms")
    print(f"  p90    {_percentile(latencies, 0.9) * ms:7.1f} ms")
    print(f"  min    {min(latencies) * ms:7.1f} ms")
    print(f"  max    {max(latencies) * ms:7.1f} ms")
    print(f"batch of {args.batch} jobs posted at once: {wall:.2f} s wall")
    print(f"  daemon CPU per job (RUSAGE_SELF)       {own * ms:7.1f} ms")
    print(f"  git + command CPU (RUSAGE_CHILDREN)    {children * ms:7.1f} ms")
    print(f"  daemon / children                      {own / children:7.2f}")
    print(f"  wall per job                           {wall / args.batch * ms:7.1f} ms")


def _write_profile(profiler: cProfile.Profile, path: Path) -> None:
    profiler.dump_stats(path)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(40)
    path.with_name(path.name + ".txt").write_text(text.getvalue())
    print(f"profile written to {path} and {path}.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=int,
        default=30,
        help="measured latency runs, one job each (default %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="unmeasured latency runs before them (default %(default)s)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=30,
        help="jobs in the CPU batch (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="time limit of any one wait, in seconds, and of the batch this"
        " times --batch (default %(default)s)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="file for cProfile statistics of the batch (default: no profile)",
    )
    parser.add_argument("--serve-emulator", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--commits", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.serve_emulator is not None:
        key = os.environ["BENCH_KEY"].encode()
        trio.run(_serve_emulator, args.serve_emulator, key, args.commits)
        return
    with tempfile.TemporaryDirectory(prefix="ghappd-bench-") as directory:
        trio.run(_bench, args, Path(directory))


if __name__ == "__main__":
    main()
