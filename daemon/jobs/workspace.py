"""Check out the exact commit a job runs on, in a directory of its own.

Layout under ``[workspaces] root``::

    root/.lock               flock(2)-ed by the daemon that owns the root
    root/<job id>-<random>/  one job's directory, removed after the job
        repo/                the checkout: the command's cwd and GITHUB_WORKSPACE
        home/                an empty HOME for git and the command
        event.json           where the caller writes the webhook payload

The installation token reaches git only through its environment, as an
``http.extraHeader`` set with ``GIT_CONFIG_COUNT`` (git-config(1),
"ENVIRONMENT"). It is never in a URL, an argument, ``.git/config`` or an
error message.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import trio

from daemon.errors import CommitNotFound, WorkspaceError

__all__ = [
    "WorkspaceRoot",
    "job_event_path",
    "job_home",
    "validate_job_id",
    "validate_ref",
    "validate_repository",
    "validate_sha",
]

log = logging.getLogger(__name__)

_LOCK_NAME = ".lock"
_CHECKOUT_NAME = "repo"
_HOME_NAME = "home"
_EVENT_NAME = "event.json"

# GitHub account names: letters, digits and single hyphens, not starting
# with a hyphen, at most 39 characters. Enterprise managed users add an
# underscore suffix, so underscores are accepted too.
_OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,38}")
# GitHub repository names: letters, digits, ".", "_" and "-", at most 100.
_NAME_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,99}")
# SHA-1 object names have 40 hex digits and SHA-256 ones 64.
_SHA_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=-]{0,127}")

# Characters git-check-ref-format(1) rejects anywhere in a ref name.
_REF_FORBIDDEN = frozenset(" ~^:?*[\\\x7f") | {chr(code) for code in range(0x20)}

# Substrings of git's stderr (LC_ALL=C, git 2.39) for each kind of failure.
_MISSING_COMMIT_MARKERS = (
    "not our ref",
    "couldn't find remote ref",
    "no such remote ref",
    "does not allow request for unadvertised object",
)
_AUTH_MARKERS = (
    "could not read username",
    "could not read password",
    "authentication failed",
    "returned error: 401",
    "returned error: 403",
)
_NOT_FOUND_MARKERS = ("not found", "returned error: 404")
_SLOW_MARKERS = ("operation too slow", "operation timed out", "timed out")
_CONNECT_MARKERS = ("failed to connect", "could not resolve host", "connection refused")

# Variables of the daemon's environment that git may need to reach the server.
_PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)

_STDERR_TAIL_CHARS = 2000


def validate_repository(repository: str) -> str:
    """Return ``repository`` if it is a valid ``owner/name``.

    Raises WorkspaceError for anything else, including ``..``, a leading
    ``-`` and control characters.
    """
    owner, slash, name = repository.partition("/")
    valid = (
        slash == "/"
        and _OWNER_RE.fullmatch(owner) is not None
        and _NAME_RE.fullmatch(name) is not None
        and ".." not in name
        and name not in {".", ".."}
    )
    if not valid:
        raise WorkspaceError(
            f"invalid repository name {repository!r}: expected owner/name with "
            "letters, digits, '.', '_' and '-' only"
        )
    return repository


def validate_sha(sha: str) -> str:
    """Return ``sha`` if it is 40 or 64 lowercase hex digits.

    Raises WorkspaceError for anything else.
    """
    if _SHA_RE.fullmatch(sha) is None:
        raise WorkspaceError(
            f"invalid commit sha {sha!r}: expected 40 or 64 lowercase hex digits"
        )
    return sha


def validate_ref(ref: str) -> str:
    """Return ``ref`` if it is a safe full ref name, else raise WorkspaceError.

    The rules are git-check-ref-format(1)'s, applied to a full name that
    starts with ``refs/``, which also rules out a leading ``-``.
    """
    problem = _ref_problem(ref)
    if problem is not None:
        raise WorkspaceError(f"invalid git ref {ref!r}: {problem}")
    return ref


def _ref_problem(ref: str) -> str | None:
    if not ref.startswith("refs/"):
        return "a full ref name starts with 'refs/'"
    if any(character in _REF_FORBIDDEN for character in ref):
        return "it contains a space, a control character or one of ~^:?*[\\"
    if ".." in ref or "@{" in ref or ref == "@":
        return "it contains '..' or '@{'"
    if ref.endswith(("/", ".")):
        return "it ends with '/' or '.'"
    for component in ref.split("/"):
        if not component:
            return "it contains an empty component ('//')"
        if component.startswith("."):
            return "a component starts with '.'"
        if component.endswith(".lock"):
            return "a component ends with '.lock'"
    return None


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it can name a directory, else raise WorkspaceError."""
    if _JOB_ID_RE.fullmatch(job_id) is None:
        raise WorkspaceError(
            f"invalid job id {job_id!r}: expected at most 128 letters, digits "
            "and '_.:@+=-', not starting with '.' or '-'"
        )
    return job_id


