"""Run one job from start to report: token, checkout, command, check run.

:class:`JobExecutor` is the executor the lanes call. Every failure a
repository owner can act on (the App lost access, the commit is gone, the
clone failed, the command failed or timed out) ends in a completed check
run or comment that states it; only cancellation propagates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from daemon.config import TOKEN_MARGIN, Config, JobRule, RunnerConfig, Secret
from daemon.errors import (
    CommitNotFound,
    ConfigError,
    GhappdError,
    GitHubError,
    InstallationNotFound,
    InstallationSuspended,
    TokenError,
    WorkspaceError,
)
from daemon.github.client import GitHubClient
from daemon.github.tokens import Token
from daemon.jobs.annotations import Annotation, ParsedAnnotations, parse_annotations
from daemon.jobs.report import MAX_OUTPUT_CHARS, Reporter, fit
from daemon.jobs.runner import CommandResult, build_environment, run_command
from daemon.jobs.workspace import (
    WorkspaceRoot,
    job_event_path,
    job_home,
    validate_ref,
    validate_sha,
)
from daemon.journal import Journal, State
from daemon.logs import MIN_SECRET_LENGTH
from daemon.routing import JobSpec

__all__ = ["MASK", "JobExecutor", "JobSettings", "config_folders", "sandbox_argv"]

log = logging.getLogger(__name__)

# Checks' conclusions, as the REST API names them.
SUCCESS = "success"
FAILURE = "failure"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"
SKIPPED = "skipped"
# Seconds a report made during cancellation or shutdown may take.
_SHIELDED_REPORT_TIMEOUT = 10.0
# Seconds the revocation of a command's token may take, also during
# cancellation or shutdown.
_REVOKE_TIMEOUT = 10.0
# The text that replaces a secret in everything reported on GitHub, as
# GitHub Actions masks secrets in its logs.
MASK = "***"
# Characters of output that fit in a check run's text with its code fence.
_TEXT_ROOM = MAX_OUTPUT_CHARS - len("```\n\n```")


@dataclass(frozen=True, slots=True)
class JobSettings:
    """What a job needs of the configuration, read when the job starts.

    ``hidden_paths`` are folders that ``[runner] sandbox = "bwrap"`` hides
    from the command, besides the ones the executor finds itself (the
    workspace root, the journal's folder, the credentials directories and
    /tmp): the configuration file's folder and the folders of the key and
    secret files.
    """

    api_url: str
    git_url: str
    runner: RunnerConfig
    hidden_paths: tuple[Path, ...] = ()


class JobExecutor:
    """Run jobs and report them on GitHub; the lanes' executor."""

    def __init__(
        self,
        *,
        client: GitHubClient,
        journal: Journal,
        workspaces: WorkspaceRoot,
        settings: Callable[[], JobSettings],
    ) -> None:
        self.client = client
        self.journal = journal
        self.workspaces = workspaces
        self.settings = settings
        self.reporter = Reporter(client=client, journal=journal)
        # Wall-clock seconds the job commands ran, summed over all jobs.
        self.command_seconds = 0.0

    # -- the lane's calls ---------------------------------------------------

    async def queued(self, job: JobSpec, *, ahead: int) -> None:
        await self.journal.set_job(job.delivery.id, job.name, state=State.QUEUED)
        if job.report != "check_run" or job.sha is None:
            return
        if ahead == 0:
            summary = "The job is next in line for this installation."
        else:
            summary = (
                f"{ahead} job{'s' if ahead != 1 else ''} of this installation"
                " run before this one."
            )
        await self.reporter.check_run(
            job,
            state=State.QUEUED,
            body={
                "status": "queued",
                "output": {"title": "Queued", "summary": summary},
            },
        )

    async def skipped(self, job: JobSpec, *, reason: str) -> None:
        await self._complete_quietly(
            job, conclusion=SKIPPED, title="Skipped", summary=f"Not run: {reason}."
        )

    async def cancelled(self, job: JobSpec, *, reason: str) -> None:
        await self._complete_quietly(
            job,
            conclusion=CANCELLED,
            title="Cancelled",
            summary=f"Cancelled because {reason}.",
        )

    async def failed(self, job: JobSpec, *, error: BaseException) -> None:
        await self._complete_quietly(
            job,
            conclusion=FAILURE,
            title="ghappd failed",
            summary=(
                "ghappd failed while running this job"
                f" ({type(error).__name__}); its log has the details under"
                f" delivery {job.delivery.id}. Redeliver that webhook to run"
                " the job again once the cause is fixed."
            ),
        )

    async def interrupted(self, job: JobSpec) -> None:
        if job.report != "check_run" or job.sha is None:
            return
        with trio.move_on_after(_SHIELDED_REPORT_TIMEOUT):
            try:
                await self.reporter.check_run(
                    job,
                    state=State.QUEUED,
                    body={
                        "status": "queued",
                        "output": {
                            "title": "Interrupted",
                            "summary": (
                                "ghappd stopped while this job ran; it runs"
                                " again when ghappd starts."
                            ),
                        },
                    },
                )
            except GhappdError as exc:
                log.warning(
                    "reporting job %s as interrupted failed: %s", job.external_id, exc
                )

    async def run(self, job: JobSpec) -> None:
        """Run ``job`` and complete its report; raise only ``trio.Cancelled``."""
        settings = self.settings()
        rule = job.rule
        log.info("job %s started", job.external_id)
        start = trio.current_time()
        await self.journal.set_job(job.delivery.id, job.name, state=State.RUNNING)

        try:
            await self._run(job, rule, settings)
        except CommitNotFound as exc:
            log.info("job %s skipped: %s", job.external_id, exc)
            await self._complete_quietly(
                job,
                conclusion=SKIPPED,
                title="Commit no longer exists",
                summary=(
                    f"The commit {job.sha} is gone from {job.repository}"
                    " (the branch was probably force-pushed), so there is"
                    f" nothing to check. {exc}"
                ),
            )
        except (InstallationNotFound, InstallationSuspended) as exc:
            log.warning("job %s cannot run: %s", job.external_id, exc)
            await self.journal.set_job(
                job.delivery.id, job.name, state=State.FINISHED, conclusion=CANCELLED
            )
        except TokenError as exc:
            log.warning("job %s got no token: %s", job.external_id, exc)
            await self._complete_quietly(
                job,
                conclusion=FAILURE,
                title="No access token",
                summary=(
                    "ghappd could not get an installation access token for"
                    f" this job: {exc}"
                ),
            )
        except WorkspaceError as exc:
            log.warning("job %s checkout failed: %s", job.external_id, exc)
            await self._complete_quietly(
                job,
                conclusion=FAILURE,
                title="Checkout failed",
                summary=f"ghappd could not check out {job.repository}: {exc}",
            )
        except GhappdError as exc:
            log.warning("job %s failed: %s", job.external_id, exc)
            await self._complete_quietly(
                job,
                conclusion=FAILURE,
                title="ghappd failed",
                summary=f"The job could not be completed: {exc}",
            )
        finally:
            log.info(
                "job %s ended after %.1f s",
                job.external_id,
                trio.current_time() - start,
            )

    # -- the steps ----------------------------------------------------------

    async def _run(self, job: JobSpec, rule: JobRule, settings: JobSettings) -> None:
        runner = settings.runner
        bwrap = _find_bwrap() if runner.sandbox == "bwrap" else None
        sha = job.sha or await self._resolve_sha(job)
        clone_token = await self.client.tokens.get(
            job.installation_id,
            valid_for=runner.git_timeout + TOKEN_MARGIN,
            repositories=[job.repository],
            permissions={"contents": "read"},
        )
        if job.report == "check_run":
            await self.reporter.check_run(
                _with_sha(job, sha),
                state=State.RUNNING,
                body={
                    "status": "in_progress",
                    "started_at": _iso_now(),
                    "output": {
                        "title": "Running",
                        "summary": f"Running `{shlex.join(rule.command)}`.",
                    },
                },
            )

        async with self.workspaces.workspace(
            job_id=_job_id(job),
            git_url=settings.git_url,
            repository=job.repository,
            sha=sha,
            fallback_ref=job.fetch_ref,
            token=clone_token.secret,
            timeout=runner.git_timeout,
        ) as checkout:
            await self._run_in(checkout, _with_sha(job, sha), settings, bwrap=bwrap)

    async def _run_in(
        self,
        checkout: Path,
        job: JobSpec,
        settings: JobSettings,
        *,
        bwrap: str | None,
    ) -> None:
        """Run the command in ``checkout``, revoke its token, report the result."""
        rule = job.rule
        runner = settings.runner
        # A fork's pull request runs code its author wrote, so by default
        # that code gets neither the token nor the secrets.
        restricted = job.from_fork and rule.forks == "restricted"
        if restricted:
            log.info(
                "job %s runs without GITHUB_TOKEN and secret_env: pull request"
                " from a fork and forks = restricted",
                job.external_id,
            )
        secrets = {} if restricted else _revealed(rule.secret_env)
        command_token = None
        if rule.token and not restricted:
            # With the clone's scope (the default permissions), this is the
            # clone token itself. It is revoked all the same, and the next
            # job mints a new one.
            command_token = await self.client.tokens.get(
                job.installation_id,
                valid_for=rule.timeout + TOKEN_MARGIN,
                repositories=[job.repository],
                permissions=dict(rule.permissions),
            )

        try:
            env = await self._environment(
                checkout,
                job,
                settings,
                token=command_token.secret if command_token else None,
            )
            env.update(secrets)
            sandbox = None
            if bwrap is not None:
                sandbox = sandbox_argv(
                    bwrap=bwrap,
                    checkout=checkout,
                    hidden=self._hidden_paths(settings),
                )
            result = await run_command(
                rule.command,
                cwd=checkout,
                env=env,
                timeout=rule.timeout,
                kill_grace=runner.kill_grace,
                nice=runner.nice,
                output_limit=runner.output_limit,
                sandbox=sandbox,
            )
        finally:
            if command_token is not None:
                await self._revoke(job, command_token)
        self.command_seconds += result.duration

        exposed = list(secrets.values())
        if command_token is not None:
            exposed.append(command_token.secret)
        await self._report_result(job, result, checkout, mask=_Mask.of(exposed))

    async def _environment(
        self, checkout: Path, job: JobSpec, settings: JobSettings, *, token: str | None
    ) -> dict[str, str]:
        """Write the event payload file; return the command's environment."""
        assert job.sha is not None
        event_path = job_event_path(checkout)
        await trio.Path(event_path).write_bytes(
            json.dumps(job.delivery.payload).encode()
        )
        env = build_environment(
            event_name=job.delivery.event,
            event_path=event_path,
            repository=job.repository,
            sha=job.sha,
            ref=job.ref,
            api_url=settings.api_url,
            server_url=settings.git_url,
            workspace=checkout,
            home=job_home(checkout),
            token=token,
            path=_command_path(),
        )
        env.update(job.rule.env)
        return env

    def _hidden_paths(self, settings: JobSettings) -> list[Path]:
        """Return the folders a sandboxed command must not see."""
        # The supervisor passes config_folders(config) as hidden_paths.
        hidden = [Path("/tmp"), self.workspaces.root, *settings.hidden_paths]
        journal_path = getattr(self.journal, "path", None)
        if isinstance(journal_path, Path):
            hidden.append(journal_path.absolute().parent)
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials:
            hidden.append(Path(credentials))
        hidden.append(Path("/run/credentials"))
        return hidden

    async def _revoke(self, job: JobSpec, token: Token) -> None:
        """Revoke the command's token, even while the job is being cancelled.

        The command may have handed the token to processes that outlive it,
        so the token is revoked as soon as the command ends. The revocation
        is shielded from cancellation and bounded by
        :data:`_REVOKE_TIMEOUT`; a failure is logged, not raised.
        """
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_REVOKE_TIMEOUT) as bounded,
        ):
            await self.client.revoke_token(token)
        if bounded.cancelled_caught:
            log.warning(
                "revoking the token of job %s timed out after %.0f s, so it"
                " stays valid until %s",
                job.external_id,
                _REVOKE_TIMEOUT,
                token.expires_at.isoformat(),
            )

    async def _resolve_sha(self, job: JobSpec) -> str:
        """Find the commit to check out for an event that names none."""
        if job.pull_number is not None:
            path = f"/repos/{job.repository}/pulls/{job.pull_number}"
            pull = await self.client.installation_request(
                job.installation_id, "GET", path
            )
            sha = _dig(pull, "head", "sha")
        else:
            # The ref comes from the payload and goes into a URL path.
            ref = validate_ref(job.fetch_ref or "").removeprefix("refs/")
            path = f"/repos/{job.repository}/commits/{ref}"
            commit = await self.client.installation_request(
                job.installation_id, "GET", path
            )
            sha = _dig(commit, "sha")
        if not isinstance(sha, str):
            raise GitHubError(
                f"GitHub's response to GET {path} names no commit",
                installation_id=job.installation_id,
                method="GET",
                path=path,
            )
        return validate_sha(sha)

    async def _report_result(
        self, job: JobSpec, result: CommandResult, checkout: Path, *, mask: _Mask
    ) -> None:
        # Everything below derives from the masked output, so no cut for
        # GitHub's limits can leave part of a secret behind.
        result = dataclasses.replace(result, output=mask.text(result.output))
        command = shlex.join(job.rule.command)
        if result.timed_out:
            conclusion = TIMED_OUT
            title = f"Timed out after {job.rule.timeout:.0f} s"
        elif result.exit_code == 0:
            conclusion = SUCCESS
            title = "Passed"
        else:
            conclusion = FAILURE
            if result.exit_code is None and result.signal is None:
                title = "Command could not start"
            elif result.signal is not None:
                title = f"Killed by signal {result.signal}"
            else:
                title = f"Failed with exit code {result.exit_code}"
        parsed = mask.annotations(
            parse_annotations(result.output, workspace=str(checkout))
        )
        lines = [
            f"`{command}` ran for {result.duration:.1f} s on `{job.sha}`"
            f" and ended: {title.lower()}."
        ]
        if result.exit_code is None and result.signal is None:
            # The runner's output names why the command could not start.
            lines.append(result.output.strip())
        annotations = parsed.annotations
        if annotations:
            count = len(annotations)
            noun = "annotation" if count == 1 else "annotations"
            lines.append(f"It reported {count} {noun}.")
        limit = self.settings().runner.max_annotations
        if len(annotations) > limit:
            lines.append(
                f"Only the first {limit} are shown ([runner] max_annotations)."
            )
            annotations = annotations[:limit]
        # Messages come from the command, which may run pull request code:
        # as inline code they cannot mention people or load images.
        for note in parsed.unlocated[:20]:
            lines.append(
                f"- {note['annotation_level']}: {_inline_code(str(note['message']))}"
            )
        if result.timed_out:
            lines.append(
                "Its process group was stopped. If the command needs longer,"
                f" raise `timeout` of the `{job.name}` job in the ghappd"
                " configuration."
            )
        # The tail of the output is kept, and cut before it is fenced, so
        # the code block always opens and closes.
        output = fit(result.output.replace("```", "'''"), _TEXT_ROOM)
        if result.truncated or len(output) < len(result.output):
            lines.append(
                f"The output was {result.output_bytes} bytes; the last"
                f" {len(output.encode())} are shown."
            )
        text = "```\n" + output + "\n```"
        log.info("job %s concluded %s", job.external_id, conclusion)
        await self.reporter.complete(
            job,
            conclusion=conclusion,
            title=mask.text(title),
            summary=mask.text("\n".join(lines)),
            text=mask.text(text) if result.output else None,
            annotations=annotations,
        )

    async def _complete_quietly(
        self, job: JobSpec, *, conclusion: str, title: str, summary: str
    ) -> None:
        """Complete the job's report; log, do not raise, when that fails."""
        no_check_run = job.report == "check_run" and job.sha is None
        # A skipped job gets no comment: a comment per skip would be noise.
        quiet_comment = job.report == "comment" and conclusion == SKIPPED
        if no_check_run or quiet_comment:
            await self.journal.set_job(
                job.delivery.id, job.name, state=State.FINISHED, conclusion=conclusion
            )
            log.info("job %s %s: %s", job.external_id, conclusion, summary)
            return
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_SHIELDED_REPORT_TIMEOUT),
        ):
            try:
                await self.reporter.complete(
                    job, conclusion=conclusion, title=title, summary=summary
                )
            except GhappdError as exc:
                log.warning(
                    "reporting job %s as %s failed: %s",
                    job.external_id,
                    conclusion,
                    exc,
                )


