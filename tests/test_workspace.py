from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
import trio

from daemon.errors import CommitNotFound, WorkspaceError
from daemon.jobs.workspace import (
    WorkspaceRoot,
    job_event_path,
    job_home,
    validate_job_id,
    validate_ref,
    validate_repository,
    validate_sha,
)
from daemon.sandbox import Emulator

REPO = "octo-org/hello"
SHA = "0123456789abcdef0123456789abcdef01234567"
FAKE_TOKEN = "ghs_" + "Q" * 72

# Bounded wait for real git processes: the deadline only limits a failure.
CHECKOUT_TIMEOUT = 30.0


@pytest.fixture
async def workspaces(tmp_path: Path) -> AsyncIterator[WorkspaceRoot]:
    async with WorkspaceRoot(root=tmp_path / "workspaces") as root:
        yield root


async def mint_token(emulator: Emulator, app_key_pem: bytes) -> str:
    now = int(time.time())
    app_jwt = jwt.encode(
        {"iat": now - 60, "exp": now + 540, "iss": str(emulator.app_id)},
        app_key_pem,
        algorithm="RS256",
    )
    async with httpx.AsyncClient(base_url=emulator.api_url) as client:
        response = await client.post(
            "/app/installations/1001/access_tokens",
            headers={
                "Authorization": f"Bearer {app_jwt}",
                "Accept": "application/vnd.github+json",
            },
        )
    response.raise_for_status()
    token = response.json()["token"]
    assert isinstance(token, str)
    return token


def git_output(checkout: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(checkout), *args],
        capture_output=True,
        check=True,
        text=True,
        env={"PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/"},
    ).stdout.strip()


def bare_git(emulator: Emulator, repository: str, *args: str) -> None:
    subprocess.run(
        ["git", "--git-dir", str(emulator.repos_root / f"{repository}.git"), *args],
        capture_output=True,
        check=True,
    )


def entries(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir())


async def hold_connections(
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept TCP connections on 127.0.0.1 and never respond on them."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    connections: list[trio.SocketStream] = []
    async with listeners[0]:
        task_status.started(listeners[0].socket.getsockname()[1])
        while True:
            connections.append(await listeners[0].accept())


# ----------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "repository",
    ["octo-org/hello", "a/b", "user_ab/x.y-z_1", "O/.github", "o/_private"],
)
def test_repository_valid(repository: str) -> None:
    assert validate_repository(repository) == repository


@pytest.mark.parametrize(
    "repository",
    [
        "hello",
        "octo-org/",
        "/hello",
        "-org/hello",
        "org/-hello",
        "org/..",
        "org/.",
        "org/a..b",
        "org/hello/extra",
        "org/hel lo",
        "org/hel\nlo",
        "org/hel\x00lo",
        "o" * 40 + "/x",
        "o/" + "x" * 101,
        "org/héllo",
    ],
)
def test_repository_invalid(repository: str) -> None:
    with pytest.raises(WorkspaceError, match=r"^invalid repository name "):
        validate_repository(repository)


@pytest.mark.parametrize("sha", ["a" * 40, "0123456789" * 6 + "abcd"])
def test_sha_valid(sha: str) -> None:
    assert validate_sha(sha) == sha


@pytest.mark.parametrize(
    "sha",
    ["A" * 40, "a" * 39, "a" * 41, "a" * 63, "g" * 40, "--upload-pack=x", "", "HEAD"],
)
def test_sha_invalid(sha: str) -> None:
    with pytest.raises(WorkspaceError, match=r"^invalid commit sha "):
        validate_sha(sha)


@pytest.mark.parametrize(
    "ref",
    ["refs/pull/7/head", "refs/heads/main", "refs/heads/feature/x-1", "refs/tags/v1.0"],
)
def test_ref_valid(ref: str) -> None:
    assert validate_ref(ref) == ref


@pytest.mark.parametrize(
    "ref",
    [
        "--upload-pack=touch x",
        "-refs/heads/x",
        "main",
        "HEAD",
        "refs/heads/a..b",
        "refs/heads/a b",
        "refs/heads/a~1",
        "refs/heads/a^",
        "refs/heads/a:b",
        "refs/heads/a?",
        "refs/heads/a*",
        "refs/heads/a[",
        "refs/heads/a\\b",
        "refs/heads/a@{1}",
        "refs/heads/a\x01",
        "refs/heads/a\x7f",
        "refs/heads/",
        "refs/heads//a",
        "refs/heads/a.",
        "refs/heads/.hidden",
        "refs/heads/a.lock",
        "refs/heads/a.lock/b",
    ],
)
def test_ref_invalid(ref: str) -> None:
    with pytest.raises(WorkspaceError, match=r"^invalid git ref "):
        validate_ref(ref)


