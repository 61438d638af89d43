"""The dispatcher and its per-installation lanes, driven in trio with a fake executor.

The executor here records what the lanes ask of it and lets a test hold a
job until an event is set, so every interleaving below is set up with
events and ``wait_all_tasks_blocked``, never with timing.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from daemon.config import JobRule
from daemon.delivery import Delivery
from daemon.journal import MemoryJournal
from daemon.lanes import Dispatcher
from daemon.routing import JobSpec, route

RULE = JobRule(name="check", on=("pull_request",), command=("true",))
# A bound on any one wait, in seconds of trio time; only a broken test
# reaches it.
BOUND = 10.0
_numbers = itertools.count(1)


@dataclass
class FakeExecutor:
    """Record the lanes' calls; ``hooks`` run inside ``run`` for a delivery id."""

    events: list[tuple[str, str]] = field(default_factory=list)
    hooks: dict[str, Callable[[JobSpec], Awaitable[None]]] = field(default_factory=dict)
    started: dict[str, trio.Event] = field(default_factory=dict)

    def started_event(self, delivery_id: str) -> trio.Event:
        return self.started.setdefault(delivery_id, trio.Event())

    async def queued(self, job: JobSpec, *, ahead: int) -> None:
        self.events.append(("queued", job.delivery.id))

    async def run(self, job: JobSpec) -> None:
        self.events.append(("start", job.delivery.id))
        self.started_event(job.delivery.id).set()
        hook = self.hooks.get(job.delivery.id)
        if hook is not None:
            await hook(job)
        self.events.append(("end", job.delivery.id))

    async def skipped(self, job: JobSpec, *, reason: str) -> None:
        self.events.append(("skipped", job.delivery.id))

    async def cancelled(self, job: JobSpec, *, reason: str) -> None:
        self.events.append((f"cancelled: {reason}", job.delivery.id))

    async def failed(self, job: JobSpec, *, error: BaseException) -> None:
        self.events.append((f"failed: {type(error).__name__}", job.delivery.id))

    async def interrupted(self, job: JobSpec) -> None:
        self.events.append(("interrupted", job.delivery.id))

    def of(self, kind: str) -> list[str]:
        return [delivery for what, delivery in self.events if what == kind]


class HookedJournal(MemoryJournal):
    """A memory journal that can run a callback inside ``mark_finished``."""

    on_finished: Callable[[str], None] | None = None

    async def mark_finished(self, delivery_id: str) -> None:
        await super().mark_finished(delivery_id)
        if self.on_finished is not None:
            self.on_finished(delivery_id)


def pull_request(
    delivery_id: str, *, installation_id: int = 1, number: int | None = None
) -> Delivery:
    # Each delivery is its own pull request unless the caller passes a
    # number, so none supersedes another.
    number = number if number is not None else next(_numbers)
    payload = {
        "action": "opened",
        "number": number,
        "installation": {"id": installation_id},
        "repository": {"full_name": "octo-org/hello", "default_branch": "main"},
        "sender": {"login": "octocat", "type": "User"},
        "pull_request": {
            "number": number,
            "draft": False,
            "head": {"sha": f"{number:040x}", "ref": "feature"},
        },
    }
    return Delivery(
        id=delivery_id,
        event="pull_request",
        payload=payload,
        body=json.dumps(payload).encode(),
        received_at=0.0,
    )


def installation_event(action: str, *, installation_id: int = 1) -> Delivery:
    payload = {"action": action, "installation": {"id": installation_id}}
    return Delivery(
        id=f"installation-{action}",
        event="installation",
        payload=payload,
        body=json.dumps(payload).encode(),
        received_at=0.0,
    )


@dataclass
class Setup:
    dispatcher: Dispatcher
    executor: FakeExecutor
    journal: HookedJournal

    async def submit(self, delivery: Delivery) -> None:
        result = await self.journal.record(delivery)
        self.dispatcher.submit(result.seq, delivery)


