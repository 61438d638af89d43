"""``GitHubClient.revoke_token`` against the emulator over real HTTP."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from fixtures_emulator import APP_ID, INSTALLATION_ID

from daemon.github import AppAuth, GitHubClient, load_private_key
from daemon.sandbox import Emulator


@pytest.fixture
async def github(emulator: Emulator, app_key_pem: bytes) -> AsyncIterator[GitHubClient]:
    app = AppAuth(app_id=APP_ID, private_key=load_private_key(app_key_pem, source="k"))
    async with GitHubClient(
        api_url=emulator.api_url, app=app, max_attempts=2, backoff_initial=0.0
    ) as client:
        yield client


async def test_revoke_token_revokes_and_evicts(
    emulator: Emulator, github: GitHubClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await github.tokens.get(INSTALLATION_ID, valid_for=60)

    await github.revoke_token(token)

    assert emulator.authority.tokens[token.secret].revoked
    assert emulator.requests[-1].method == "DELETE"
    assert emulator.requests[-1].status == 204
    assert github.tokens.statistics().cached == 0
    assert await github.tokens.get(INSTALLATION_ID, valid_for=60) != token
    assert f"revoked a token of installation {INSTALLATION_ID}" in caplog.text
    assert token.secret not in caplog.text


@pytest.mark.parametrize("status", [401, 404])
async def test_revoke_token_unusable_is_done(
    emulator: Emulator, github: GitHubClient, status: int
) -> None:
    token = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    emulator.inject(method="DELETE", path="/installation/token", status=status)

    await github.revoke_token(token)

    assert emulator.requests[-1].status == status
    assert github.tokens.statistics().cached == 0


async def test_revoke_token_logs_failure(
    emulator: Emulator, github: GitHubClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    emulator.inject(method="DELETE", path="/installation/token", status=502, times=2)

    await github.revoke_token(token)

    failures = [
        record
        for record in caplog.records
        if record.levelno == logging.WARNING
        and record.getMessage().startswith(
            f"revoking a token of installation {INSTALLATION_ID}"
        )
    ]
    assert len(failures) == 1
    assert "stays valid until" in failures[0].getMessage()
    assert not emulator.authority.tokens[token.secret].revoked
    assert token.secret not in caplog.text