def test_ref_rules_agree_with_git() -> None:
    # git itself confirms the names accepted above, and rejects the rest.
    accepted = ["refs/pull/7/head", "refs/heads/feature/x-1"]
    rejected = ["refs/heads/a..b", "refs/heads/a.lock", "refs/heads/.hidden"]
    for ref in accepted + rejected:
        git = subprocess.run(["git", "check-ref-format", ref], check=False)
        assert (git.returncode == 0) == (ref in accepted), ref


@pytest.mark.parametrize("job_id", ["job-1", "d1f0e3c2:lint", "a_b.c@d+e=f"])
def test_job_id_valid(job_id: str) -> None:
    assert validate_job_id(job_id) == job_id


@pytest.mark.parametrize(
    "job_id", ["", "a/b", "..", ".hidden", "-x", "a b", "a\x00b", "x" * 129]
)
def test_job_id_invalid(job_id: str) -> None:
    with pytest.raises(WorkspaceError, match=r"^invalid job id "):
        validate_job_id(job_id)


async def test_option_ref_rejected_before_git(
    workspaces: WorkspaceRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkspaceError, match=r"^invalid git ref '--upload-pack"):
        await workspaces.checkout(
            job_id="job-1",
            git_url="http://127.0.0.1:9/git",
            repository=REPO,
            sha=SHA,
            fallback_ref="--upload-pack=touch x",
            token=FAKE_TOKEN,
            timeout=CHECKOUT_TIMEOUT,
        )
    assert not (tmp_path / "x").exists()
    assert entries(workspaces.root) == [".lock"]


async def test_option_sha_rejected_before_git(
    workspaces: WorkspaceRoot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkspaceError, match=r"^invalid commit sha '--upload-pack"):
        await workspaces.checkout(
            job_id="job-1",
            git_url="http://127.0.0.1:9/git",
            repository=REPO,
            sha="--upload-pack=touch x",
            fallback_ref=None,
            token=FAKE_TOKEN,
            timeout=CHECKOUT_TIMEOUT,
        )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "git_url",
    [
        "file:///srv/repos",
        "ext::sh -c touch% x",
        "http://user:pw@127.0.0.1/git",
        "http://127.0.0.1/git?x=1",
        "127.0.0.1/git",
        "http://127.0.0.1/g it",
    ],
)
async def test_git_url_invalid(workspaces: WorkspaceRoot, git_url: str) -> None:
    with pytest.raises(WorkspaceError, match=r"^invalid git_url "):
        await workspaces.checkout(
            job_id="job-1",
            git_url=git_url,
            repository=REPO,
            sha=SHA,
            fallback_ref=None,
            token=FAKE_TOKEN,
            timeout=CHECKOUT_TIMEOUT,
        )


# ----------------------------------------------------------------------
# The root: lock and leftovers


async def test_lock_rejects_second_owner(tmp_path: Path) -> None:
    root = tmp_path / "workspaces"
    async with WorkspaceRoot(root=root):
        second = WorkspaceRoot(root=root)
        with pytest.raises(
            WorkspaceError,
            match=r"^workspace root '.*' is locked: another ghappd holds it",
        ) as info:
            await second.open()
    assert str(root) in str(info.value)


async def test_lock_released_on_close(tmp_path: Path) -> None:
    root = tmp_path / "workspaces"
    async with WorkspaceRoot(root=root):
        pass
    async with WorkspaceRoot(root=root) as again:
        assert again.root == root


async def test_open_removes_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "workspaces"
    (root / "job-1-abcd" / "repo" / ".git").mkdir(parents=True)
    (root / "job-1-abcd" / "repo" / "file").write_text("x")
    locked = root / "job-2-ef01" / "repo" / "ro"
    locked.mkdir(parents=True)
    (locked / "file").write_text("x")
    # NOTE: as root, permissions do not block the removal, so the
    # read-only retry in _rmtree only runs when the tests run as another user.
    locked.chmod(0o500)
    (root / "stray-file").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    (root / "link").symlink_to(outside)

    async with WorkspaceRoot(root=root):
        assert entries(root) == [".lock"]
    assert (outside / "keep").exists()


async def test_checkout_requires_open(tmp_path: Path) -> None:
    root = WorkspaceRoot(root=tmp_path / "workspaces")
    with pytest.raises(
        RuntimeError,
        match=r"^WorkspaceRoot\(root='.*'\) is not open; call open\(\) first$",
    ):
        await root.checkout(
            job_id="job-1",
            git_url="http://127.0.0.1:9/git",
            repository=REPO,
            sha=SHA,
            fallback_ref=None,
            token=FAKE_TOKEN,
            timeout=CHECKOUT_TIMEOUT,
        )


