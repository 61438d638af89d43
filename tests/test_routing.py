from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.config import JobRule
from daemon.delivery import Delivery
from daemon.routing import route

FIXTURES = Path(__file__).parent / "fixtures" / "webhooks"


def delivery(event: str, payload: dict[str, Any], delivery_id: str = "d-1") -> Delivery:
    body = json.dumps(payload).encode()
    return Delivery(
        id=delivery_id, event=event, payload=payload, body=body, received_at=0.0
    )


def rule(**overrides: Any) -> JobRule:
    values: dict[str, Any] = {
        "name": "lint",
        "on": ("pull_request",),
        "command": ("true",),
    }
    values.update(overrides)
    return JobRule(**values)


def pull_request_payload(**changes: Any) -> dict[str, Any]:
    payloads = json.loads((FIXTURES / "pull_request.json").read_text())
    payload = copy.deepcopy(next(p for p in payloads if p["action"] == "opened"))
    payload["installation"] = {"id": 77}
    payload.update(changes)
    return payload


def all_fixtures() -> list[tuple[str, int, dict[str, Any]]]:
    cases = []
    for path in sorted(FIXTURES.glob("*.json")):
        for index, payload in enumerate(json.loads(path.read_text())):
            cases.append((path.stem, index, payload))
    return cases


@pytest.mark.parametrize(
    ("event", "index", "payload"),
    all_fixtures(),
    ids=[f"{e}-{i}" for e, i, _ in all_fixtures()],
)
def test_every_fixture_routes(event: str, index: int, payload: dict[str, Any]) -> None:
    rules = [
        rule(name="any", on=(event,), allow_bots=True),
        rule(name="actions", on=(f"{event}.{payload.get('action')}",)),
    ]
    result = route(delivery(event, payload), rules, app_slug="ghappd")
    if "installation" not in payload:
        assert result.installation_id is None
        assert result.jobs == ()
    else:
        assert result.installation_id == payload["installation"]["id"]
        for job in result.jobs:
            assert job.installation_id == result.installation_id
            assert job.sha is not None or job.fetch_ref is not None


def test_pull_request_job_spec() -> None:
    payload = pull_request_payload()
    [job] = route(delivery("pull_request", payload), [rule()], app_slug="x").jobs
    assert job.sha == payload["pull_request"]["head"]["sha"]
    assert job.repository == payload["repository"]["full_name"]
    assert job.pull_number == payload["pull_request"]["number"]
    assert job.fetch_ref == f"refs/pull/{job.pull_number}/head"
    assert job.report == "check_run"
    assert job.external_id == "d-1:lint"
    assert job.supersede_key == (job.repository.lower(), job.pull_number, "lint")


def test_event_action_matching() -> None:
    payload = pull_request_payload()
    rules = [
        rule(name="opened", on=("pull_request.opened",)),
        rule(name="closed", on=("pull_request.closed",)),
        rule(name="push", on=("push",)),
    ]
    jobs = route(delivery("pull_request", payload), rules, app_slug=None).jobs
    assert [job.name for job in jobs] == ["opened"]


def test_repository_globs() -> None:
    payload = pull_request_payload()
    owner = payload["repository"]["owner"]["login"]
    matching = rule(name="yes", repositories=(f"{owner.lower()}/*",))
    other = rule(name="no", repositories=("someone-else/*",))
    result = route(delivery("pull_request", payload), [matching, other], app_slug=None)
    assert [job.name for job in result.jobs] == ["yes"]
    assert result.reasons[0].startswith("no: repository ")


def test_skip_drafts() -> None:
    payload = pull_request_payload()
    payload["pull_request"]["draft"] = True
    rules = [rule(name="skips", skip_drafts=True), rule(name="runs")]
    jobs = route(delivery("pull_request", payload), rules, app_slug=None).jobs
    assert [job.name for job in jobs] == ["runs"]


def test_bots_need_allow_bots() -> None:
    payload = pull_request_payload(sender={"login": "dependabot[bot]", "type": "Bot"})
    rules = [rule(name="humans"), rule(name="bots", allow_bots=True)]
    jobs = route(delivery("pull_request", payload), rules, app_slug="ghappd").jobs
    assert [job.name for job in jobs] == ["bots"]


