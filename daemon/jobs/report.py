"""Report jobs on GitHub: check runs, or issue comments for commit-less events.

A check run carries ``external_id = "<delivery id>:<job name>"``, so a job
that runs again (after a crash, or an operator's redelivery) updates the
check run it already has instead of creating a second one: its id is
looked up in memory, then in the journal, then on GitHub by listing the
commit's check runs of that name, before one is created.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import trio

from daemon.errors import GhappdError, GitHubError
from daemon.github.client import GitHubClient
from daemon.jobs.annotations import Annotation
from daemon.journal import Journal, State
from daemon.routing import JobSpec

__all__ = ["MAX_ANNOTATIONS_PER_REQUEST", "MAX_OUTPUT_CHARS", "Reporter", "fit"]

log = logging.getLogger(__name__)

# GitHub's limits for check runs ("REST API endpoints for check runs",
# docs.github.com/en/rest/checks/runs): at most 50 annotations per request,
# and output.summary and output.text at most 65535 characters each.
MAX_ANNOTATIONS_PER_REQUEST = 50
MAX_OUTPUT_CHARS = 65535
# An issue comment's body is limited to 65536 characters.
MAX_COMMENT_CHARS = 65536
_TITLE_CHARS = 255


def fit(text: str, limit: int, *, keep: str = "tail") -> str:
    """Return ``text`` cut to at most ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    marker = "\n[... cut to fit GitHub's limit ...]\n"
    room = limit - len(marker)
    if keep == "tail":
        return marker.lstrip("\n") + text[-room:]
    return text[:room] + marker.rstrip("\n")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reporter:
    """Create and update the check run or comment of each job."""

    def __init__(self, *, client: GitHubClient, journal: Journal) -> None:
        self.client = client
        self.journal = journal
        self._ids: dict[str, int] = {}
        # One lock per job, so the queued report and the job's start never
        # both find no check run and both create one.
        self._locks: dict[str, trio.Lock] = {}
        # Deliveries the journal recorded as new in this process: no check
        # run of theirs can exist yet, so the lookup on GitHub is skipped.
        # NOTE: a delivery pruned from the journal and then redelivered is
        # new again although its old check run exists; it gets a second one.
        self.fresh: set[str] = set()

    async def _request(
        self, job: JobSpec, method: str, path: str, body: object, *, idempotent: bool
    ) -> Any:
        return await self.client.installation_request(
            job.installation_id, method, path, json=body, idempotent=idempotent
        )

    # -- check runs -------------------------------------------------------

    async def _known_id(self, job: JobSpec) -> int | None:
        report_id = self._ids.get(job.external_id)
        if report_id is not None:
            return report_id
        for record in await self.journal.jobs(job.delivery.id):
            if record.job_name == job.name and record.report_id is not None:
                self._ids[job.external_id] = record.report_id
                return record.report_id
        return None

    async def _find_on_github(self, job: JobSpec) -> int | None:
        assert job.sha is not None
        path = f"/repos/{job.repository}/commits/{job.sha}/check-runs"
        params: dict[str, str | int] = {
            "check_name": job.name,
            "filter": "all",
            "per_page": 100,
        }
        found: int | None = None
        # Every page is read, so the generator finishes instead of being
        # left suspended.
        async for run in self.client.paginate(
            path,
            installation_id=job.installation_id,
            params=params,
            items_key="check_runs",
        ):
            if isinstance(run, dict) and run.get("external_id") == job.external_id:
                run_id = run.get("id")
                if isinstance(run_id, int) and found is None:
                    found = run_id
        return found

    async def _remember(self, job: JobSpec, run_id: int, state: State) -> None:
        self._ids[job.external_id] = run_id
        await self.journal.set_job(
            job.delivery.id, job.name, state=state, report_id=run_id
        )

    async def check_run(
        self, job: JobSpec, *, state: State, body: dict[str, Any]
    ) -> int:
        """Create or update the job's check run with ``body``; return its id.

        A create is retried only after a lookup by ``external_id`` found no
        check run, so a retried POST never makes a second one.
        """
        assert job.sha is not None
        lock = self._locks.setdefault(job.external_id, trio.Lock())
        try:
            async with lock:
                run_id = await self._known_id(job)
                if run_id is None and job.delivery.id not in self.fresh:
                    run_id = await self._find_on_github(job)
                if run_id is not None:
                    await self._request(
                        job,
                        "PATCH",
                        f"/repos/{job.repository}/check-runs/{run_id}",
                        body,
                        idempotent=True,
                    )
                else:
                    run_id = await self._create(job, body)
                await self._remember(job, run_id, state)
                return run_id
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(job.external_id, None)

    async def _create(self, job: JobSpec, body: dict[str, Any]) -> int:
        payload = {
            "name": job.name,
            "head_sha": job.sha,
            "external_id": job.external_id,
            **body,
        }
        path = f"/repos/{job.repository}/check-runs"
        try:
            created = await self._request(job, "POST", path, payload, idempotent=False)
        except GitHubError as exc:
            if exc.status_code is not None and exc.status_code < 500:
                raise
            # The POST may have reached GitHub before the failure.
            existing = await self._find_on_github(job)
            if existing is not None:
                log.info(
                    "check run %s was created before the failure: id %d",
                    job.external_id,
                    existing,
                )
                return existing
            created = await self._request(job, "POST", path, payload, idempotent=False)
        run_id = created.get("id") if isinstance(created, dict) else None
        if not isinstance(run_id, int):
            raise GitHubError(
                f"GitHub's response to POST {path} has no check run id",
                installation_id=job.installation_id,
                method="POST",
                path=path,
            )
        log.info("check run %d created for %s", run_id, job.external_id)
        return run_id

    async def complete(
        self,
        job: JobSpec,
        *,
        conclusion: str,
        title: str,
        summary: str,
        text: str | None = None,
        annotations: Sequence[Annotation] = (),
    ) -> None:
        """Complete the job's report with ``conclusion`` and the output.

        The completion carries no annotations, so it can be retried safely.
        Annotations follow, 50 per request, in updates that GitHub appends
        to the check run and that are not retried, because a retry after a
        lost response would add a batch twice. Afterwards the report's id is
        dropped from memory; the journal keeps it for a rerun.
        """
        try:
            await self._complete(
                job,
                conclusion=conclusion,
                title=title,
                summary=summary,
                text=text,
                annotations=annotations,
            )
        finally:
            self._ids.pop(job.external_id, None)
            self.fresh.discard(job.delivery.id)

    async def _complete(
        self,
        job: JobSpec,
        *,
        conclusion: str,
        title: str,
        summary: str,
        text: str | None,
        annotations: Sequence[Annotation],
    ) -> None:
        if job.report == "comment":
            await self.comment(job, body=_comment_body(job, conclusion, summary, text))
            await self.journal.set_job(
                job.delivery.id, job.name, state=State.FINISHED, conclusion=conclusion
            )
            return
        output: dict[str, Any] = {
            "title": fit(title, _TITLE_CHARS, keep="head"),
            "summary": fit(summary, MAX_OUTPUT_CHARS, keep="head"),
        }
        if text:
            output["text"] = fit(text, MAX_OUTPUT_CHARS)
        batches = [
            list(annotations[i : i + MAX_ANNOTATIONS_PER_REQUEST])
            for i in range(0, len(annotations), MAX_ANNOTATIONS_PER_REQUEST)
        ]
        body = {
            "status": "completed",
            "conclusion": conclusion,
            "completed_at": _now(),
            "output": output,
        }
        run_id = await self.check_run(job, state=State.FINISHED, body=body)
        sent = 0
        for batch in batches:
            try:
                await self._request(
                    job,
                    "PATCH",
                    f"/repos/{job.repository}/check-runs/{run_id}",
                    {
                        "output": {
                            "title": output["title"],
                            "summary": output["summary"],
                            "annotations": batch,
                        }
                    },
                    idempotent=False,
                )
            except GhappdError as exc:
                # The check run is complete already: a lost batch must not
                # turn its conclusion into a failure of ghappd.
                log.warning(
                    "check run %d: annotations %d to %d of %d not sent: %s",
                    run_id,
                    sent + 1,
                    len(annotations),
                    len(annotations),
                    exc,
                )
                break
            sent += len(batch)
        await self.journal.set_job(
            job.delivery.id, job.name, state=State.FINISHED, conclusion=conclusion
        )
        log.info(
            "check run %d completed: %s, %d of %d annotations sent",
            run_id,
            conclusion,
            sent,
            len(annotations),
        )

    # -- comments ---------------------------------------------------------

    async def comment(self, job: JobSpec, *, body: str) -> int:
        """Post the job's comment, or edit the one a previous run posted."""
        assert job.issue_number is not None
        body = fit(body, MAX_COMMENT_CHARS, keep="head")
        comment_id = await self._known_id(job)
        if comment_id is not None:
            await self._request(
                job,
                "PATCH",
                f"/repos/{job.repository}/issues/comments/{comment_id}",
                {"body": body},
                idempotent=True,
            )
        else:
            path = f"/repos/{job.repository}/issues/{job.issue_number}/comments"
            created = await self._request(
                job, "POST", path, {"body": body}, idempotent=False
            )
            comment_id = created.get("id") if isinstance(created, dict) else None
            if not isinstance(comment_id, int):
                raise GitHubError(
                    f"GitHub's response to POST {path} has no comment id",
                    installation_id=job.installation_id,
                    method="POST",
                    path=path,
                )
            log.info("comment %d posted for %s", comment_id, job.external_id)
        await self._remember(job, comment_id, State.RUNNING)
        return comment_id


def _comment_body(job: JobSpec, conclusion: str, summary: str, text: str | None) -> str:
    # A marker GitHub does not render, so the comment can be found again.
    marker = f"<!-- ghappd:{job.external_id} -->"
    parts = [marker, f"**{job.name}**: {conclusion}", "", summary]
    if text:
        parts += ["", "<details><summary>Output</summary>", "", text, "", "</details>"]
    return "\n".join(parts)