async def test_checkout_missing_root_error(workspaces: WorkspaceRoot) -> None:
    shutil.rmtree(workspaces.root)
    with pytest.raises(WorkspaceError, match=r"^cannot create workspace '"):
        await workspaces.checkout(
            job_id="job-1",
            git_url="http://127.0.0.1:9/git",
            repository=REPO,
            sha=SHA,
            fallback_ref=None,
            token=FAKE_TOKEN,
            timeout=CHECKOUT_TIMEOUT,
        )


async def test_remove_rejects_outside_path(
    workspaces: WorkspaceRoot, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"^'.*' is not inside workspace root "):
        await workspaces.remove(tmp_path)


# ----------------------------------------------------------------------
# Servers that do not respond


async def test_silent_server_times_out(
    workspaces: WorkspaceRoot, nursery: trio.Nursery
) -> None:
    port = await nursery.start(hold_connections)
    with pytest.raises(
        WorkspaceError, match=rf"^checkout of '{REPO}' at {SHA} timed out after 1 s;"
    ) as info:
        await workspaces.checkout(
            job_id="job-1",
            git_url=f"http://127.0.0.1:{port}/git",
            repository=REPO,
            sha=SHA,
            fallback_ref=None,
            token=FAKE_TOKEN,
            timeout=1.0,
        )
    assert FAKE_TOKEN not in str(info.value)
    assert entries(workspaces.root) == [".lock"]