def _validate_git_url(git_url: str) -> str:
    parts = urllib.parse.urlsplit(git_url)
    valid = (
        parts.scheme in {"http", "https"}
        and bool(parts.hostname)
        and parts.username is None
        and parts.password is None
        and not parts.query
        and not parts.fragment
        and not any(ord(character) <= 0x20 for character in git_url)
    )
    if not valid:
        raise WorkspaceError(
            f"invalid git_url {git_url!r}: expected an http(s) URL without "
            "credentials, query or fragment"
        )
    return git_url.rstrip("/")


def job_home(checkout: Path) -> Path:
    """Return the job's private, initially empty HOME directory."""
    return checkout.parent / _HOME_NAME


def job_event_path(checkout: Path) -> Path:
    """Return where the job's webhook payload belongs, outside the checkout."""
    return checkout.parent / _EVENT_NAME


def _rmtree(path: Path) -> None:
    """Remove ``path`` even where a job made directories read-only."""

    def make_writable_and_retry(function: object, failed: str, _exc: object) -> None:
        parent = os.path.dirname(failed)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, stat.S_IRWXU)
            shutil.rmtree(failed)
        else:
            os.unlink(failed)

    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    # shutil.rmtree does not follow symlinks (rmtree.avoids_symlink_attacks
    # is true on Linux), so a link in a checkout cannot reach outside it.
    shutil.rmtree(path, onerror=make_writable_and_retry)


def _scrub(text: str, secret_values: Sequence[str]) -> str:
    for value in secret_values:
        if value:
            text = text.replace(value, "***")
    text = re.sub(r"(?i)(authorization:\s*)\S.*", r"\1***", text)
    return text.strip()[-_STDERR_TAIL_CHARS:]


async def _kill_group(process: trio.Process) -> None:
    # Cancellation of a git call: git-remote-http runs as a child of git,
    # so the whole group goes.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


class _GitFailure(Exception):
    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(stderr)
        self.returncode = returncode
        self.stderr = stderr

    def has(self, markers: Sequence[str]) -> bool:
        lowered = self.stderr.lower()
        return any(marker in lowered for marker in markers)