@dataclass(frozen=True, slots=True)
class _Mask:
    """The secret values a job's command got, to replace with :data:`MASK`.

    ``secrets`` are sorted longest first, so a secret that contains another
    is replaced whole.
    """

    secrets: tuple[str, ...]

    @classmethod
    def of(cls, values: Iterable[str]) -> _Mask:
        """Collect ``values`` and each line of the multi-line ones.

        Values shorter than :data:`daemon.logs.MIN_SECRET_LENGTH` are left
        out, because they would match ordinary words of the output.
        """
        found: set[str] = set()
        for value in values:
            found.add(value)
            found.update(line.strip() for line in value.splitlines())
        kept = (secret for secret in found if len(secret) >= MIN_SECRET_LENGTH)
        return cls(secrets=tuple(sorted(kept, key=len, reverse=True)))

    def text(self, text: str) -> str:
        """Return ``text`` with every secret replaced by :data:`MASK`."""
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def annotations(self, parsed: ParsedAnnotations) -> ParsedAnnotations:
        """Return ``parsed`` with every secret masked in its text fields.

        Unescaping a workflow command's ``%3A`` or ``%0A`` can rebuild a
        secret that the output only contained encoded, so the fields are
        masked after parsing as well.
        """
        return ParsedAnnotations(
            annotations=[self._annotation(a) for a in parsed.annotations],
            unlocated=[self._annotation(a) for a in parsed.unlocated],
        )

    def _annotation(self, annotation: Annotation) -> Annotation:
        return {
            key: self.text(value) if isinstance(value, str) else value
            for key, value in annotation.items()
        }


