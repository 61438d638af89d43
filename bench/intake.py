"""Benchmark the webhook intake against a bare quart-trio route.

Run ``.venv/bin/python bench/intake.py``. Each server runs in its own
process, on hypercorn's trio worker through ``serve_intake``; this process
is the load generator. It opens ``--connections`` keep-alive connections
and sends ``--requests`` signed ``pull_request`` deliveries (a real
payload from tests/fixtures/webhooks), each with its own delivery id,
after ``--warmup`` requests that are not measured. Three servers take
turns for ``--rounds`` rounds, in an order that rotates each round:

- ``bare``, a quart-trio route that only checks the HMAC and parses the JSON
- ``ghappd``, the intake app with a MemorySink whose channel a task drains,
  logging at INFO
- ``ghappd-quiet``, the same with logging at WARNING, so without the one
  record per accepted delivery

It prints requests per second and latency
percentiles of each round, then the medians and their ratio to ``bare``.
``--profile DIR`` runs bare and ghappd once more under cProfile and
writes ``DIR/{bare,ghappd}.prof`` with text summaries beside them.

Servers and the load generator use 127.0.0.1 only; every loop is bounded
by the request count and by ``--timeout`` seconds per request.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import hmac
import io
import json
import logging
import os
import pstats
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import loadgen
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.delivery import Delivery  # noqa: E402
from daemon.intake import (  # noqa: E402
    IntakeSettings,
    MemorySink,
    Readiness,
    create_app,
    serve_intake,
)

SECRET = b"bench secret"
PATH = "/webhooks/github"
FIXTURE = REPO / "tests" / "fixtures" / "webhooks" / "pull_request.json"


# The servers


def _bare_app() -> Any:
    """Return a quart-trio app that only checks the HMAC and parses the JSON."""
    from quart import Response, request
    from quart_trio import QuartTrio

    app = QuartTrio("bare")

    @app.post(PATH)
    async def receive() -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        received = request.headers.get("X-Hub-Signature-256", "")
        if not hmac.compare_digest(expected, received):
            return Response('{"error": "bad signature"}', status=401)
        json.loads(body)
        document = {
            "status": "accepted",
            "delivery": request.headers.get("X-GitHub-Delivery"),
        }
        return Response(
            json.dumps(document), status=202, content_type="application/json"
        )

    return app


async def _serve(kind: str) -> None:
    # The receiver is installed before the URL is printed, so a SIGTERM sent
    # by the parent always starts a graceful shutdown.
    with trio.open_signal_receiver(signal.SIGTERM) as signals:

        async def wait_for_sigterm() -> None:
            async for _ in signals:
                return

        async with trio.open_nursery() as nursery:
            app = _ghappd_app(nursery) if kind == "ghappd" else _bare_app()

            async def serve_then_stop(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_intake(
                    app,
                    binds=["127.0.0.1:0"],
                    shutdown_trigger=wait_for_sigterm,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()

            urls = await nursery.start(serve_then_stop)
            print(urls[0], flush=True)


def _ghappd_app(nursery: trio.Nursery) -> Any:
    """Return the intake app with a MemorySink whose channel is always drained."""
    send_channel, receive_channel = trio.open_memory_channel[Delivery](1000)

    async def drain() -> None:
        async for _ in receive_channel:
            pass

    nursery.start_soon(drain)
    settings = IntakeSettings(secrets=(SECRET,))
    readiness = Readiness()
    readiness.set("config_loaded", "credentials_accepted")
    return create_app(
        settings=lambda: settings,
        sink=MemorySink(send_channel=send_channel),
        readiness=readiness,
    )


def serve_main(kind: str, log_level: str, profile: Path | None) -> None:
    """Serve one app until SIGTERM, under cProfile when ``profile`` is set."""
    # Logs go to /dev/null through a stdlib StreamHandler. At INFO the intake
    # pays for its one record per delivery, but for no terminal I/O.
    with open(os.devnull, "w") as devnull:
        logging.basicConfig(level=log_level, stream=devnull)
        if profile is None:
            trio.run(_serve, kind)
            return
        # CPU time, not wall time, so other processes on the machine do not
        # inflate the functions that happened to be running.
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        try:
            trio.run(_serve, kind)
        finally:
            profiler.disable()
            profiler.dump_stats(profile)


# The load generator


def build_requests(host: str, port: int, count: int, prefix: str) -> list[bytes]:
    """Return ``count`` raw HTTP/1.1 requests, one delivery id each."""
    payload = json.loads(FIXTURE.read_text())[0]
    body = json.dumps(payload).encode()
    return loadgen.build_requests(
        host, port, path=PATH, body=body, secret=SECRET, count=count, prefix=prefix
    )


async def run_load(
    url: str,
    *,
    kind: str,
    server_pid: int,
    requests: int,
    warmup: int,
    connections: int,
    timeout: float,
) -> loadgen.LoadResult:
    """Send ``warmup`` then ``requests`` requests over ``connections`` connections."""
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname is not None and parsed.port is not None
    host, port = parsed.hostname, parsed.port
    batch = build_requests(host, port, warmup + requests, f"{kind}-{os.getpid()}")
    return await loadgen.run_load(
        host,
        port,
        batch,
        label=kind,
        warmup=warmup,
        server_pid=server_pid,
        connections=connections,
        timeout=timeout,
    )


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str
    log_level: str


VARIANTS = (
    Variant("bare", "bare", "INFO"),
    Variant("ghappd", "ghappd", "INFO"),
    Variant("ghappd-quiet", "ghappd", "WARNING"),
)


def start_server(
    variant: Variant, profile: Path | None
) -> tuple[subprocess.Popen[str], str]:
    """Start ``bench/intake.py serve`` for ``variant`` and return it with its URL."""
    command = [sys.executable, str(Path(__file__).resolve()), "serve", variant.kind]
    command += ["--log-level", variant.log_level]
    if profile is not None:
        command += ["--profile", str(profile)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        process.kill()
        raise RuntimeError(f"server {variant.label!r} printed {url!r}, not its URL")
    return process, url


def measure(
    variant: Variant, args: argparse.Namespace, profile: Path | None = None
) -> loadgen.LoadResult:
    process, url = start_server(variant, profile)
    try:
        return trio.run(
            lambda: run_load(
                url,
                kind=variant.label,
                server_pid=process.pid,
                requests=args.requests,
                warmup=args.warmup,
                connections=args.connections,
                timeout=args.timeout,
            )
        )
    finally:
        loadgen.stop_process(process, timeout=30)


def report(result: loadgen.LoadResult) -> str:
    return (
        f"{result.label:>12}: {result.rps:8.1f} req/s"
        f"  p50 {result.percentile(0.50) * 1000:6.1f} ms"
        f"  p99 {result.percentile(0.99) * 1000:6.1f} ms"
        f"  server CPU {result.cpu_per_request * 1e6:5.0f} us/req"
        f"  statuses {dict(sorted(result.statuses.items()))}"
    )


def write_profile_summary(profile: Path, summary: Path) -> None:
    text = io.StringIO()
    stats = pstats.Stats(str(profile), stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    summary.write_text(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests",
        type=int,
        default=5000,
        help="measured requests per server per round (default %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=500,
        help="unmeasured requests before them (default %(default)s)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=16,
        help="concurrent keep-alive connections (default %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds, each running every server once (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="time limit of one request, in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="directory for cProfile runs of bare and ghappd (default: no profile)",
    )
    args = parser.parse_args()

    print(
        f"{args.requests} requests, {args.connections} connections,"
        f" {args.warmup} warm-up, {args.rounds} rounds,"
        f" Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    results: dict[str, list[loadgen.LoadResult]] = {
        variant.label: [] for variant in VARIANTS
    }
    for round_index in range(args.rounds):
        # Each round starts with the next server, because the server that
        # runs right after another measured slower in trials on this machine.
        shift = round_index % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            result = measure(variant, args)
            results[variant.label].append(result)
            print(report(result), flush=True)

    rps = {
        label: statistics.median(result.rps for result in rounds)
        for label, rounds in results.items()
    }
    p99 = {
        label: statistics.median(result.percentile(0.99) for result in rounds)
        for label, rounds in results.items()
    }
    cpu = {
        label: statistics.median(result.cpu_per_request for result in rounds)
        for label, rounds in results.items()
    }
    for label in results:
        print(
            f"median {label:>12}: {rps[label]:8.1f} req/s,"
            f" p99 {p99[label] * 1000:6.1f} ms,"
            f" server CPU {cpu[label] * 1e6:5.0f} us/req;"
            f" ratio to bare: req/s {rps[label] / rps['bare']:.2f},"
            f" CPU {cpu['bare'] / cpu[label]:.2f}"
        )

    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        for variant in VARIANTS[:2]:
            profile = args.profile / f"{variant.label}.prof"
            result = measure(variant, args, profile)
            print("profiled " + report(result))
            write_profile_summary(profile, args.profile / f"{variant.label}.txt")
        print(f"profiles written to {args.profile}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve_parser = argparse.ArgumentParser(prog="bench/intake.py serve")
        serve_parser.add_argument(
            "kind", choices=["bare", "ghappd"], help="the server to run"
        )
        serve_parser.add_argument(
            "--log-level",
            default="INFO",
            help="stdlib logging level name (default %(default)s)",
        )
        serve_parser.add_argument(
            "--profile",
            type=Path,
            help="file for the server's cProfile statistics (default: no profile)",
        )
        serve_args = serve_parser.parse_args(sys.argv[2:])
        serve_main(serve_args.kind, serve_args.log_level, serve_args.profile)
    else:
        main()