async def test_silent_server_hits_low_speed_limit(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    port = await nursery.start(hold_connections)
    async with WorkspaceRoot(root=tmp_path / "ws", low_speed_time=1) as workspaces:
        with pytest.raises(
            WorkspaceError, match=rf"^checkout of '{REPO}' failed: the transfer stalled"
        ):
            await workspaces.checkout(
                job_id="job-1",
                git_url=f"http://127.0.0.1:{port}/git",
                repository=REPO,
                sha=SHA,
                fallback_ref=None,
                token=FAKE_TOKEN,
                timeout=CHECKOUT_TIMEOUT,
            )


async def test_cancelled_checkout_removed(
    workspaces: WorkspaceRoot, nursery: trio.Nursery
) -> None:
    port = await nursery.start(hold_connections)
    with trio.move_on_after(1.0) as scope:
        await workspaces.checkout(
            job_id="job-1",
            git_url=f"http://127.0.0.1:{port}/git",
            repository=REPO,
            sha=SHA,
            fallback_ref=None,
            token=FAKE_TOKEN,
            timeout=CHECKOUT_TIMEOUT,
        )
    assert scope.cancelled_caught
    assert entries(workspaces.root) == [".lock"]


async def test_unreachable_server_error(workspaces: WorkspaceRoot) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(
        WorkspaceError, match=rf"^checkout of '{REPO}' failed: the git server could not"
    ):
        await workspaces.checkout(
            job_id="job-1",
            git_url=f"http://127.0.0.1:{port}/git",
            repository=REPO,
            sha=SHA,
            fallback_ref=None,
            token=FAKE_TOKEN,
            timeout=CHECKOUT_TIMEOUT,
        )


# ----------------------------------------------------------------------
# Against the emulator's git smart HTTP


async def test_checkout_exact_commit_depth_one(
    workspaces: WorkspaceRoot, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.create_repository(REPO, {"README.md": "one\n"})
    sha = emulator.commit(REPO, {"README.md": "two\n"})
    emulator.commit(REPO, {"README.md": "three\n"})
    token = await mint_token(emulator, app_key_pem)

    checkout = await workspaces.checkout(
        job_id="job-1",
        git_url=emulator.git_url,
        repository=REPO,
        sha=sha,
        fallback_ref=None,
        token=token,
        timeout=CHECKOUT_TIMEOUT,
    )
    assert git_output(checkout, "rev-parse", "HEAD") == sha
    assert git_output(checkout, "rev-list", "--count", "HEAD") == "1"
    assert (checkout / "README.md").read_text() == "two\n"
    symbolic = subprocess.run(
        ["git", "-C", str(checkout), "symbolic-ref", "-q", "HEAD"], check=False
    )
    assert symbolic.returncode == 1  # detached HEAD
    assert job_home(checkout).is_dir()
    assert list(job_home(checkout).iterdir()) == []
    assert job_event_path(checkout).parent == checkout.parent


async def test_checkout_leaves_no_token_on_disk(
    workspaces: WorkspaceRoot, emulator: Emulator, app_key_pem: bytes
) -> None:
    sha = emulator.create_repository(REPO, {"a.txt": "a\n"})
    token = await mint_token(emulator, app_key_pem)
    credential = base64.b64encode(f"x-access-token:{token}".encode())

    checkout = await workspaces.checkout(
        job_id="job-1",
        git_url=emulator.git_url,
        repository=REPO,
        sha=sha,
        fallback_ref=None,
        token=token,
        timeout=CHECKOUT_TIMEOUT,
    )
    files = [path for path in checkout.parent.rglob("*") if path.is_file()]
    assert checkout / ".git" / "config" in files
    for path in files:
        data = path.read_bytes()
        assert token.encode() not in data, path
        assert credential not in data, path
    assert "x-access-token" not in (checkout / ".git" / "config").read_text()


async def test_checkout_keeps_token_out_of_argv(
    tmp_path: Path, emulator: Emulator, app_key_pem: bytes
) -> None:
    argv_log = tmp_path / "argv.log"
    wrapper = tmp_path / "git-wrapper"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {argv_log}\nexec git "$@"\n')
    wrapper.chmod(0o755)
    sha = emulator.create_repository(REPO, {"a.txt": "a\n"})
    token = await mint_token(emulator, app_key_pem)

    async with WorkspaceRoot(root=tmp_path / "ws", git=str(wrapper)) as workspaces:
        await workspaces.checkout(
            job_id="job-1",
            git_url=emulator.git_url,
            repository=REPO,
            sha=sha,
            fallback_ref=None,
            token=token,
            timeout=CHECKOUT_TIMEOUT,
        )
    logged = argv_log.read_text()
    assert "fetch" in logged
    assert token not in logged


async def test_checkout_falls_back_to_pull_ref(
    workspaces: WorkspaceRoot,
    emulator: Emulator,
    app_key_pem: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.jobs.workspace")
    emulator.create_repository(REPO, {"a.txt": "base\n"})
    sha = emulator.commit(REPO, {"a.txt": "pr\n"}, branch="feature")
    emulator.pull_ref(REPO, 7, sha)
    bare_git(emulator, REPO, "update-ref", "-d", "refs/heads/feature")
    # The first upload-pack request gets the response of a server that does
    # not allow fetching unadvertised commits by sha.
    error = b"ERR upload-pack: not our ref " + sha.encode() + b"\n"
    emulator.inject(
        method="POST",
        path=f"/git/{REPO}.git/git-upload-pack",
        status=200,
        headers={"Content-Type": "application/x-git-upload-pack-result"},
        body=b"%04x" % (len(error) + 4) + error,
    )
    token = await mint_token(emulator, app_key_pem)

    checkout = await workspaces.checkout(
        job_id="job-1",
        git_url=emulator.git_url,
        repository=REPO,
        sha=sha,
        fallback_ref="refs/pull/7/head",
        token=token,
        timeout=CHECKOUT_TIMEOUT,
    )
    assert git_output(checkout, "rev-parse", "HEAD") == sha
    assert git_output(checkout, "rev-list", "--count", "HEAD") == "1"
    assert (checkout / "a.txt").read_text() == "pr\n"
    assert any("instead" in record.getMessage() for record in caplog.records)


async def test_force_pushed_commit_not_found(
    workspaces: WorkspaceRoot, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.create_repository(REPO, {"a.txt": "base\n"})
    old = emulator.commit(REPO, {"a.txt": "old\n"})
    emulator.force_push(REPO, {"a.txt": "new\n"}, branch="main")
    token = await mint_token(emulator, app_key_pem)

    with pytest.raises(CommitNotFound, match=rf"^commit {old} of 'octo-org/hello'"):
        await workspaces.checkout(
            job_id="job-1",
            git_url=emulator.git_url,
            repository=REPO,
            sha=old,
            fallback_ref=None,
            token=token,
            timeout=CHECKOUT_TIMEOUT,
        )
    assert entries(workspaces.root) == [".lock"]


async def test_force_pushed_pull_ref_moved(
    workspaces: WorkspaceRoot, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.create_repository(REPO, {"a.txt": "base\n"})
    old = emulator.commit(REPO, {"a.txt": "old\n"}, branch="feature")
    emulator.pull_ref(REPO, 3, old)
    emulator.force_push(REPO, {"a.txt": "new\n"}, branch="feature")
    token = await mint_token(emulator, app_key_pem)

    with pytest.raises(
        CommitNotFound, match=r"^'refs/pull/3/head' of 'octo-org/hello'"
    ):
        await workspaces.checkout(
            job_id="job-1",
            git_url=emulator.git_url,
            repository=REPO,
            sha=old,
            fallback_ref="refs/pull/3/head",
            token=token,
            timeout=CHECKOUT_TIMEOUT,
        )


async def test_missing_pull_ref_not_found(
    workspaces: WorkspaceRoot, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.create_repository(REPO, {"a.txt": "base\n"})
    token = await mint_token(emulator, app_key_pem)

    with pytest.raises(
        CommitNotFound,
        match=rf"^commit {SHA} of '{REPO}' is not on the server and 'refs/pull/9/head'",
    ):
        await workspaces.checkout(
            job_id="job-1",
            git_url=emulator.git_url,
            repository=REPO,
            sha=SHA,
            fallback_ref="refs/pull/9/head",
            token=token,
            timeout=CHECKOUT_TIMEOUT,
        )


async def test_bad_token_rejected(
    workspaces: WorkspaceRoot, emulator: Emulator
) -> None:
    sha = emulator.create_repository(REPO, {"a.txt": "a\n"})
    credential = base64.b64encode(f"x-access-token:{FAKE_TOKEN}".encode()).decode()

    with pytest.raises(
        WorkspaceError, match=rf"^checkout of '{REPO}' failed: the server rejected the"
    ) as info:
        await workspaces.checkout(
            job_id="job-1",
            git_url=emulator.git_url,
            repository=REPO,
            sha=sha,
            fallback_ref=None,
            token=FAKE_TOKEN,
            timeout=CHECKOUT_TIMEOUT,
        )
    assert not isinstance(info.value, CommitNotFound)
    assert FAKE_TOKEN not in str(info.value)
    assert credential not in str(info.value)
    assert entries(workspaces.root) == [".lock"]


async def test_unknown_repository_not_found(
    workspaces: WorkspaceRoot, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.create_repository(REPO, {"a.txt": "a\n"})
    token = await mint_token(emulator, app_key_pem)

    with pytest.raises(
        WorkspaceError,
        match=r"^checkout of 'octo-org/missing' failed: the repository was not",
    ) as info:
        await workspaces.checkout(
            job_id="job-1",
            git_url=emulator.git_url,
            repository="octo-org/missing",
            sha=SHA,
            fallback_ref=None,
            token=token,
            timeout=CHECKOUT_TIMEOUT,
        )
    assert token not in str(info.value)


async def test_workspace_removed_when_body_raises(
    workspaces: WorkspaceRoot, emulator: Emulator, app_key_pem: bytes
) -> None:
    sha = emulator.create_repository(REPO, {"a.txt": "a\n"})
    token = await mint_token(emulator, app_key_pem)
    seen: list[Path] = []

    with pytest.raises(KeyError, match=r"^'body failed'$"):
        async with workspaces.workspace(
            job_id="job-1",
            git_url=emulator.git_url,
            repository=REPO,
            sha=sha,
            fallback_ref=None,
            token=token,
            timeout=CHECKOUT_TIMEOUT,
        ) as checkout:
            seen.append(checkout)
            assert (checkout / "a.txt").exists()
            raise KeyError("body failed")
    assert len(seen) == 1
    assert not seen[0].parent.exists()
    assert entries(workspaces.root) == [".lock"]


async def test_workspace_removed_when_cancelled(
    workspaces: WorkspaceRoot, emulator: Emulator, app_key_pem: bytes
) -> None:
    sha = emulator.create_repository(REPO, {"a.txt": "a\n"})
    token = await mint_token(emulator, app_key_pem)
    seen: list[Path] = []

    with trio.CancelScope() as scope:
        async with workspaces.workspace(
            job_id="job-1",
            git_url=emulator.git_url,
            repository=REPO,
            sha=sha,
            fallback_ref=None,
            token=token,
            timeout=CHECKOUT_TIMEOUT,
        ) as checkout:
            seen.append(checkout)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert len(seen) == 1
    assert not seen[0].parent.exists()


async def test_two_checkouts_get_own_directories(
    workspaces: WorkspaceRoot, emulator: Emulator, app_key_pem: bytes
) -> None:
    sha = emulator.create_repository(REPO, {"a.txt": "a\n"})
    token = await mint_token(emulator, app_key_pem)
    checkouts = [
        await workspaces.checkout(
            job_id="job-1",
            git_url=emulator.git_url,
            repository=REPO,
            sha=sha,
            fallback_ref=None,
            token=token,
            timeout=CHECKOUT_TIMEOUT,
        )
        for _ in range(2)
    ]
    assert checkouts[0] != checkouts[1]
    await workspaces.remove(checkouts[0])
    assert not checkouts[0].parent.exists()
    assert checkouts[1].exists()
