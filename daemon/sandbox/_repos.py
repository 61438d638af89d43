"""Bare git repositories for the emulator, written with real git commands.

The helpers here are synchronous: tests call them while setting up, before
any client talks to the emulator. Commits are written with
``git fast-import`` straight into the bare repository, so no work tree is
checked out. Every git call runs with the system and global configuration
switched off, so the machine's own git settings change nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import trio

__all__ = ["RepositoryStore", "git_environment", "valid_full_name"]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_SHA = re.compile(r"[0-9a-f]{40}")

_AUTHOR = "Sandbox Author <author@sandbox.invalid>"
_COMMITTER = "Sandbox Committer <committer@sandbox.invalid>"


def valid_full_name(full_name: str) -> bool:
    """Return whether ``full_name`` is ``owner/name`` with GitHub's characters."""
    parts = full_name.split("/")
    if len(parts) != 2:
        return False
    return all(_NAME.fullmatch(part) and part not in {".", ".."} for part in parts)


def git_environment(home: Path) -> dict[str, str]:
    """Return an environment for git that ignores system and user config."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "LC_ALL": "C",
    }


def _check_path(path: str) -> None:
    parts = path.split("/")
    if (
        not path
        or path.startswith('"')
        or "\n" in path
        or "\0" in path
        or any(part in {"", ".", "..", ".git"} for part in parts)
    ):
        raise ValueError(f"invalid file path {path!r}: use a relative path")


class RepositoryStore:
    """The bare repositories under ``root``, one per ``owner/name.git``."""

    def __init__(self, *, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._env = git_environment(root)
        self._last_commit_time = 0

    def path(self, full_name: str) -> Path:
        """Return the bare repository's directory, existing or not."""
        if not valid_full_name(full_name):
            raise ValueError(f"invalid repository name {full_name!r}: use owner/name")
        return self.root / f"{full_name}.git"

    def exists(self, full_name: str) -> bool:
        """Return whether the repository was created."""
        return valid_full_name(full_name) and (self.path(full_name) / "HEAD").is_file()

    def git(self, full_name: str, *args: str, stdin: bytes | None = None) -> str:
        """Run git in the bare repository and return its stripped stdout.

        Raises RuntimeError with git's stderr when git exits non-zero.
        """
        return self._run(["git", "--git-dir", str(self.path(full_name)), *args], stdin)

    def _run(self, argv: list[str], stdin: bytes | None = None) -> str:
        result = subprocess.run(
            argv, input=stdin, capture_output=True, env=self._env, check=False
        )
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            command = next(arg for arg in argv[1:] if not arg.startswith("-"))
            if argv[1] == "--git-dir":
                command = argv[3]
            raise RuntimeError(f"git {command} failed with {stderr!r}")
        return result.stdout.decode().strip()

    def create(
        self,
        full_name: str,
        files: Mapping[str, str | bytes],
        *,
        branch: str,
        message: str,
    ) -> str:
        """Create a bare repository whose ``branch`` has one commit of ``files``.

        ``branch`` becomes the default branch (HEAD). Returns the commit sha.
        Raises ValueError when the repository already exists.
        """
        path = self.path(full_name)
        if self.exists(full_name):
            raise ValueError(f"repository {full_name!r} already exists")
        self._check_branch(branch)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._run(
            [
                "git",
                "init",
                "--bare",
                "--quiet",
                f"--initial-branch={branch}",
                str(path),
            ]
        )
        # Automatic gc could pack objects at any time; the store runs gc
        # itself when a force-push has to drop a commit.
        self.git(full_name, "config", "gc.auto", "0")
        return self._write_commit(
            full_name, files, branch=branch, parent=None, message=message
        )

    def commit(
        self,
        full_name: str,
        files: Mapping[str, str | bytes],
        *,
        branch: str,
        message: str,
    ) -> str:
        """Add a commit on ``branch`` that writes ``files`` over its tree.

        Files not named keep their content. A branch that does not exist yet
        starts from the default branch's tip. Returns the new commit sha.
        """
        self._require(full_name)
        self._check_branch(branch)
        parent = self.resolve(full_name, f"refs/heads/{branch}")
        if parent is None:
            parent = self.resolve(full_name, "HEAD")
        return self._write_commit(
            full_name, files, branch=branch, parent=parent, message=message
        )

    def force_push(
        self,
        full_name: str,
        files: Mapping[str, str | bytes],
        *,
        branch: str,
        message: str,
    ) -> str:
        """Replace the tip of ``branch`` as ``git commit --amend`` and a force-push.

        The new tip has the old tip's parent and that parent's tree with
        ``files`` written over it (a root commit holds exactly ``files``).
        ``refs/pull/*/head`` refs that pointed at the old tip move to the new
        one, as GitHub moves a pull request's head, and the old commit is
        pruned, so fetching its sha fails afterwards unless another ref
        still reaches it. Returns the new commit sha.
        """
        self._require(full_name)
        old = self.resolve(full_name, f"refs/heads/{branch}")
        if old is None:
            raise ValueError(f"branch {branch!r} not found in {full_name!r}")
        parent = self.resolve(full_name, f"{old}^")
        new = self._write_commit(
            full_name, files, branch=branch, parent=parent, message=message
        )

        refs = self.git(
            full_name, "for-each-ref", "--format=%(objectname) %(refname)", "refs/pull"
        )
        for line in refs.splitlines():
            sha, ref = line.split(" ", 1)
            if sha == old:
                self.git(full_name, "update-ref", ref, new, old)

        self.git(full_name, "reflog", "expire", "--expire=now", "--all")
        self.git(full_name, "gc", "--prune=now", "--quiet")
        return new

    def pull_ref(self, full_name: str, number: int, sha: str) -> None:
        """Point ``refs/pull/<number>/head`` at the commit ``sha``."""
        self._require(full_name)
        if number < 1:
            raise ValueError(f"invalid pull request number {number!r}: must be >= 1")
        if self.resolve(full_name, sha) is None:
            raise ValueError(f"commit {sha!r} not found in {full_name!r}")
        self.git(full_name, "update-ref", f"refs/pull/{number}/head", sha)

    def resolve(self, full_name: str, ref: str) -> str | None:
        """Return the commit sha ``ref`` names in the repository, or None."""
        result = subprocess.run(
            self._rev_parse(full_name, ref),
            capture_output=True,
            env=self._env,
            check=False,
        )
        return result.stdout.decode().strip() if result.returncode == 0 else None

    async def resolve_async(self, full_name: str, ref: str) -> str | None:
        """Return the commit sha ``ref`` names, without blocking the trio loop."""
        result = await trio.run_process(
            self._rev_parse(full_name, ref),
            capture_stdout=True,
            capture_stderr=True,
            env=self._env,
            check=False,
        )
        return result.stdout.decode().strip() if result.returncode == 0 else None

    def _rev_parse(self, full_name: str, ref: str) -> list[str]:
        self._require(full_name)
        return [
            "git",
            "--git-dir",
            str(self.path(full_name)),
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            f"{ref}^{{commit}}",
        ]

    def _require(self, full_name: str) -> None:
        if not self.exists(full_name):
            raise ValueError(
                f"repository {full_name!r} not found: call create_repository first"
            )

    def _check_branch(self, branch: str) -> None:
        result = subprocess.run(
            ["git", "check-ref-format", "--branch", branch],
            capture_output=True,
            env=self._env,
            check=False,
        )
        if result.returncode != 0 or branch.startswith("-"):
            raise ValueError(f"invalid branch name {branch!r}")

    def _commit_time(self) -> int:
        # Two commits with the same tree, parent, message and second would
        # get the same sha; a strictly increasing timestamp keeps every
        # commit written here distinct.
        now = max(int(time.time()), self._last_commit_time + 1)
        self._last_commit_time = now
        return now

    def _write_commit(
        self,
        full_name: str,
        files: Mapping[str, str | bytes],
        *,
        branch: str,
        parent: str | None,
        message: str,
    ) -> str:
        # The stream format is documented in git-fast-import(1): a commit
        # command, its author and committer lines, a `data` block with the
        # exact byte count, an optional `from`, then one `M` line per file.
        stamp = f"{self._commit_time()} +0000"
        encoded_message = message.encode()
        stream = bytearray()
        stream += f"commit refs/heads/{branch}\n".encode()
        stream += f"author {_AUTHOR} {stamp}\n".encode()
        stream += f"committer {_COMMITTER} {stamp}\n".encode()
        stream += f"data {len(encoded_message)}\n".encode() + encoded_message + b"\n"
        if parent is not None:
            stream += f"from {parent}\n".encode()
        else:
            stream += b"deleteall\n"
        for name, content in sorted(files.items()):
            _check_path(name)
            data = content.encode() if isinstance(content, str) else content
            stream += f"M 100644 inline {name}\n".encode()
            stream += f"data {len(data)}\n".encode() + data + b"\n"
        stream += b"done\n"

        self.git(
            full_name,
            "fast-import",
            "--quiet",
            "--force",
            "--done",
            stdin=bytes(stream),
        )
        sha = self.resolve(full_name, f"refs/heads/{branch}")
        if sha is None or not _SHA.fullmatch(sha):
            raise RuntimeError(f"fast-import wrote no commit on {branch!r}")
        return sha
