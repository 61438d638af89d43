"""Turn a delivery into job specs by the ``[[jobs]]`` rules.

Routing is pure: it reads the payload and the rules and does no I/O, so
any payload, however odd, yields a :class:`Route` and never an exception.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.config import JobRule
from daemon.delivery import Delivery
from daemon.errors import WorkspaceError
from daemon.jobs.workspace import validate_repository

__all__ = ["JobSpec", "Route", "route"]

log = logging.getLogger(__name__)

# A push whose "after" is all zeros deleted the branch: there is no commit.
_NULL_SHA = "0" * 40
# Commit ids as git names them: 40 (SHA-1) or 64 (SHA-256) lowercase hex
# digits. Anything else in a payload never becomes a job's commit, as it
# would reach API paths and git.
_SHA_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job to run: a rule applied to a delivery.

    ``sha`` is the commit to check out and report on, or ``None`` for
    events that name no commit; ``fetch_ref`` is the ref to fetch when the
    commit cannot be fetched by its sha, or when there is no sha.
    """

    rule: JobRule
    delivery: Delivery = field(repr=False)
    installation_id: int
    repository: str
    sha: str | None
    ref: str | None
    fetch_ref: str | None
    pull_number: int | None
    issue_number: int | None
    report: Literal["check_run", "comment"]
    from_fork: bool = False

    @property
    def external_id(self) -> str:
        """The check run's ``external_id``: ``<delivery id>:<job name>``."""
        return f"{self.delivery.id}:{self.rule.name}"

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def supersede_key(self) -> tuple[str, int, str] | None:
        """Jobs with the same key replace each other while queued."""
        if self.pull_number is None:
            return None
        return (self.repository.lower(), self.pull_number, self.rule.name)


@dataclass(frozen=True, slots=True)
class Route:
    """The routing decision for one delivery.

    ``jobs`` is empty when nothing matched; ``reasons`` gives why each rule
    that named the event was not applied. ``installation_id`` is ``None``
    for App-level events, which never reach a lane.
    """

    installation_id: int | None
    jobs: tuple[JobSpec, ...]
    reasons: tuple[str, ...] = ()


def route(
    delivery: Delivery, rules: Sequence[JobRule], *, app_slug: str | None
) -> Route:
    """Return the jobs that ``rules`` start for ``delivery``.

    Deliveries sent by a bot (``sender.type == "Bot"``) match only rules
    with ``allow_bots = true``; those sent by the App itself
    (``<app_slug>[bot]``) match none, so the App never reacts to its own
    check runs and comments.
    """
    installation_id = delivery.installation_id
    if installation_id is None:
        log.info(
            "%s delivery %s has no installation; handled at the App level",
            delivery.event,
            delivery.id,
        )
        return Route(installation_id=None, jobs=())

    payload = delivery.payload
    sender = _dict(payload.get("sender"))
    sender_login = _str(sender.get("login"))
    is_bot = sender.get("type") == "Bot"
    if app_slug is not None and sender_login == f"{app_slug}[bot]":
        return Route(
            installation_id=installation_id,
            jobs=(),
            reasons=("sent by this App itself",),
        )

    target = _target(delivery)
    jobs: list[JobSpec] = []
    reasons: list[str] = []
    for rule in rules:
        if not rule.matches_event(delivery.event, delivery.action):
            continue
        reason = _rejection(rule, delivery, target, is_bot=is_bot)
        if reason is not None:
            reasons.append(f"{rule.name}: {reason}")
            continue
        assert target is not None
        report: Literal["check_run", "comment"]
        if rule.report == "auto":
            has_issue = target.issue_number is not None
            report = "comment" if target.sha is None and has_issue else "check_run"
        else:
            report = rule.report
        jobs.append(
            JobSpec(
                rule=rule,
                delivery=delivery,
                installation_id=installation_id,
                repository=target.repository,
                sha=target.sha,
                ref=target.ref,
                fetch_ref=target.fetch_ref,
                pull_number=target.pull_number,
                issue_number=target.issue_number,
                report=report,
                from_fork=target.from_fork,
            )
        )
    return Route(
        installation_id=installation_id, jobs=tuple(jobs), reasons=tuple(reasons)
    )


