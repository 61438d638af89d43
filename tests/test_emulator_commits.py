"""The emulator's pull request and commit lookups, driven over HTTP."""

from __future__ import annotations

import httpx
import pytest
from fixtures_emulator import INSTALLATION_ID

from daemon.sandbox import Emulator

REPO = "octo-org/hello"


@pytest.fixture
async def http(emulator: Emulator) -> httpx.AsyncClient:
    emulator.create_repository(REPO, {"README.md": "hello\n"})
    answer = emulator.authority.mint(INSTALLATION_ID, {})
    token = answer["token"]
    return httpx.AsyncClient(
        base_url=emulator.api_url, headers={"Authorization": f"token {token}"}
    )


async def test_pull_request_names_its_head(
    emulator: Emulator, http: httpx.AsyncClient
) -> None:
    head = emulator.commit(REPO, {"a.py": "x = 1\n"}, branch="feature")
    emulator.pull_ref(REPO, 7, head)

    response = await http.get(f"/repos/{REPO}/pulls/7")

    assert response.status_code == 200
    assert response.json()["head"]["sha"] == head
    assert response.json()["base"]["ref"] == "main"


async def test_pull_request_unknown_is_404(http: httpx.AsyncClient) -> None:
    response = await http.get(f"/repos/{REPO}/pulls/8")

    assert response.status_code == 404


async def test_pull_request_needs_token(emulator: Emulator) -> None:
    emulator.create_repository(REPO, {"README.md": "hello\n"})
    async with httpx.AsyncClient(base_url=emulator.api_url) as anonymous:
        response = await anonymous.get(f"/repos/{REPO}/pulls/7")

    assert response.status_code == 401


@pytest.mark.parametrize("ref", ["main", "heads/main", "refs/heads/main"])
async def test_commit_by_branch(
    emulator: Emulator, http: httpx.AsyncClient, ref: str
) -> None:
    tip = emulator.commit(REPO, {"a.py": "x = 2\n"})

    response = await http.get(f"/repos/{REPO}/commits/{ref}")

    assert response.status_code == 200
    assert response.json()["sha"] == tip


async def test_commit_by_sha(emulator: Emulator, http: httpx.AsyncClient) -> None:
    sha = emulator.commit(REPO, {"a.py": "x = 3\n"}, branch="other")

    response = await http.get(f"/repos/{REPO}/commits/{sha}")

    assert response.json()["sha"] == sha


async def test_commit_unknown_is_422(http: httpx.AsyncClient) -> None:
    response = await http.get(f"/repos/{REPO}/commits/no-such-branch")

    assert response.status_code == 422


async def test_commit_option_like_ref_is_422(http: httpx.AsyncClient) -> None:
    response = await http.get(f"/repos/{REPO}/commits/--all")

    assert response.status_code == 422


async def test_commit_route_leaves_check_runs_listing(
    emulator: Emulator, http: httpx.AsyncClient
) -> None:
    sha = emulator.resolve(REPO, "main")

    response = await http.get(f"/repos/{REPO}/commits/{sha}/check-runs")

    assert response.json() == {"total_count": 0, "check_runs": []}