def plan(delivery: Delivery) -> tuple[JobSpec, ...]:
    return route(delivery, [RULE], app_slug="ghappd").jobs


@pytest.fixture
async def setup(nursery: trio.Nursery) -> AsyncIterator[Setup]:
    async with HookedJournal() as journal:
        executor = FakeExecutor()
        dispatcher = Dispatcher(
            journal=journal,
            executor=executor,
            plan=plan,
            limiter=trio.CapacityLimiter(4),
            lane_capacity=100,
        )
        await nursery.start(dispatcher.run)
        yield Setup(dispatcher, executor, journal)
        dispatcher.stop(grace=0)


def hold(gate: trio.Event) -> Callable[[JobSpec], Awaitable[None]]:
    async def wait(job: JobSpec) -> None:
        with trio.fail_after(BOUND):
            await gate.wait()

    return wait


async def test_lane_runs_deliveries_in_arrival_order(setup: Setup) -> None:
    gate = trio.Event()
    setup.executor.hooks["d0"] = hold(gate)
    ids = [f"d{n}" for n in range(10)]

    for delivery_id in ids:
        await setup.submit(pull_request(delivery_id))
    gate.set()
    await trio.testing.wait_all_tasks_blocked()

    runs = [(w, d) for w, d in setup.executor.events if w in ("start", "end")]
    assert runs == [(what, d) for d in ids for what in ("start", "end")]


async def test_lane_closes_when_drained(setup: Setup) -> None:
    await setup.submit(pull_request("only"))

    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("end") == ["only"]
    assert setup.dispatcher.lanes == {}
    assert setup.dispatcher.lanes_started == 1


async def test_lane_stays_while_it_has_work(setup: Setup) -> None:
    gate = trio.Event()
    setup.executor.hooks["first"] = hold(gate)

    await setup.submit(pull_request("first"))
    await setup.executor.started_event("first").wait()

    assert list(setup.dispatcher.lanes) == [1]
    gate.set()


async def test_installations_run_side_by_side(setup: Setup) -> None:
    # Each job waits for the other to start: both end only if they overlap.
    for mine, other in (("a", "b"), ("b", "a")):

        async def wait_for_other(job: JobSpec, other: str = other) -> None:
            with trio.fail_after(BOUND):
                await setup.executor.started_event(other).wait()

        setup.executor.hooks[mine] = wait_for_other

    await setup.submit(pull_request("a", installation_id=1))
    await setup.submit(pull_request("b", installation_id=2))
    await trio.testing.wait_all_tasks_blocked()

    assert sorted(setup.executor.of("end")) == ["a", "b"]
    assert setup.dispatcher.lanes_started == 2


async def test_delivery_sent_as_last_job_returns_runs(setup: Setup) -> None:
    late = pull_request("late")
    await setup.journal.record(late)

    async def submit_late(job: JobSpec) -> None:
        # Synchronous, as the intake calls it: no checkpoint before the
        # job returns to its lane.
        setup.dispatcher.submit(1000, late)

    setup.executor.hooks["last"] = submit_late

    await setup.submit(pull_request("last"))
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("end") == ["last", "late"]
    assert setup.dispatcher.lanes == {}


async def test_delivery_sent_while_lane_finishes_delivery_runs(
    setup: Setup,
) -> None:
    # mark_finished is the lane's last checkpoint before it looks at its
    # channel and closes.
    late = pull_request("late")

    def submit_late(delivery_id: str) -> None:
        if delivery_id == "last":
            setup.dispatcher.submit(1000, late)

    setup.journal.on_finished = submit_late
    await setup.journal.record(late)

    await setup.submit(pull_request("last"))
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("end") == ["last", "late"]
    assert setup.dispatcher.lanes_started == 1


