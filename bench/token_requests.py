"""Count installation-token requests for 1,000 jobs over 50 installations.

Run ``.venv/bin/python bench/token_requests.py``. It starts the GitHub
emulator on 127.0.0.1 with ``--installations`` installations (default 50)
and spreads ``--jobs`` jobs (default 1,000) over them at random arrival
times within ``--hours`` simulated hours (default 6). Each installation
runs its jobs one at a time, as a lane does. A job lasts 30 s to
``--max-job`` seconds (default 600). When it starts it calls
``TokenCache.get()`` for a token valid until its end, and it calls get()
once more for each of ``--calls`` API calls during the job (default 3,
``valid_for`` 30 s). The token
refresher runs as the supervisor runs it, with the installations that
have a job queued or running as its active set, unless ``--no-refresher``.

Time is simulated with trio's ``MockClock(autojump_threshold=0)``, so a
run takes seconds. The emulator mints tokens that live ``--token-ttl``
seconds (default 3600, GitHub's lifetime) by the Date it sends, and the
cache measures that lifetime on the simulated clock.

It prints the number of token requests the emulator received, how many
of them a job's get() had to wait for, and the goal: for each
installation, the fewest mints that cover every get() if each token
served its whole lifetime (a new one only when a get() needs the token
past the previous one's expiry).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
import trio.testing

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.github import AppAuth, GitHubClient, load_private_key  # noqa: E402
from daemon.sandbox import Emulator, generate_app_key  # noqa: E402

APP_ID = 4242
API_CALL_VALIDITY = 30.0


@dataclass(frozen=True)
class Job:
    arrival: float
    duration: float


@dataclass
class Tally:
    gets: dict[int, list[tuple[float, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    busy: set[int] = field(default_factory=set)

    def record(self, installation_id: int, valid_for: float) -> None:
        self.gets[installation_id].append((trio.current_time(), valid_for))


def make_schedule(args: argparse.Namespace) -> dict[int, list[Job]]:
    """Spread the jobs over installations and arrival times, reproducibly."""
    rng = random.Random(args.seed)
    schedule: dict[int, list[Job]] = defaultdict(list)
    for _ in range(args.jobs):
        installation_id = rng.randint(1, args.installations)
        arrival = rng.uniform(0, args.hours * 3600)
        duration = rng.uniform(30, args.max_job)
        schedule[installation_id].append(Job(arrival, duration))
    for jobs in schedule.values():
        jobs.sort(key=lambda job: job.arrival)
    return dict(schedule)


def ideal_mints(gets: list[tuple[float, float]], lifetime: float) -> int:
    """Return the mints needed if each token lasted its full lifetime."""
    mints = 0
    covered_until = -math.inf
    for at, valid_for in sorted(gets):
        if at + valid_for > covered_until:
            mints += 1
            covered_until = at + lifetime
    return mints


async def lane(
    github: GitHubClient,
    installation_id: int,
    jobs: list[Job],
    tally: Tally,
    calls: int,
    start: float,
) -> None:
    """Run one installation's jobs in arrival order, one at a time."""
    for index, job in enumerate(jobs):
        await trio.sleep_until(max(start + job.arrival, trio.current_time()))
        tally.busy.add(installation_id)

        await github.tokens.get(installation_id, valid_for=job.duration)
        tally.record(installation_id, job.duration)
        for _ in range(calls):
            await trio.sleep(job.duration / (calls + 1))
            await github.tokens.get(installation_id, valid_for=API_CALL_VALIDITY)
            tally.record(installation_id, API_CALL_VALIDITY)
        await trio.sleep(job.duration / (calls + 1))

        following = jobs[index + 1] if index + 1 < len(jobs) else None
        if following is None or start + following.arrival > trio.current_time():
            tally.busy.discard(installation_id)


async def run(args: argparse.Namespace) -> None:
    key = generate_app_key()
    schedule = make_schedule(args)
    tally = Tally()

    with tempfile.TemporaryDirectory() as tmp:
        emulator = Emulator(
            app_id=APP_ID, public_key=key, repos_root=Path(tmp) / "repos"
        )
        emulator.token_ttl = args.token_ttl
        for installation_id in range(1, args.installations + 1):
            emulator.add_installation(installation_id, account=f"org-{installation_id}")

        async with trio.open_nursery() as nursery:
            await nursery.start(emulator.serve)
            app = AppAuth(
                app_id=APP_ID, private_key=load_private_key(key, source="generated")
            )
            async with GitHubClient(api_url=emulator.api_url, app=app) as github:
                if not args.no_refresher:
                    await nursery.start(
                        partial(github.tokens.run_refresher, active=lambda: tally.busy)
                    )
                started_real = time.perf_counter()
                start = trio.current_time()
                async with trio.open_nursery() as lanes:
                    for installation_id, jobs in schedule.items():
                        lanes.start_soon(
                            lane,
                            github,
                            installation_id,
                            jobs,
                            tally,
                            args.calls,
                            start,
                        )
                simulated = trio.current_time() - start
                real = time.perf_counter() - started_real
                stats = github.tokens.statistics()
            nursery.cancel_scope.cancel()

    requests = sum(
        1
        for r in emulator.requests
        if r.method == "POST" and r.path.endswith("/access_tokens")
    )
    goal = sum(ideal_mints(gets, args.token_ttl) for gets in tally.gets.values())
    gets = sum(len(g) for g in tally.gets.values())

    print(f"jobs                 {args.jobs} over {len(schedule)} installations")
    print(f"get() calls          {gets}")
    print(f"simulated time       {simulated / 3600:.2f} h ({real:.1f} s real)")
    print(f"refresher            {'off' if args.no_refresher else 'on'}")
    print(f"token requests       {requests}")
    print(f"goal                 {goal} (one per installation per token lifetime)")
    print(f"requests / goal      {requests / goal:.2f}")
    print(
        f"mints a get() waited {stats.mints - stats.refreshes} "
        "(the others by the refresher)"
    )
    print(
        f"cache                hits {stats.hits}, shared waits {stats.shared_waits}, "
        f"refreshes {stats.refreshes}, mint failures {stats.mint_failures}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs", type=int, default=1000, help="jobs to run (default %(default)s)"
    )
    parser.add_argument(
        "--installations",
        type=int,
        default=50,
        help="installations to spread the jobs over (default %(default)s)",
    )
    parser.add_argument(
        "--hours",
        type=float,
        default=6.0,
        help="span of the job arrivals, in simulated hours (default %(default)s)",
    )
    parser.add_argument(
        "--max-job",
        type=float,
        default=600.0,
        help="maximum job duration, in seconds, above the minimum of 30"
        " (default %(default)s)",
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=3,
        help="API calls per job, each one get() (default %(default)s)",
    )
    parser.add_argument(
        "--token-ttl",
        type=float,
        default=3600.0,
        help="lifetime of a minted token, in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--no-refresher",
        action="store_true",
        help="do not run the token refresher (default: it runs)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="random seed of the job schedule (default %(default)s)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    trio.run(run, args, clock=trio.testing.MockClock(autojump_threshold=0))


if __name__ == "__main__":
    main()
