"""The GitHub emulator, driven by real clients: httpx for REST, git for fetches."""

from __future__ import annotations

import base64
import email.utils
import functools
import gzip
import hashlib
import hmac
import json
import os
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypercorn.trio
import jwt
import pytest
import quart
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypercorn.config import Config
from quart_trio import QuartTrio

from daemon.sandbox import Emulator, generate_app_key
from daemon.sandbox.payloads import pull_request_opened

APP_ID = 4242
INSTALLATION_ID = 1001
REPO = "octo-org/hello"


@functools.cache
def signing_key(pem: bytes) -> rsa.RSAPrivateKey:
    # Loading a PEM checks the RSA key, which takes tens of milliseconds.
    key = serialization.load_pem_private_key(
        pem, password=None, unsafe_skip_rsa_key_validation=True
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def app_jwt(key: bytes, *, now: float | None = None, **claims: Any) -> str:
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {"iat": issued - 60, "exp": issued + 540, "iss": APP_ID}
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    # PyJWT's encode() only takes a string "iss"; GitHub takes the App id as
    # a number too, so the claims are signed as raw JSON.
    return jwt.PyJWS().encode(
        json.dumps(payload).encode(), signing_key(key), algorithm="RS256"
    )


def jwt_headers(key: bytes, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {app_jwt(key, **claims)}"}


def token_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


async def mint(
    client: httpx.AsyncClient, key: bytes, body: dict[str, Any] | None = None
) -> str:
    response = await client.post(
        f"/app/installations/{INSTALLATION_ID}/access_tokens",
        headers=jwt_headers(key),
        json=body,
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


@pytest.fixture
async def client(emulator: Emulator) -> Any:
    async with httpx.AsyncClient(base_url=emulator.api_url) as http:
        yield http


@pytest.fixture
def head(emulator: Emulator) -> str:
    return emulator.create_repository(REPO, {"README.md": "hello\n"})


def git_fetch(
    emulator: Emulator, workdir: Path, sha: str, token: str | None, repo: str = REPO
) -> subprocess.CompletedProcess[str]:
    """Fetch ``sha`` at depth 1 with the token given through git's environment."""
    subprocess.run(
        ["git", "init", "--quiet", str(workdir)], check=True, capture_output=True
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(workdir),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_COUNT": "0",
    }
    if token is not None:
        basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
        env.update(
            {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
            }
        )
    url = f"{emulator.git_url}/{repo}.git"
    return subprocess.run(
        ["git", "-C", str(workdir), "fetch", "--quiet", "--depth", "1", url, sha],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


async def fetch(
    emulator: Emulator, workdir: Path, sha: str, token: str | None, repo: str = REPO
) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(git_fetch, emulator, workdir, sha, token, repo)


# ----------------------------------------------------------------------
# App JWT


async def test_get_app_with_jwt(client: httpx.AsyncClient, app_key_pem: bytes) -> None:
    response = await client.get("/app", headers=jwt_headers(app_key_pem))
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == APP_ID
    assert body["slug"] == "ghappd-sandbox"
    assert "date" in response.headers


async def test_get_app_accepts_string_issuer(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    response = await client.get("/app", headers=jwt_headers(app_key_pem, iss="4242"))
    assert response.status_code == 200


async def test_get_app_rejects_other_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/app", headers=jwt_headers(generate_app_key()))
    assert response.status_code == 401
    assert response.json()["message"] == "A JSON web token could not be decoded"


async def test_get_app_rejects_expired_jwt(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    past = time.time() - 3600
    response = await client.get("/app", headers=jwt_headers(app_key_pem, now=past))
    assert response.status_code == 401
    assert response.json()["message"].startswith("'Expiration time' claim ('exp')")
    assert "documentation_url" in response.json()


async def test_get_app_rejects_future_iat(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    soon = int(time.time()) + 300
    headers = jwt_headers(app_key_pem, iat=soon, exp=soon + 300)
    response = await client.get("/app", headers=headers)
    assert response.status_code == 401
    assert response.json()["message"].startswith("'Issued at' claim ('iat')")


async def test_get_app_rejects_long_lived_jwt(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    now = int(time.time())
    headers = jwt_headers(app_key_pem, iat=now - 60, exp=now + 700)
    response = await client.get("/app", headers=headers)
    assert response.status_code == 401
    assert response.json()["message"].endswith("is too far in the future")


async def test_get_app_accepts_documented_claims(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    # iat 60 s back and exp 10 minutes ahead, as GitHub's documentation
    # example sets them.
    now = int(time.time())
    headers = jwt_headers(app_key_pem, iat=now - 60, exp=now + 600)
    response = await client.get("/app", headers=headers)
    assert response.status_code == 200


async def test_get_app_rejects_wrong_issuer(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    response = await client.get("/app", headers=jwt_headers(app_key_pem, iss=1))
    assert response.status_code == 401
    assert response.json()["message"] == "Integration not found"


async def test_get_app_accepts_client_id_issuer(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    headers = jwt_headers(app_key_pem, iss=emulator.client_id)
    response = await client.get("/app", headers=headers)
    assert response.status_code == 200
    assert response.json()["client_id"] == emulator.client_id


async def test_get_app_without_auth(client: httpx.AsyncClient) -> None:
    response = await client.get("/app")
    assert response.status_code == 401


# ----------------------------------------------------------------------
# Installation tokens


async def test_token_minted(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    response = await client.post(
        f"/app/installations/{INSTALLATION_ID}/access_tokens",
        headers=jwt_headers(app_key_pem),
    )
    assert response.status_code == 201
    body = response.json()
    assert body["token"].startswith("ghs_")
    assert len(body["token"]) > 40
    assert body["expires_at"].endswith("Z")
    assert body["repository_selection"] == "all"
    assert body["permissions"]["checks"] == "write"


async def test_token_for_unknown_installation(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    response = await client.post(
        "/app/installations/999/access_tokens", headers=jwt_headers(app_key_pem)
    )
    assert response.status_code == 404


async def test_token_records_installation(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)
    response = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    assert response.status_code == 200
    assert emulator.requests[-1].installation_id == INSTALLATION_ID
    assert emulator.requests[-1].path == f"/repos/{REPO}"


async def test_token_revoked_is_bad_credentials(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)
    emulator.revoke_token(token)
    response = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    assert response.status_code == 401
    assert response.json()["message"] == "Bad credentials"


async def test_token_expired_is_bad_credentials(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)
    emulator.clock_offset = emulator.token_ttl + 1
    response = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    assert response.status_code == 401


# ----------------------------------------------------------------------
# Check runs


async def test_check_run_lifecycle(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    headers = token_headers(await mint(client, app_key_pem))
    created = await client.post(
        f"/repos/{REPO}/check-runs",
        headers=headers,
        json={
            "name": "lint",
            "head_sha": head,
            "status": "queued",
            "external_id": "d1:lint",
        },
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    assert created.json()["status"] == "queued"

    annotation = {
        "path": "a.py",
        "start_line": 1,
        "end_line": 1,
        "annotation_level": "failure",
        "message": "E501",
    }
    updated = await client.patch(
        f"/repos/{REPO}/check-runs/{run_id}",
        headers=headers,
        json={
            "conclusion": "failure",
            "output": {
                "title": "lint",
                "summary": "1 error",
                "annotations": [annotation],
            },
        },
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["status"] == "completed"
    assert updated.json()["completed_at"] is not None
    assert "annotations" not in updated.json()
    assert emulator.check_runs[run_id]["annotations"] == [annotation]
    assert emulator.check_runs[run_id]["external_id"] == "d1:lint"

    fetched = await client.get(f"/repos/{REPO}/check-runs/{run_id}", headers=headers)
    assert fetched.json()["output"]["annotations_count"] == 1

    listed = await client.get(
        f"/repos/{REPO}/commits/{head}/check-runs", headers=headers
    )
    assert listed.json()["total_count"] == 1
    assert listed.json()["check_runs"][0]["id"] == run_id


# ----------------------------------------------------------------------
# git smart HTTP


async def test_git_fetch_exact_commit(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, tmp_path: Path
) -> None:
    first = emulator.create_repository(REPO, {"README.md": "one\n"})
    second = emulator.commit(REPO, {"src/app.py": "print(1)\n"})
    token = await mint(client, app_key_pem)

    result = await fetch(emulator, tmp_path / "work", first, token)
    assert result.returncode == 0, result.stderr
    shown = subprocess.run(
        ["git", "-C", str(tmp_path / "work"), "cat-file", "-p", f"{first}:README.md"],
        capture_output=True,
        text=True,
    )
    assert shown.stdout == "one\n"
    assert second != first


async def test_git_fetch_without_token(
    emulator: Emulator, head: str, tmp_path: Path
) -> None:
    result = await fetch(emulator, tmp_path / "work", head, None)
    assert result.returncode != 0


async def test_git_fetch_wrong_token(
    emulator: Emulator, head: str, tmp_path: Path
) -> None:
    result = await fetch(emulator, tmp_path / "work", head, "ghs_" + "x" * 60)
    assert result.returncode != 0


async def test_git_fetch_revoked_token(
    client: httpx.AsyncClient,
    emulator: Emulator,
    app_key_pem: bytes,
    head: str,
    tmp_path: Path,
) -> None:
    token = await mint(client, app_key_pem)
    emulator.revoke_token(token)
    result = await fetch(emulator, tmp_path / "work", head, token)
    assert result.returncode != 0


async def test_git_fetch_expired_token(
    client: httpx.AsyncClient,
    emulator: Emulator,
    app_key_pem: bytes,
    head: str,
    tmp_path: Path,
) -> None:
    token = await mint(client, app_key_pem)
    emulator.clock_offset = emulator.token_ttl + 1
    result = await fetch(emulator, tmp_path / "work", head, token)
    assert result.returncode != 0


async def test_git_unauthenticated_challenge(
    client: httpx.AsyncClient, head: str
) -> None:
    response = await client.get(
        f"/git/{REPO}.git/info/refs", params={"service": "git-upload-pack"}
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="GitHub"'


async def test_git_fetch_other_repository_token(
    client: httpx.AsyncClient,
    emulator: Emulator,
    app_key_pem: bytes,
    head: str,
    tmp_path: Path,
) -> None:
    other = emulator.create_repository("octo-org/other", {"x": "y"})
    token = await mint(client, app_key_pem, {"repositories": ["other"]})
    refused = await fetch(emulator, tmp_path / "a", head, token)
    assert refused.returncode != 0
    allowed = await fetch(emulator, tmp_path / "b", other, token, "octo-org/other")
    assert allowed.returncode == 0, allowed.stderr


async def test_git_fetch_suspended_installation(
    client: httpx.AsyncClient,
    emulator: Emulator,
    app_key_pem: bytes,
    head: str,
    tmp_path: Path,
) -> None:
    token = await mint(client, app_key_pem)
    emulator.suspend(INSTALLATION_ID)
    result = await fetch(emulator, tmp_path / "work", head, token)
    assert result.returncode != 0


async def test_git_fetch_force_pushed_commit_fails(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, tmp_path: Path
) -> None:
    emulator.create_repository(REPO, {"README.md": "one\n"})
    old = emulator.commit(REPO, {"a.txt": "old\n"}, branch="feature")
    emulator.pull_ref(REPO, 7, old)
    new = emulator.force_push(REPO, {"a.txt": "new\n"}, branch="feature")
    token = await mint(client, app_key_pem)

    gone = await fetch(emulator, tmp_path / "a", old, token)
    assert gone.returncode != 0
    fetched = await fetch(emulator, tmp_path / "b", new, token)
    assert fetched.returncode == 0, fetched.stderr
    assert emulator.resolve(REPO, "refs/pull/7/head") == new


async def test_git_fetch_pull_ref(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, tmp_path: Path
) -> None:
    base = emulator.create_repository(REPO, {"README.md": "one\n"})
    pr_head = emulator.commit(REPO, {"b.txt": "pr\n"}, branch="topic")
    emulator.pull_ref(REPO, 3, pr_head)
    token = await mint(client, app_key_pem)
    result = await fetch(emulator, tmp_path / "work", "refs/pull/3/head", token)
    assert result.returncode == 0, result.stderr
    fetched = subprocess.run(
        ["git", "-C", str(tmp_path / "work"), "rev-parse", "FETCH_HEAD"],
        capture_output=True,
        text=True,
    )
    assert fetched.stdout.strip() == pr_head
    assert base != pr_head


async def test_git_push_rejected(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    response = await client.get(
        f"/git/{REPO}.git/info/refs",
        params={"service": "git-receive-pack"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert response.status_code == 403


async def test_git_upload_pack_gzip_body(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    # A protocol v2 ls-refs request in pkt-line framing (gitprotocol-v2(5)).
    lines = [b"command=ls-refs\n", b"object-format=sha1\n"]
    framed = b"".join(b"%04x" % (len(line) + 4) + line for line in lines)
    body = framed + b"0001" + b"0000"
    response = await client.post(
        f"/git/{REPO}.git/git-upload-pack",
        content=gzip.compress(body),
        headers={
            "Authorization": f"Basic {basic}",
            "Content-Type": "application/x-git-upload-pack-request",
            "Content-Encoding": "gzip",
            "Git-Protocol": "version=2",
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-git-upload-pack-result"
    assert f"{head} refs/heads/main".encode() in response.content


async def test_git_unknown_repository(
    client: httpx.AsyncClient, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    response = await client.get(
        "/git/octo-org/missing.git/info/refs",
        params={"service": "git-upload-pack"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert response.status_code == 404


# ----------------------------------------------------------------------
# Repository helpers


async def test_commit_keeps_other_files(emulator: Emulator) -> None:
    emulator.create_repository(REPO, {"a.txt": "a\n", "dir/b.txt": "b\n"})
    sha = emulator.commit(REPO, {"a.txt": "changed\n"})
    listing = emulator.store.git(REPO, "ls-tree", "-r", "--name-only", sha)
    assert listing.splitlines() == ["a.txt", "dir/b.txt"]
    assert emulator.store.git(REPO, "show", f"{sha}:a.txt") == "changed"


async def test_force_push_prunes_old_commit(emulator: Emulator) -> None:
    emulator.create_repository(REPO, {"a.txt": "a\n"})
    old = emulator.commit(REPO, {"a.txt": "b\n"})
    new = emulator.force_push(REPO, {"a.txt": "c\n"}, branch="main")
    assert new != old
    assert emulator.resolve(REPO, old) is None
    assert emulator.resolve(REPO, "main") == new


async def test_create_repository_rejects_bad_name(emulator: Emulator) -> None:
    with pytest.raises(ValueError, match=r"^invalid repository name '\.\./x'"):
        emulator.create_repository("../x", {"a": "b"})


async def test_create_repository_rejects_bad_path(emulator: Emulator) -> None:
    with pytest.raises(ValueError, match=r"^invalid file path '\.\./a'"):
        emulator.create_repository(REPO, {"../a": "b"})


# ----------------------------------------------------------------------
# Token scope and installation state


async def test_token_scoped_to_repository(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    emulator.create_repository("octo-org/other", {"x": "y"})
    response = await client.post(
        f"/app/installations/{INSTALLATION_ID}/access_tokens",
        headers=jwt_headers(app_key_pem),
        json={"repositories": ["other"]},
    )
    body = response.json()
    assert body["repository_selection"] == "selected"
    assert [repo["full_name"] for repo in body["repositories"]] == ["octo-org/other"]
    denied = await client.get(f"/repos/{REPO}", headers=token_headers(body["token"]))
    assert denied.status_code == 403


async def test_token_scoped_by_repository_id(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    repo_id = emulator.repositories[REPO]["id"]
    token = await mint(client, app_key_pem, {"repository_ids": [repo_id]})
    response = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    assert response.status_code == 200


async def test_token_repository_not_installed(
    client: httpx.AsyncClient, app_key_pem: bytes, head: str
) -> None:
    response = await client.post(
        f"/app/installations/{INSTALLATION_ID}/access_tokens",
        headers=jwt_headers(app_key_pem),
        json={"repositories": ["missing"]},
    )
    assert response.status_code == 422
    assert "not accessible to the parent installation" in response.json()["message"]


async def test_token_permission_not_granted(
    client: httpx.AsyncClient, app_key_pem: bytes, head: str
) -> None:
    response = await client.post(
        f"/app/installations/{INSTALLATION_ID}/access_tokens",
        headers=jwt_headers(app_key_pem),
        json={"permissions": {"contents": "write"}},
    )
    assert response.status_code == 422
    assert "permissions requested are not granted" in response.json()["message"]


async def test_token_narrowed_permissions(
    client: httpx.AsyncClient, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem, {"permissions": {"contents": "read"}})
    response = await client.post(
        f"/repos/{REPO}/check-runs",
        headers=token_headers(token),
        json={"name": "lint", "head_sha": head},
    )
    assert response.status_code == 403
    assert response.json()["message"] == "Resource not accessible by integration"


async def test_selected_installation_scope(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    emulator.create_repository("octo-org/other", {"x": "y"})
    emulator.uninstall(INSTALLATION_ID)
    emulator.add_installation(
        INSTALLATION_ID, account="octo-org", repositories=["octo-org/other"]
    )
    token = await mint(client, app_key_pem)
    denied = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    assert denied.status_code == 403
    allowed = await client.get("/repos/octo-org/other", headers=token_headers(token))
    assert allowed.status_code == 200


async def test_suspended_installation(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)
    emulator.suspend(INSTALLATION_ID)
    minted = await client.post(
        f"/app/installations/{INSTALLATION_ID}/access_tokens",
        headers=jwt_headers(app_key_pem),
    )
    assert minted.status_code == 403
    assert minted.json()["message"] == "This installation has been suspended"
    used = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    assert used.status_code == 403
    emulator.unsuspend(INSTALLATION_ID)
    again = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    assert again.status_code == 200


async def test_uninstalled_installation(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)
    emulator.uninstall(INSTALLATION_ID)
    minted = await client.post(
        f"/app/installations/{INSTALLATION_ID}/access_tokens",
        headers=jwt_headers(app_key_pem),
    )
    assert minted.status_code == 404
    used = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    assert used.status_code == 401


async def test_token_ttl_sets_expiry(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    emulator.token_ttl = 0
    token = await mint(client, app_key_pem)
    response = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    assert response.status_code == 401


async def test_jwt_rejected_as_token(
    client: httpx.AsyncClient, app_key_pem: bytes, head: str
) -> None:
    response = await client.get(f"/repos/{REPO}", headers=jwt_headers(app_key_pem))
    assert response.status_code == 401
    assert response.json()["message"] == "Bad credentials"


async def test_token_rejected_as_jwt(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    token = await mint(client, app_key_pem)
    response = await client.get("/app", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401


# ----------------------------------------------------------------------
# Clock offset


async def test_clock_offset_moves_date_header(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.clock_offset = 7200
    response = await client.get("/app", headers=jwt_headers(app_key_pem))
    served = email.utils.parsedate_to_datetime(response.headers["date"]).timestamp()
    assert served > time.time() + 3600


async def test_clock_offset_rejects_unadjusted_jwt(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.clock_offset = 7200
    rejected = await client.get("/app", headers=jwt_headers(app_key_pem))
    assert rejected.status_code == 401
    assert rejected.json()["message"].startswith("'Expiration time' claim")
    served = email.utils.parsedate_to_datetime(rejected.headers["date"]).timestamp()
    adjusted = await client.get("/app", headers=jwt_headers(app_key_pem, now=served))
    assert adjusted.status_code == 200


# ----------------------------------------------------------------------
# Injected faults


async def test_inject_answers_next_requests(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.inject(method="GET", path="/app", status=502, times=2)
    statuses = [
        (await client.get("/app", headers=jwt_headers(app_key_pem))).status_code
        for _ in range(3)
    ]
    assert statuses == [502, 502, 200]
    assert [request.status for request in emulator.requests] == [502, 502, 200]


async def test_inject_headers_and_body(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.inject(
        method="POST",
        path="/app/installations/*/access_tokens",
        status=403,
        headers={"Retry-After": "30", "x-ratelimit-remaining": "0"},
        body={"message": "API rate limit exceeded"},
    )
    response = await client.post(
        f"/app/installations/{INSTALLATION_ID}/access_tokens",
        headers=jwt_headers(app_key_pem),
    )
    assert response.status_code == 403
    assert response.headers["retry-after"] == "30"
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert response.json() == {"message": "API rate limit exceeded"}
    assert "date" in response.headers


async def test_inject_matches_method(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.inject(method="POST", path="/app", status=500)
    response = await client.get("/app", headers=jwt_headers(app_key_pem))
    assert response.status_code == 200
    assert len(emulator.faults) == 1


async def test_inject_delay(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.inject(method="*", path="/app", status=503, delay=0.01)
    response = await client.get("/app", headers=jwt_headers(app_key_pem))
    assert response.status_code == 503
    assert response.json()["message"] == "Service Unavailable"


async def test_inject_times_must_be_positive(emulator: Emulator) -> None:
    with pytest.raises(ValueError, match=r"^invalid times 0: must be >= 1$"):
        emulator.inject(method="GET", path="/app", status=500, times=0)


async def test_unknown_path_not_found(client: httpx.AsyncClient) -> None:
    response = await client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["message"] == "Not Found"


# ----------------------------------------------------------------------
# Check run validation and listing


def annotation(line: int = 1, **changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "path": "a.py",
        "start_line": line,
        "end_line": line,
        "annotation_level": "warning",
        "message": "unused import",
    }
    item.update(changes)
    return {key: value for key, value in item.items() if value is not None}


async def create_run(
    client: httpx.AsyncClient, token: str, body: dict[str, Any]
) -> httpx.Response:
    return await client.post(
        f"/repos/{REPO}/check-runs", headers=token_headers(token), json=body
    )


@pytest.fixture
async def token(client: httpx.AsyncClient, app_key_pem: bytes, head: str) -> str:
    return await mint(client, app_key_pem)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"head_sha": "HEAD"}, "'name' wasn't supplied"),
        ({"name": "lint", "status": "completed"}, "'conclusion' is required"),
        ({"name": "lint", "status": "sleeping"}, "'status' 'sleeping' is not one of"),
        ({"name": "lint", "conclusion": "great"}, "'conclusion' 'great' is not one"),
        (
            {"name": "lint", "output": {"title": "t"}},
            "missing the required key 'summary'",
        ),
        (
            {"name": "lint", "output": {"title": "t", "summary": "s" * 65536}},
            "'summary' is 65536 characters long",
        ),
        (
            {
                "name": "lint",
                "output": {"title": "t", "summary": "s", "text": "x" * 65536},
            },
            "'text' is 65536 characters long",
        ),
        (
            {
                "name": "lint",
                "output": {
                    "title": "t",
                    "summary": "s",
                    "annotations": [annotation(i) for i in range(1, 52)],
                },
            },
            "'output.annotations' has 51 items",
        ),
        (
            {
                "name": "lint",
                "output": {
                    "title": "t",
                    "summary": "s",
                    "annotations": [annotation(annotation_level="error")],
                },
            },
            "annotation_level must be one of notice, warning, failure",
        ),
        (
            {
                "name": "lint",
                "output": {
                    "title": "t",
                    "summary": "s",
                    "annotations": [annotation(path=None)],
                },
            },
            "missing the required key 'path'",
        ),
        (
            {
                "name": "lint",
                "output": {
                    "title": "t",
                    "summary": "s",
                    "annotations": [annotation(end_line=3, start_column=1)],
                },
            },
            "start_column and end_column are only allowed",
        ),
    ],
)
async def test_check_run_invalid(
    client: httpx.AsyncClient,
    emulator: Emulator,
    token: str,
    head: str,
    body: dict[str, Any],
    detail: str,
) -> None:
    body.setdefault("head_sha", head)
    response = await create_run(client, token, body)
    assert response.status_code == 422
    assert response.json()["message"].startswith("Invalid request.")
    assert detail in response.json()["message"]
    assert emulator.check_runs == {}


async def test_check_run_fifty_annotations_allowed(
    client: httpx.AsyncClient, emulator: Emulator, token: str, head: str
) -> None:
    items = [annotation(i) for i in range(1, 51)]
    response = await create_run(
        client,
        token,
        {
            "name": "lint",
            "head_sha": head,
            "output": {"title": "t", "summary": "s", "annotations": items},
        },
    )
    assert response.status_code == 201
    assert response.json()["output"]["annotations_count"] == 50


async def test_check_run_unknown_commit(
    client: httpx.AsyncClient, token: str, head: str
) -> None:
    response = await create_run(client, token, {"name": "lint", "head_sha": "0" * 40})
    assert response.status_code == 422
    assert response.json()["message"] == f"No commit found for SHA: {'0' * 40}"


async def test_check_run_annotations_accumulate(
    client: httpx.AsyncClient, emulator: Emulator, token: str, head: str
) -> None:
    created = await create_run(client, token, {"name": "lint", "head_sha": head})
    run_id = created.json()["id"]
    for batch in range(2):
        output = {"title": "t", "summary": "s", "annotations": [annotation(batch + 1)]}
        response = await client.patch(
            f"/repos/{REPO}/check-runs/{run_id}",
            headers=token_headers(token),
            json={"output": output},
        )
        assert response.status_code == 200
    assert [
        item["start_line"] for item in emulator.check_runs[run_id]["annotations"]
    ] == [
        1,
        2,
    ]
    listed = await client.get(
        f"/repos/{REPO}/check-runs/{run_id}/annotations", headers=token_headers(token)
    )
    assert len(listed.json()) == 2


async def test_check_run_in_other_repository(
    client: httpx.AsyncClient, emulator: Emulator, token: str, head: str
) -> None:
    emulator.create_repository("octo-org/other", {"x": "y"})
    created = await create_run(client, token, {"name": "lint", "head_sha": head})
    run_id = created.json()["id"]
    response = await client.get(
        f"/repos/octo-org/other/check-runs/{run_id}", headers=token_headers(token)
    )
    assert response.status_code == 404


async def test_check_run_list_filters(
    client: httpx.AsyncClient, emulator: Emulator, token: str, head: str
) -> None:
    first = (await create_run(client, token, {"name": "lint", "head_sha": head})).json()
    second = (
        await create_run(client, token, {"name": "lint", "head_sha": head})
    ).json()
    tests = (
        await create_run(
            client,
            token,
            {"name": "tests", "head_sha": head, "status": "in_progress"},
        )
    ).json()

    async def listed(**params: Any) -> list[int]:
        response = await client.get(
            f"/repos/{REPO}/commits/main/check-runs",
            headers=token_headers(token),
            params=params,
        )
        assert response.status_code == 200
        body = response.json()
        assert body["total_count"] >= len(body["check_runs"])
        return [run["id"] for run in body["check_runs"]]

    assert await listed() == [tests["id"], second["id"]]
    assert await listed(filter="all") == [tests["id"], second["id"], first["id"]]
    assert await listed(check_name="lint", filter="all") == [second["id"], first["id"]]
    assert await listed(status="in_progress") == [tests["id"]]
    assert await listed(filter="all", per_page=1, page=2) == [second["id"]]


async def test_check_run_list_unknown_ref(
    client: httpx.AsyncClient, token: str, head: str
) -> None:
    response = await client.get(
        f"/repos/{REPO}/commits/nope/check-runs", headers=token_headers(token)
    )
    assert response.status_code == 422


async def test_check_run_completed_at_given(
    client: httpx.AsyncClient, token: str, head: str
) -> None:
    response = await create_run(
        client,
        token,
        {
            "name": "lint",
            "head_sha": head,
            "conclusion": "success",
            "completed_at": "2026-01-02T03:04:05+00:00",
        },
    )
    assert response.status_code == 201
    assert response.json()["status"] == "completed"
    assert response.json()["completed_at"] == "2026-01-02T03:04:05Z"


# ----------------------------------------------------------------------
# Comments and reviews


async def test_comment_create_list_update(
    client: httpx.AsyncClient, emulator: Emulator, token: str
) -> None:
    headers = token_headers(token)
    created = await client.post(
        f"/repos/{REPO}/issues/2/comments", headers=headers, json={"body": "first"}
    )
    assert created.status_code == 201
    comment_id = created.json()["id"]
    assert created.json()["user"]["login"] == "ghappd-sandbox[bot]"

    updated = await client.patch(
        f"/repos/{REPO}/issues/comments/{comment_id}",
        headers=headers,
        json={"body": "edited"},
    )
    assert updated.status_code == 200
    assert emulator.comments[comment_id]["body"] == "edited"

    listed = await client.get(f"/repos/{REPO}/issues/2/comments", headers=headers)
    assert [item["body"] for item in listed.json()] == ["edited"]
    other = await client.get(f"/repos/{REPO}/issues/3/comments", headers=headers)
    assert other.json() == []


async def test_comment_requires_body(client: httpx.AsyncClient, token: str) -> None:
    response = await client.post(
        f"/repos/{REPO}/issues/2/comments", headers=token_headers(token), json={}
    )
    assert response.status_code == 422


async def test_comment_too_long(client: httpx.AsyncClient, token: str) -> None:
    response = await client.post(
        f"/repos/{REPO}/issues/2/comments",
        headers=token_headers(token),
        json={"body": "x" * 65537},
    )
    assert response.status_code == 422
    assert response.json()["message"] == "Validation Failed"


async def test_comment_update_unknown(client: httpx.AsyncClient, token: str) -> None:
    response = await client.patch(
        f"/repos/{REPO}/issues/comments/999999",
        headers=token_headers(token),
        json={"body": "x"},
    )
    assert response.status_code == 404


async def test_comment_with_pull_requests_permission(
    client: httpx.AsyncClient, app_key_pem: bytes, head: str
) -> None:
    narrowed = await mint(
        client, app_key_pem, {"permissions": {"pull_requests": "write"}}
    )
    response = await client.post(
        f"/repos/{REPO}/issues/2/comments",
        headers=token_headers(narrowed),
        json={"body": "hi"},
    )
    assert response.status_code == 201


async def test_review_with_comments(
    client: httpx.AsyncClient, emulator: Emulator, token: str, head: str
) -> None:
    inline = {"path": "README.md", "line": 1, "body": "typo"}
    response = await client.post(
        f"/repos/{REPO}/pulls/2/reviews",
        headers=token_headers(token),
        json={
            "commit_id": head,
            "event": "REQUEST_CHANGES",
            "body": "see inline",
            "comments": [inline],
        },
    )
    assert response.status_code == 200
    assert response.json()["state"] == "CHANGES_REQUESTED"
    assert emulator.reviews[0]["comments"] == [inline]
    assert emulator.reviews[0]["commit_id"] == head


@pytest.mark.parametrize(
    "body",
    [
        {"event": "REQUEST_CHANGES"},
        {"event": "MERGE", "body": "x"},
        {"event": "COMMENT", "body": "x", "comments": [{"path": "a", "body": "b"}]},
        {"event": "APPROVE", "commit_id": "0" * 40},
    ],
)
async def test_review_invalid(
    client: httpx.AsyncClient, emulator: Emulator, token: str, body: dict[str, Any]
) -> None:
    response = await client.post(
        f"/repos/{REPO}/pulls/2/reviews", headers=token_headers(token), json=body
    )
    assert response.status_code == 422
    assert emulator.reviews == []


# ----------------------------------------------------------------------
# Hook deliveries


def add_deliveries(emulator: Emulator, count: int) -> list[int]:
    return [
        emulator.add_hook_delivery(
            guid=f"guid-{index}",
            event="pull_request",
            action="opened",
            installation_id=INSTALLATION_ID,
            status_code=502,
            payload={"action": "opened", "number": index},
            delivered_at=1_700_000_000 + index,
        )
        for index in range(count)
    ]


async def test_deliveries_paginate_newest_first(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    ids = add_deliveries(emulator, 3)
    first = await client.get(
        "/app/hook/deliveries", headers=jwt_headers(app_key_pem), params={"per_page": 2}
    )
    assert first.status_code == 200
    assert [item["id"] for item in first.json()] == [ids[2], ids[1]]
    assert first.json()[0]["status_code"] == 502
    next_url = first.links["next"]["url"]
    second = await client.get(next_url, headers=jwt_headers(app_key_pem))
    assert [item["id"] for item in second.json()] == [ids[0]]
    assert "link" not in second.headers


async def test_deliveries_require_jwt(client: httpx.AsyncClient) -> None:
    response = await client.get("/app/hook/deliveries")
    assert response.status_code == 401


@pytest.fixture
async def receiver(
    nursery: trio.Nursery,
) -> tuple[str, list[tuple[dict[str, str], bytes]]]:
    """A webhook receiver on 127.0.0.1 that records what it gets."""
    received: list[tuple[dict[str, str], bytes]] = []
    app = QuartTrio("receiver")

    @app.post("/webhooks/github")
    async def hook() -> tuple[str, int]:
        headers = {name.lower(): value for name, value in quart.request.headers.items()}
        received.append((headers, await quart.request.get_data(True, False, False)))
        return "", 202

    config = Config()
    config.bind = ["127.0.0.1:0"]
    binds = await nursery.start(partial(hypercorn.trio.serve, app, config))
    return f"{binds[0]}/webhooks/github", received


async def test_redelivery_resends_signed_payload(
    client: httpx.AsyncClient,
    emulator: Emulator,
    app_key_pem: bytes,
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, received = receiver
    emulator.webhook_url = url
    emulator.webhook_secret = b"s3cret"
    payload = {"action": "opened", "number": 2}
    delivery_id = emulator.add_hook_delivery(
        guid="abc-123",
        event="pull_request",
        action="opened",
        installation_id=INSTALLATION_ID,
        status_code=500,
        payload=payload,
    )
    response = await client.post(
        f"/app/hook/deliveries/{delivery_id}/attempts", headers=jwt_headers(app_key_pem)
    )
    assert response.status_code == 202
    assert emulator.redelivery_attempts == [delivery_id]

    headers, body = received[0]
    assert json.loads(body) == payload
    assert headers["x-github-event"] == "pull_request"
    assert headers["x-github-delivery"] == "abc-123"
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["x-hub-signature-256"] == expected

    redelivered = emulator.deliveries[-1]
    assert redelivered["redelivery"] is True
    assert redelivered["guid"] == "abc-123"
    assert redelivered["status_code"] == 202


async def test_redelivery_unknown_id(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    response = await client.post(
        "/app/hook/deliveries/999999/attempts", headers=jwt_headers(app_key_pem)
    )
    assert response.status_code == 404
    assert emulator.redelivery_attempts == []


async def test_send_webhook_records_delivery(
    emulator: Emulator, receiver: tuple[str, list[tuple[dict[str, str], bytes]]]
) -> None:
    url, received = receiver
    emulator.webhook_url = url
    emulator.webhook_secret = b"k"
    payload = {"action": "opened", "installation": {"id": INSTALLATION_ID}}
    status = await emulator.send_webhook(event="pull_request", payload=payload)
    assert status == 202
    assert len(received) == 1
    assert emulator.deliveries[0]["installation_id"] == INSTALLATION_ID
    assert received[0][0]["x-hub-signature-256"] == emulator.sign(received[0][1])


# ----------------------------------------------------------------------
# Payloads and records


async def test_pull_request_payload_points_at_emulator(
    emulator: Emulator, head: str
) -> None:
    payload = pull_request_opened(
        full_name=REPO,
        number=5,
        head_sha=head,
        installation_id=INSTALLATION_ID,
        api_url=emulator.api_url,
    )
    assert payload["action"] == "opened"
    assert payload["number"] == 5
    assert payload["repository"]["full_name"] == REPO
    assert payload["pull_request"]["head"]["sha"] == head
    assert payload["installation"]["id"] == INSTALLATION_ID
    assert payload["pull_request"]["url"] == f"{emulator.api_url}/repos/{REPO}/pulls/2"
    assert "api.github.com" not in json.dumps(payload)


async def test_request_record_fields(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes
) -> None:
    emulator.clock_offset = 100_000
    await client.get(
        "/app",
        params={"x": "1"},
        headers={
            **jwt_headers(app_key_pem, now=emulator.now()),
            "X-GitHub-Api-Version": "2022-11-28",
        },
    )
    record = emulator.requests[-1]
    assert record.method == "GET"
    assert record.status == 200
    assert record.query == "x=1"
    assert record.headers["x-github-api-version"] == "2022-11-28"
    assert record.installation_id is None
    assert record.time > time.time() + 50_000


async def test_inject_fault_on_git_fetch(
    client: httpx.AsyncClient,
    emulator: Emulator,
    app_key_pem: bytes,
    head: str,
    tmp_path: Path,
) -> None:
    token = await mint(client, app_key_pem)
    emulator.inject(method="POST", path="/git/*/git-upload-pack", status=500)
    failed = await fetch(emulator, tmp_path / "a", head, token)
    assert failed.returncode != 0
    retried = await fetch(emulator, tmp_path / "b", head, token)
    assert retried.returncode == 0, retried.stderr
