"""The emulator's ``DELETE /installation/token``, driven over HTTP with httpx."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fixtures_emulator import INSTALLATION_ID
from test_emulator import REPO, jwt_headers, mint, token_headers

from daemon.sandbox import Emulator


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulator.api_url) as http:
        yield http


@pytest.fixture
def head(emulator: Emulator) -> str:
    return emulator.create_repository(REPO, {"README.md": "hello\n"})


async def test_revoke_returns_no_content(
    client: httpx.AsyncClient, emulator: Emulator, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)

    response = await client.delete("/installation/token", headers=token_headers(token))

    assert response.status_code == 204
    assert response.content == b""
    assert emulator.authority.tokens[token].revoked
    assert emulator.requests[-1].installation_id == INSTALLATION_ID


async def test_revoked_token_gets_bad_credentials(
    client: httpx.AsyncClient, app_key_pem: bytes, head: str
) -> None:
    token = await mint(client, app_key_pem)
    await client.delete(
        "/installation/token", headers={"Authorization": f"Bearer {token}"}
    )

    api = await client.get(f"/repos/{REPO}", headers=token_headers(token))
    again = await client.delete("/installation/token", headers=token_headers(token))

    assert api.status_code == 401
    assert api.json()["message"] == "Bad credentials"
    assert again.status_code == 401


async def test_revoke_leaves_other_tokens(
    client: httpx.AsyncClient, app_key_pem: bytes, head: str
) -> None:
    revoked = await mint(client, app_key_pem)
    other = await mint(client, app_key_pem)

    await client.delete("/installation/token", headers=token_headers(revoked))
    response = await client.get(f"/repos/{REPO}", headers=token_headers(other))

    assert response.status_code == 200


async def test_revoke_without_credentials(client: httpx.AsyncClient) -> None:
    response = await client.delete("/installation/token")

    assert response.status_code == 401
    assert response.json()["message"] == "Requires authentication"


async def test_revoke_rejects_unknown_token(client: httpx.AsyncClient) -> None:
    response = await client.delete(
        "/installation/token", headers=token_headers("ghs_" + "x" * 36)
    )

    assert response.status_code == 401
    assert response.json()["message"] == "Bad credentials"


async def test_revoke_rejects_app_jwt(
    client: httpx.AsyncClient, app_key_pem: bytes
) -> None:
    response = await client.delete(
        "/installation/token", headers=jwt_headers(app_key_pem)
    )

    assert response.status_code == 401