def config_folders(config: Config) -> tuple[Path, ...]:
    """Return the folders of the configuration file and every secret file.

    The value for :attr:`JobSettings.hidden_paths`, so a sandboxed command
    sees neither the configuration nor a key kept beside it.
    """
    files = [config.path, config.app.private_key_file]
    files += [Path(secret.source) for secret in config.app.webhook_secrets]
    for rule in config.jobs:
        files += [Path(secret.source) for secret in rule.secret_env.values()]
    folders = dict.fromkeys(Path(os.path.abspath(file)).parent for file in files)
    return tuple(folders)


def sandbox_argv(*, bwrap: str, checkout: Path, hidden: Iterable[Path]) -> list[str]:
    """Return the bubblewrap argv prefix, up to ``--``, for a job in ``checkout``.

    The command sees the host's file system read-only, a new /dev, and a
    /proc of its own PID namespace, so other processes and their
    environment are out of sight. Each existing folder in ``hidden`` is
    covered by an empty tmpfs, parents before children. Then the job's
    checkout and HOME are bound back read-write and its event file
    read-only, at the same paths, and the command starts in the checkout.
    The network and the environment are the daemon's.

    When bwrap's first process in the namespace exits, the kernel kills
    every process left in it, including those that called ``setsid``.
    ``--die-with-parent`` ends the sandbox when bwrap's outer process is
    killed, as the runner does to the command's process group.
    ``--unshare-user`` is passed also when the daemon runs as root: root
    inside keeps its rights only on files whose owner is mapped into the
    namespace, which root's own files are.
    """
    home = job_home(checkout)
    event_path = job_event_path(checkout)
    argv = [
        bwrap,
        "--die-with-parent",
        "--new-session",
        "--unshare-user",
        "--unshare-pid",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
    ]
    folders = _hideable(hidden)
    for folder in folders:
        argv += ["--tmpfs", str(folder)]
    # ghappd's own Python and virtual environment, whose bin folder is on
    # the commands' PATH, stay visible read-only even where a hidden folder
    # (such as /tmp, in a checkout under /tmp) contains them.
    for software in sorted({Path(sys.prefix), Path(sys.base_prefix)}):
        if any(software.is_relative_to(folder) for folder in folders):
            argv += ["--ro-bind", str(software), str(software)]
    for writable in (checkout, home):
        argv += ["--bind", str(writable), str(writable)]
    if event_path.exists():
        argv += ["--ro-bind", str(event_path), str(event_path)]
    argv += ["--chdir", str(checkout), "--"]
    return argv