class WorkspaceRoot:
    """The directory that contains every job's workspace, owned by one daemon.

    ``root`` is created if missing. ``low_speed_limit`` (bytes per second)
    and ``low_speed_time`` (seconds) become git's ``http.lowSpeedLimit``
    and ``http.lowSpeedTime``: a transfer slower than that limit for that
    long fails, even before the checkout's overall timeout. ``git`` is the
    git executable.

    Use it as ``async with WorkspaceRoot(root=...) as workspaces:``, or
    call :meth:`open` and :meth:`close`.
    """

    def __init__(
        self,
        *,
        root: Path,
        low_speed_limit: int = 1000,
        low_speed_time: int = 30,
        git: str = "git",
    ) -> None:
        self.root = Path(root).absolute()
        self.low_speed_limit = low_speed_limit
        self.low_speed_time = low_speed_time
        self.git = git
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"WorkspaceRoot(root={str(self.root)!r})"

    async def __aenter__(self) -> WorkspaceRoot:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def open(self) -> None:
        """Take the root's lock, then remove what a previous run left behind.

        Raises WorkspaceError when the root cannot be created or another
        process (normally a second ghappd) holds its lock. Each removed
        entry is logged.
        """
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(
                self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise WorkspaceError(
                f"cannot use workspace root {str(self.root)!r}: {exc.strerror}; "
                "check [workspaces] root and its permissions"
            ) from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise WorkspaceError(
                f"workspace root {str(self.root)!r} is locked: another ghappd "
                "holds it; stop that daemon or give this one its own "
                "[workspaces] root"
            ) from None
        self._lock_fd = lock_fd
        log.info("workspace root %s locked", self.root)
        await trio.to_thread.run_sync(self._remove_leftovers)

    def close(self) -> None:
        """Release the root's lock. Workspaces still in use are left alone."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            log.info("workspace root %s released", self.root)

    def _remove_leftovers(self) -> None:
        for entry in sorted(self.root.iterdir()):
            if entry.name == _LOCK_NAME:
                continue
            log.info("removing leftover workspace %s", entry)
            try:
                _rmtree(entry)
            except OSError as exc:
                log.warning("leftover workspace %s not removed: %s", entry, exc)

    def _job_directory(self, path: Path) -> Path:
        try:
            relative = Path(path).absolute().relative_to(self.root)
        except ValueError:
            raise ValueError(
                f"{str(path)!r} is not inside workspace root {str(self.root)!r}"
            ) from None
        if not relative.parts or relative.parts[0] == _LOCK_NAME:
            raise ValueError(f"{str(path)!r} is not a job workspace")
        return self.root / relative.parts[0]

    async def remove(self, path: Path) -> None:
        """Remove the job directory that contains ``path`` (a checkout).

        The removal runs in a worker thread inside a shielded cancel scope,
        so it completes even when the calling task is being cancelled.
        Raises ValueError for a path outside the root. A failure to remove
        is logged, not raised.
        """
        directory = self._job_directory(path)
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(_rmtree, directory)
            except OSError as exc:
                log.warning("workspace %s not removed: %s", directory, exc)
            else:
                log.info("workspace %s removed", directory)

    @contextlib.asynccontextmanager
    async def workspace(
        self,
        *,
        job_id: str,
        git_url: str,
        repository: str,
        sha: str,
        fallback_ref: str | None,
        token: str,
        timeout: float,
    ) -> AsyncIterator[Path]:
        """Check out as :meth:`checkout` does, and remove the workspace after the block.

        The removal happens however the block ends, including by
        cancellation.
        """
        checkout = await self.checkout(
            job_id=job_id,
            git_url=git_url,
            repository=repository,
            sha=sha,
            fallback_ref=fallback_ref,
            token=token,
            timeout=timeout,
        )
        try:
            yield checkout
        finally:
            await self.remove(checkout)

    async def checkout(
        self,
        *,
        job_id: str,
        git_url: str,
        repository: str,
        sha: str,
        fallback_ref: str | None,
        token: str,
        timeout: float,
    ) -> Path:
        """Fetch commit ``sha`` of ``repository`` at depth 1 and return the checkout.

        The clone URL is ``{git_url}/{repository}.git``. For a pull request,
        ``repository`` must be the base repository, never the fork: GitHub
        serves every pull request's head commit from the base repository
        (also as ``refs/pull/<number>/head``), and the installation token
        may not reach the fork at all.

        The commit is fetched by its sha. If the server does not have it,
        or does not allow fetching it by sha, ``fallback_ref`` (for
        example ``refs/pull/7/head``) is fetched instead, and its tip must
        be ``sha``. The checkout is detached at ``sha``.

        ``timeout`` (seconds) bounds the whole checkout, after which git is
        killed. Inputs are validated before git runs.

        Raises:
            CommitNotFound: the commit is gone from the server (for example
                force-pushed away), or ``fallback_ref`` now points elsewhere.
            WorkspaceError: invalid input, authentication rejected,
                repository not found, timeout, or another git failure. The
                message never contains the token.

        On any failure, including cancellation, the new directory is
        removed before the exception propagates.
        """
        validate_job_id(job_id)
        base_url = _validate_git_url(git_url)
        validate_repository(repository)
        validate_sha(sha)
        if fallback_ref is not None:
            validate_ref(fallback_ref)
        if self._lock_fd is None:
            raise RuntimeError(f"{self!r} is not open; call open() first")

        directory = self.root / f"{job_id}-{secrets.token_hex(4)}"
        checkout = directory / _CHECKOUT_NAME
        home = directory / _HOME_NAME
        try:
            directory.mkdir(mode=0o700)
            checkout.mkdir(mode=0o700)
            home.mkdir(mode=0o700)
        except OSError as exc:
            await self.remove(directory)
            raise WorkspaceError(
                f"cannot create workspace {str(directory)!r}: {exc.strerror}; "
                "check that the workspace root exists and is writable"
            ) from exc

        url = f"{base_url}/{repository}.git"
        credential = base64.b64encode(f"x-access-token:{token}".encode()).decode()
        env = self._git_environment(
            home=home,
            scheme=urllib.parse.urlsplit(base_url).scheme,
            authorization=f"Basic {credential}",
        )
        git = _Git(
            executable=self.git,
            cwd=checkout,
            env=env,
            secret_values=(token, credential),
        )
        log.info("checkout of %s at %s started in %s", repository, sha, directory)
        try:
            try:
                with trio.fail_after(timeout):
                    await self._fetch_and_check_out(
                        git,
                        url=url,
                        repository=repository,
                        sha=sha,
                        fallback_ref=fallback_ref,
                    )
            except trio.TooSlowError:
                raise WorkspaceError(
                    f"checkout of {repository!r} at {sha} timed out after "
                    f"{timeout:g} s; check that {base_url} is reachable, or "
                    "raise [runner] git_timeout"
                ) from None
        except BaseException:
            await self.remove(checkout)
            raise
        log.info("checkout of %s at %s ready in %s", repository, sha, checkout)
        return checkout

    def _git_environment(
        self, *, home: Path, scheme: str, authorization: str
    ) -> dict[str, str]:
        # Settings passed as GIT_CONFIG_KEY_n/GIT_CONFIG_VALUE_n
        # (git-config(1), "ENVIRONMENT") apply to every git call and are
        # never written to .git/config.
        config = {
            "http.extraHeader": f"Authorization: {authorization}",
            # Only the git_url's scheme: no file://, ext:: or ssh transports
            # (git-config(1), protocol.allow).
            "protocol.allow": "never",
            f"protocol.{scheme}.allow": "always",
            "http.followRedirects": "false",
            "http.lowSpeedLimit": str(self.low_speed_limit),
            "http.lowSpeedTime": str(self.low_speed_time),
            "credential.helper": "",
            "core.hooksPath": os.devnull,
            "core.fsmonitor": "false",
            "gc.auto": "0",
            "maintenance.auto": "false",
            "fetch.recurseSubmodules": "false",
            "submodule.recurse": "false",
            "init.defaultBranch": "main",
            "advice.detachedHead": "false",
        }
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(home),
            "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_PROTOCOL_FROM_USER": "0",
            "GIT_CONFIG_COUNT": str(len(config)),
        }
        for index, (key, value) in enumerate(config.items()):
            env[f"GIT_CONFIG_KEY_{index}"] = key
            env[f"GIT_CONFIG_VALUE_{index}"] = value
        for name in _PROXY_VARIABLES:
            if name in os.environ:
                env[name] = os.environ[name]
        return env

    async def _fetch_and_check_out(
        self,
        git: _Git,
        *,
        url: str,
        repository: str,
        sha: str,
        fallback_ref: str | None,
    ) -> None:
        await git.run("init", "--quiet", "--template=", ".")
        await git.run("remote", "add", "origin", url)

        try:
            await git.fetch(sha)
        except _GitFailure as failure:
            if not failure.has(_MISSING_COMMIT_MARKERS):
                raise _workspace_error(failure, repository=repository) from None
            if fallback_ref is None:
                raise CommitNotFound(
                    f"commit {sha} of {repository!r} is not on the server any "
                    "more (force-pushed or deleted), so there is nothing to check out"
                ) from None
            log.info(
                "fetch of %s at %s failed; fetching %s instead",
                repository,
                sha,
                fallback_ref,
            )
            try:
                await git.fetch(fallback_ref)
            except _GitFailure as fallback_failure:
                if fallback_failure.has(_MISSING_COMMIT_MARKERS):
                    raise CommitNotFound(
                        f"commit {sha} of {repository!r} is not on the server "
                        f"and {fallback_ref!r} does not exist; the commit was "
                        "force-pushed away or the pull request closed"
                    ) from None
                raise _workspace_error(
                    fallback_failure, repository=repository
                ) from None

        try:
            await git.run("checkout", "--quiet", "--detach", "FETCH_HEAD")
            head = (await git.run("rev-parse", "--verify", "HEAD")).strip()
        except _GitFailure as failure:
            raise _workspace_error(failure, repository=repository) from None
        if head != sha:
            raise CommitNotFound(
                f"{fallback_ref or sha!r} of {repository!r} points at {head}, not "
                f"at the expected commit {sha}: the pull request was updated "
                "since this delivery was sent"
            )


def _workspace_error(failure: _GitFailure, *, repository: str) -> WorkspaceError:
    if failure.has(_AUTH_MARKERS):
        reason = (
            "the server rejected the installation token; check that the App "
            "is installed on the repository with contents read permission"
        )
    elif failure.has(_NOT_FOUND_MARKERS):
        reason = "the repository was not found; check its name and that it still exists"
    elif failure.has(_SLOW_MARKERS):
        reason = "the transfer stalled and timed out; check the git server"
    elif failure.has(_CONNECT_MARKERS):
        reason = "the git server could not be reached; check [app] git_url"
    else:
        reason = "git failed"
    return WorkspaceError(
        f"checkout of {repository!r} failed: {reason} "
        f"(git exit status {failure.returncode}: {failure.stderr})"
    )


class _Git:
    """git calls in one checkout, with their environment and output scrubbing."""

    def __init__(
        self,
        *,
        executable: str,
        cwd: Path,
        env: Mapping[str, str],
        secret_values: Sequence[str],
    ) -> None:
        self.executable = executable
        self.cwd = cwd
        self.env = dict(env)
        self.secret_values = tuple(secret_values)

    async def fetch(self, refspec: str) -> None:
        # --end-of-options (git 2.24+) ends option parsing, so the refspec
        # is never read as an option, even if it started with "-".
        await self.run(
            "fetch",
            "--quiet",
            "--depth=1",
            "--no-tags",
            "--no-recurse-submodules",
            "origin",
            "--end-of-options",
            refspec,
        )

    async def run(self, *args: str) -> str:
        """Run git with ``args`` and return its stdout; raise _GitFailure on failure."""
        try:
            completed = await trio.run_process(
                [self.executable, *args],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                start_new_session=True,
                deliver_cancel=_kill_group,
            )
        except OSError as exc:
            raise WorkspaceError(
                f"cannot run git ({self.executable!r}): {exc.strerror}; "
                "install git or pass the path of its executable"
            ) from exc
        stderr = _scrub(
            completed.stderr.decode("utf-8", errors="replace"), self.secret_values
        )
        if completed.returncode != 0:
            log.info("git %s exited with status %d", args[0], completed.returncode)
            raise _GitFailure(completed.returncode, stderr)
        return completed.stdout.decode("utf-8", errors="replace")