def test_own_app_always_dropped() -> None:
    payload = pull_request_payload(sender={"login": "ghappd[bot]", "type": "Bot"})
    result = route(
        delivery("pull_request", payload), [rule(allow_bots=True)], app_slug="ghappd"
    )
    assert result.jobs == ()
    assert result.reasons == ("sent by this App itself",)


def test_push_uses_after() -> None:
    payloads = json.loads((FIXTURES / "push.json").read_text())
    payload = copy.deepcopy(payloads[0])
    payload["installation"] = {"id": 5}
    payload["deleted"] = False
    payload["after"] = "a" * 40
    [job] = route(delivery("push", payload), [rule(on=("push",))], app_slug=None).jobs
    assert job.sha == "a" * 40
    assert job.ref == payload["ref"]
    assert job.pull_number is None


def test_push_deleting_branch_runs_nothing() -> None:
    payloads = json.loads((FIXTURES / "push.json").read_text())
    payload = copy.deepcopy(payloads[0])
    payload["installation"] = {"id": 5}
    payload["after"] = "0" * 40
    result = route(delivery("push", payload), [rule(on=("push",))], app_slug=None)
    assert result.jobs == ()
    assert "deleted the branch" in result.reasons[0]


def test_issue_comment_reports_as_comment() -> None:
    payloads = json.loads((FIXTURES / "issue_comment.json").read_text())
    payload = copy.deepcopy(next(p for p in payloads if "installation" in p))
    [job] = route(
        delivery("issue_comment", payload), [rule(on=("issue_comment",))], app_slug=None
    ).jobs
    assert job.report == "comment"
    assert job.sha is None
    assert job.issue_number == payload["issue"]["number"]


@pytest.mark.parametrize(
    "payload",
    [
        {"installation": {"id": 1}},
        {"installation": {"id": 1}, "repository": "not a dict"},
        {"installation": {"id": "1"}},
        {"installation": {"id": 1}, "repository": {"full_name": 3}},
        {
            "installation": {"id": 1},
            "repository": {"full_name": "a/b"},
            "pull_request": 5,
        },
        {
            "installation": {"id": 1},
            "repository": {"full_name": "a/b"},
            "pull_request": {"head": None, "number": "x"},
        },
    ],
)
def test_odd_payloads_never_raise(payload: dict[str, Any]) -> None:
    route(delivery("pull_request", payload), [rule()], app_slug="x")


@pytest.mark.parametrize(
    "full_name",
    [
        "octo-org/widgets/../../../app/hook/config",
        "octo-org/widgets?per_page=1",
        "octo-org/widgets\n",
        "-octo/widgets",
    ],
)
def test_invalid_repository_never_routed(full_name: str) -> None:
    payload = pull_request_payload()
    payload["repository"]["full_name"] = full_name
    result = route(
        delivery("pull_request", payload),
        [rule(repositories=("octo-org/*",)), rule(name="all")],
        app_slug=None,
    )
    assert result.jobs == ()
    assert all("invalid repository name" in reason for reason in result.reasons)


def test_glob_star_stays_in_one_segment() -> None:
    globbed = rule(repositories=("octo-org/*",))
    assert globbed.matches_repository("Octo-Org/Widgets")
    assert not globbed.matches_repository("octo-org/widgets/extra")
    assert not globbed.matches_repository("octo-org-evil/widgets")


def test_fork_pull_request_marked() -> None:
    payload = pull_request_payload()
    payload["pull_request"]["head"]["repo"] = {"full_name": "evil-user/fork"}
    [job] = route(delivery("pull_request", payload), [rule()], app_slug=None).jobs
    assert job.from_fork


def test_same_repository_head_not_fork() -> None:
    payload = pull_request_payload()
    name = payload["repository"]["full_name"]
    payload["pull_request"]["head"]["repo"] = {"full_name": name.upper()}
    [job] = route(delivery("pull_request", payload), [rule()], app_slug=None).jobs
    assert not job.from_fork


def test_forks_skip_drops_fork() -> None:
    payload = pull_request_payload()
    payload["pull_request"]["head"]["repo"] = None
    result = route(
        delivery("pull_request", payload), [rule(forks="skip")], app_slug=None
    )
    assert result.jobs == ()
    assert result.reasons == ("lint: pull request from a fork and forks = skip",)