def _hideable(paths: Iterable[Path]) -> list[Path]:
    """Return the existing folders of ``paths`` that a tmpfs may cover.

    A missing folder is skipped, because bwrap cannot create its mount
    point in the read-only root. So is a folder right below /, other than
    /tmp, because covering /etc, /usr or /home would break the command.
    """
    found: set[Path] = set()
    for path in paths:
        folder = Path(os.path.abspath(path))
        if len(folder.parts) < 3 and folder != Path("/tmp"):
            # NOTE: a file in such a folder (such as /etc/ghappd.toml)
            # stays readable; only its folder's own tmpfs would hide it.
            log.warning("sandbox leaves %s visible: a top-level folder", folder)
            continue
        if folder.is_dir():
            found.add(folder)
    return sorted(found, key=lambda folder: len(folder.parts))


def _find_bwrap() -> str:
    """Return bwrap's path in the commands' PATH; raise ConfigError if missing."""
    bwrap = shutil.which("bwrap", path=_command_path())
    if bwrap is None:
        raise ConfigError(
            [
                '[runner] sandbox = "bwrap": bwrap not found in PATH'
                f' {_command_path()!r}; set [runner] sandbox = "none" or'
                " install bubblewrap"
            ]
        )
    return os.path.abspath(bwrap)