@dataclass(frozen=True, slots=True)
class _Target:
    repository: str
    sha: str | None
    ref: str | None
    fetch_ref: str | None
    pull_number: int | None
    issue_number: int | None
    draft: bool
    deleted: bool
    from_fork: bool


def _rejection(
    rule: JobRule, delivery: Delivery, target: _Target | None, *, is_bot: bool
) -> str | None:
    if target is None:
        return "the delivery names no repository"
    try:
        validate_repository(target.repository)
    except WorkspaceError as exc:
        return str(exc)
    if not rule.matches_repository(target.repository):
        globs = list(rule.repositories)
        return f"repository {target.repository} matches none of {globs}"
    if is_bot and not rule.allow_bots:
        return "sent by a bot and allow_bots = false"
    if rule.skip_drafts and target.draft:
        return "draft pull request and skip_drafts = true"
    if target.deleted:
        return "the push deleted the branch, so there is no commit to check"
    if target.sha is not None and _SHA_RE.fullmatch(target.sha) is None:
        return f"the delivery's commit {target.sha!r} is not a commit id"
    if target.sha is None and target.fetch_ref is None:
        return "the delivery names no commit or ref to check out"
    if target.from_fork and rule.forks == "skip":
        return "pull request from a fork and forks = skip"
    if rule.report == "comment" and target.issue_number is None:
        return "report = comment but the delivery names no issue or pull request"
    return None


def _target(delivery: Delivery) -> _Target | None:
    """Find the repository, commit and pull request a payload is about."""
    payload = delivery.payload
    repository = _dict(payload.get("repository"))
    full_name = _str(repository.get("full_name"))
    if full_name is None:
        return None
    default_branch = _str(repository.get("default_branch"))
    default_ref = f"refs/heads/{default_branch}" if default_branch else None

    sha: str | None = None
    ref: str | None = None
    fetch_ref: str | None = default_ref
    pull_number: int | None = None
    issue_number: int | None = None
    draft = False
    deleted = False
    from_fork = False

    pull = _dict(payload.get("pull_request"))
    issue = _dict(payload.get("issue"))
    if pull:
        pull_number = _int(pull.get("number")) or _int(payload.get("number"))
        issue_number = pull_number
        sha = _str(_dict(pull.get("head")).get("sha"))
        draft = pull.get("draft") is True
        # A fork's head repository differs from the base, and GitHub sends
        # head.repo as null when the fork was deleted.
        # NOTE: only pull_request payloads name the head's repository, so
        # an issue_comment on a fork's pull request counts as not a fork.
        head_repo = _str(_dict(_dict(pull.get("head")).get("repo")).get("full_name"))
        from_fork = head_repo is None or head_repo.lower() != full_name.lower()
        if pull_number is not None:
            # GitHub keeps every pull request's head, forks included, at
            # refs/pull/N/head in the base repository.
            ref = f"refs/pull/{pull_number}/head"
            fetch_ref = ref
    elif issue:
        issue_number = _int(issue.get("number"))
        if issue_number is not None and _dict(issue.get("pull_request")):
            pull_number = issue_number
            ref = f"refs/pull/{pull_number}/head"
            fetch_ref = ref
    elif delivery.event == "push":
        after = _str(payload.get("after"))
        ref = _str(payload.get("ref"))
        deleted = payload.get("deleted") is True or after == _NULL_SHA
        sha = None if deleted else after
        fetch_ref = ref
    else:
        for holder, key in (
            ("check_suite", "head_sha"),
            ("check_run", "head_sha"),
            ("workflow_run", "head_sha"),
            ("deployment", "sha"),
        ):
            value = _str(_dict(payload.get(holder)).get(key))
            if value is not None:
                sha = value
                break
        if sha is None and delivery.event == "status":
            sha = _str(payload.get("sha"))

    return _Target(
        repository=full_name,
        sha=sha,
        ref=ref,
        fetch_ref=fetch_ref,
        pull_number=pull_number,
        issue_number=issue_number,
        draft=draft,
        deleted=deleted,
        from_fork=from_fork,
    )


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None
