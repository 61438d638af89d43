"""The GitHub emulator, driven by real clients: httpx for REST, git for fetches."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio

from daemon.sandbox import Emulator

APP_ID = 4242
INSTALLATION_ID = 1001
REPO = "octo-org/hello"


def app_jwt(key: bytes, *, now: float | None = None, **claims: Any) -> str:
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {"iat": issued - 60, "exp": issued + 540, "iss": APP_ID}
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    # PyJWT's encode() only takes a string "iss"; GitHub takes the App id as
    # a number too, so the claims are signed as raw JSON.
    return jwt.PyJWS().encode(json.dumps(payload).encode(), key, algorithm="RS256")


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
    from daemon.sandbox import generate_app_key

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
    headers = jwt_headers(app_key_pem, iat=now - 60, exp=now + 600)
    response = await client.get("/app", headers=headers)
    assert response.status_code == 401
    assert response.json()["message"].endswith("is too far in the future")


async def test_get_app_rejects_wrong_issuer(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    response = await client.get("/app", headers=jwt_headers(app_key_pem, iss=1))
    assert response.status_code == 401


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