def _revealed(secret_env: Mapping[str, Secret]) -> dict[str, str]:
    return {name: secret.reveal().decode() for name, secret in secret_env.items()}


def _command_path() -> str:
    """Return the commands' PATH: the daemon's own, after its scripts folder.

    Tools installed beside ghappd in its virtual environment (such as the
    ``sandbox`` extra's ruff) are found even when that environment is not
    activated, as under systemd.
    """
    scripts = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", os.defpath)
    if scripts in path.split(os.pathsep):
        return path
    return os.pathsep.join([scripts, path])


def _job_id(job: JobSpec) -> str:
    """Return the job's workspace name: readable, short and always valid.

    The delivery id and job name, reduced to safe characters and cut, with
    a digest of both appended, so any id the intake accepts and any rule
    name gives a distinct directory name.
    """
    raw = f"{job.delivery.id}-{job.rule.name}"
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    return f"job-{readable.strip('.-')[:60]}-{digest}"


def _inline_code(text: str) -> str:
    """Return ``text`` on one line as Markdown inline code."""
    flat = " ".join(text.split())
    fence = "``" if "`" in flat else "`"
    return f"{fence} {flat} {fence}"


def _with_sha(job: JobSpec, sha: str) -> JobSpec:
    if job.sha == sha:
        return job
    return dataclasses.replace(job, sha=sha)


def _iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