async def test_delivery_sent_after_lane_closed_starts_new_lane(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = setup.dispatcher
    closed = dispatcher._lane_closed
    late = pull_request("late")
    await setup.journal.record(late)

    def close_then_submit(lane: object) -> None:
        closed(lane)  # type: ignore[arg-type]
        if dispatcher.lanes_started == 1:
            dispatcher.submit(1000, late)

    monkeypatch.setattr(dispatcher, "_lane_closed", close_then_submit)

    await setup.submit(pull_request("last"))
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("end") == ["last", "late"]
    assert dispatcher.lanes_started == 2
    assert dispatcher.lanes == {}


async def test_full_lane_reads_overflow_from_journal(setup: Setup) -> None:
    setup.dispatcher.lane_capacity = 2
    gate = trio.Event()
    setup.executor.hooks["d0"] = hold(gate)
    ids = [f"d{n}" for n in range(8)]

    for delivery_id in ids:
        await setup.submit(pull_request(delivery_id))
    gate.set()
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("end") == ids
    assert setup.dispatcher.lanes == {}


async def test_job_exception_reported_and_lane_goes_on(setup: Setup) -> None:
    async def explode(job: JobSpec) -> None:
        raise RuntimeError("injected")

    setup.executor.hooks["bad"] = explode

    await setup.submit(pull_request("bad"))
    await setup.submit(pull_request("good"))
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("failed: RuntimeError") == ["bad"]
    assert setup.executor.of("end") == ["good"]


async def test_failing_report_leaves_lane_running(setup: Setup) -> None:
    async def explode(job: JobSpec) -> None:
        raise RuntimeError("injected")

    async def failing_report(job: JobSpec, *, error: BaseException) -> None:
        raise ValueError("the report failed too")

    setup.executor.hooks["bad"] = explode
    setup.executor.failed = failing_report  # type: ignore[method-assign]

    await setup.submit(pull_request("bad"))
    await setup.submit(pull_request("good"))
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("end") == ["good"]
    assert setup.dispatcher.lanes == {}


@pytest.mark.parametrize(
    ("action", "reason"),
    [
        ("deleted", "the App was uninstalled on this account"),
        ("suspend", "the App was suspended on this account"),
    ],
)
async def test_installation_event_cancels_its_lane(
    setup: Setup, action: str, reason: str
) -> None:
    gate = trio.Event()
    setup.executor.hooks["running"] = hold(gate)
    setup.executor.hooks["other"] = hold(gate)
    await setup.submit(pull_request("running"))
    await setup.submit(pull_request("waiting"))
    await setup.submit(pull_request("other", installation_id=2))
    await setup.executor.started_event("running").wait()
    await setup.executor.started_event("other").wait()

    await setup.submit(installation_event(action))
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of(f"cancelled: {reason}") == ["running", "waiting"]
    assert 1 not in setup.dispatcher.lanes
    assert setup.executor.of("end") == []
    gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert setup.executor.of("end") == ["other"]


async def test_delivery_after_cancel_runs(setup: Setup) -> None:
    gate = trio.Event()
    setup.executor.hooks["running"] = hold(gate)
    setup.executor.hooks["waiting"] = hold(gate)
    await setup.submit(pull_request("running"))
    await setup.submit(pull_request("waiting"))
    await setup.executor.started_event("running").wait()

    await setup.submit(installation_event("suspend"))
    await setup.submit(pull_request("after"))
    await trio.testing.wait_all_tasks_blocked()

    cancelled = "cancelled: the App was suspended on this account"
    assert setup.executor.of(cancelled) == ["running", "waiting"]
    assert setup.executor.of("end") == ["after"]


async def test_cancel_while_waiting_for_capacity_runs_nothing(setup: Setup) -> None:
    setup.dispatcher.limiter.total_tokens = 1
    gate = trio.Event()
    setup.executor.hooks["busy"] = hold(gate)
    await setup.submit(pull_request("busy", installation_id=2))
    await setup.executor.started_event("busy").wait()
    await setup.submit(pull_request("blocked"))
    await trio.testing.wait_all_tasks_blocked()

    await setup.submit(installation_event("deleted"))
    gate.set()
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("start") == ["busy"]
    cancelled = "cancelled: the App was uninstalled on this account"
    assert setup.executor.of(cancelled) == ["blocked"]


async def test_stop_while_waiting_for_capacity_runs_nothing(setup: Setup) -> None:
    setup.dispatcher.limiter.total_tokens = 1
    gate = trio.Event()
    setup.executor.hooks["busy"] = hold(gate)
    await setup.submit(pull_request("busy", installation_id=2))
    await setup.executor.started_event("busy").wait()
    await setup.submit(pull_request("blocked"))
    await trio.testing.wait_all_tasks_blocked()

    setup.dispatcher.stop(grace=5)
    gate.set()
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("start") == ["busy"]
    entries = await setup.journal.unfinished()
    assert [entry.delivery.id for entry in entries] == ["blocked"]


async def test_superseded_job_is_skipped(setup: Setup) -> None:
    gate = trio.Event()
    setup.executor.hooks["slow"] = hold(gate)
    await setup.submit(pull_request("slow", number=1))

    for delivery_id, sha in (("old", "a"), ("older", "b"), ("newest", "c")):
        delivery = pull_request(delivery_id, number=7)
        delivery.payload["pull_request"]["head"]["sha"] = sha * 40
        await setup.submit(delivery)
    gate.set()
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("skipped") == ["old", "older"]
    assert setup.executor.of("end") == ["slow", "newest"]


async def test_interrupted_delivery_stays_unfinished(setup: Setup) -> None:
    gate = trio.Event()
    setup.executor.hooks["running"] = hold(gate)
    await setup.submit(pull_request("running"))
    await setup.executor.started_event("running").wait()

    setup.dispatcher.stop(grace=0)
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("interrupted") == ["running"]
    entries = await setup.journal.unfinished()
    assert [entry.delivery.id for entry in entries] == ["running"]


async def test_finished_delivery_not_left_after_stop(setup: Setup) -> None:
    await setup.submit(pull_request("done"))
    await trio.testing.wait_all_tasks_blocked()

    setup.dispatcher.stop(grace=0)
    await trio.testing.wait_all_tasks_blocked()

    assert await setup.journal.unfinished() == []


async def test_job_reports_wait_for_queued_report(setup: Setup) -> None:
    gate = trio.Event()
    executor = setup.executor
    plain_queued = executor.queued

    async def slow_queued(job: JobSpec, *, ahead: int) -> None:
        with trio.fail_after(BOUND):
            await gate.wait()
        await plain_queued(job, ahead=ahead)

    executor.queued = slow_queued  # type: ignore[method-assign]

    await setup.submit(pull_request("quick"))
    await trio.testing.wait_all_tasks_blocked()

    assert executor.events == []
    gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert executor.events == [
        ("queued", "quick"),
        ("start", "quick"),
        ("end", "quick"),
    ]


async def test_commit_runs_again_after_job_raised(setup: Setup) -> None:
    async def explode(job: JobSpec) -> None:
        raise RuntimeError("injected")

    setup.executor.hooks["first"] = explode
    await setup.submit(pull_request("first", number=7))
    await trio.testing.wait_all_tasks_blocked()

    await setup.submit(pull_request("second", number=7))
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("failed: RuntimeError") == ["first"]
    assert setup.executor.of("end") == ["second"]


async def test_commit_that_ran_runs_again(setup: Setup) -> None:
    await setup.submit(pull_request("first", number=7))
    await trio.testing.wait_all_tasks_blocked()

    await setup.submit(pull_request("second", number=7))
    await trio.testing.wait_all_tasks_blocked()

    assert setup.executor.of("end") == ["first", "second"]
    assert setup.executor.of("skipped") == []
