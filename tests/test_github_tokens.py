"""Installation tokens: the cache, the refresher and mint errors, on the emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial

import pytest
import trio
from fixtures_emulator import APP_ID, INSTALLATION_ID

from daemon.errors import (
    GitHubError,
    InstallationNotFound,
    InstallationSuspended,
    PermissionNotGranted,
    RepositoryNotAccessible,
    TokenError,
)
from daemon.github import AppAuth, GitHubClient, Scope, Token, load_private_key
from daemon.sandbox import Emulator

MINT_PATH = f"/app/installations/{INSTALLATION_ID}/access_tokens"


def _mints(emulator: Emulator, installation_id: int = INSTALLATION_ID) -> int:
    path = f"/app/installations/{installation_id}/access_tokens"
    return sum(1 for r in emulator.requests if r.method == "POST" and r.path == path)


@pytest.fixture
async def github(emulator: Emulator, app_key_pem: bytes) -> AsyncIterator[GitHubClient]:
    app = AppAuth(app_id=APP_ID, private_key=load_private_key(app_key_pem, source="k"))
    async with GitHubClient(
        api_url=emulator.api_url,
        app=app,
        token_safety_margin=60.0,
        token_refresh_ahead=600.0,
        token_idle_timeout=3600.0,
    ) as client:
        yield client


def test_token_repr_masks_secret() -> None:
    secret = "ghs_" + "x" * 90
    token = Token(
        installation_id=7,
        secret=secret,
        expires_at=datetime(2026, 1, 1, tzinfo=UTC),
        deadline=0.0,
    )
    assert secret not in repr(token)
    assert secret not in str(token)
    assert secret not in f"{token}"
    assert repr(token) == (
        "Token(installation_id=7, expires_at='2026-01-01T00:00:00+00:00', secret='***')"
    )


def test_scope_normalised() -> None:
    scope = Scope.of(["octo-org/b", "a", "b"], {"contents": "read"})
    assert scope.repositories == ("a", "b")
    assert scope.permissions == (("contents", "read"),)
    assert scope.request_body() == {
        "repositories": ["a", "b"],
        "permissions": {"contents": "read"},
    }
    assert Scope.of().request_body() is None


async def test_token_is_long_opaque_string(github: GitHubClient) -> None:
    token = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    assert token.secret.startswith("ghs_")
    assert len(token.secret) > 40
    assert token.installation_id == INSTALLATION_ID
    assert token.remaining() == pytest.approx(3600, abs=5)


async def test_concurrent_get_makes_one_request(
    emulator: Emulator, github: GitHubClient
) -> None:
    results: list[Token] = []

    async def one() -> None:
        results.append(await github.tokens.get(INSTALLATION_ID, valid_for=600))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)

    assert len(results) == 20
    assert len({token.secret for token in results}) == 1
    assert _mints(emulator) == 1
    assert github.tokens.statistics().shared_waits == 19


async def test_cached_token_reused(emulator: Emulator, github: GitHubClient) -> None:
    first = await github.tokens.get(INSTALLATION_ID, valid_for=600)
    second = await github.tokens.get(INSTALLATION_ID, valid_for=1200)
    assert second is first
    assert _mints(emulator) == 1


async def test_scopes_cached_apart(emulator: Emulator, github: GitHubClient) -> None:
    emulator.create_repository("octo-org/hello", {"README.md": "hi\n"})
    whole = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    scoped = await github.tokens.get(
        INSTALLATION_ID, valid_for=60, repositories=["hello"]
    )
    again = await github.tokens.get(
        INSTALLATION_ID, valid_for=60, repositories=["octo-org/hello"]
    )
    assert scoped.secret != whole.secret
    assert again is scoped
    assert _mints(emulator) == 2
    assert emulator.requests[-1].json() == {"repositories": ["hello"]}


async def test_token_within_margin_counts_as_expired(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    first = await github.tokens.get(INSTALLATION_ID, valid_for=0)
    # 30 s before expiry, inside the 60 s safety margin.
    await trio.sleep(first.remaining() - 30)

    second = await github.tokens.get(INSTALLATION_ID, valid_for=0)

    assert second.secret != first.secret
    assert _mints(emulator) == 2


async def test_valid_for_beyond_lifetime_raises(github: GitHubClient) -> None:
    with pytest.raises(
        TokenError,
        match=r"^GitHub issued installation 1001 a token valid for \d+ s, less than "
        r"the 7200 s requested",
    ):
        await github.tokens.get(INSTALLATION_ID, valid_for=7200)


async def test_refresher_renews_before_job_needs_it(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    first = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(github.tokens.run_refresher, active=lambda: [INSTALLATION_ID])
        )
        # The job comes 55 minutes later and needs 20 minutes.
        await trio.sleep(55 * 60)
        mints_before = _mints(emulator)

        token = await github.tokens.get(INSTALLATION_ID, valid_for=20 * 60)

        assert _mints(emulator) == mints_before
        nursery.cancel_scope.cancel()

    assert mints_before == 2
    assert token.secret != first.secret
    assert github.tokens.statistics().refreshes == 1


async def test_refresher_drops_idle_tokens(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    await github.tokens.get(INSTALLATION_ID, valid_for=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(github.tokens.run_refresher, active=lambda: []))
        await trio.sleep(30 * 60)
        assert github.tokens.statistics().cached == 1
        await trio.sleep(31 * 60)
        assert github.tokens.statistics().cached == 0
        nursery.cancel_scope.cancel()
    assert _mints(emulator) == 1


async def test_refresher_keeps_token_while_active(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(github.tokens.run_refresher, active=lambda: [INSTALLATION_ID])
        )
        for _ in range(18):
            await github.tokens.get(INSTALLATION_ID, valid_for=60)
            await trio.sleep(10 * 60)
        nursery.cancel_scope.cancel()
    stats = github.tokens.statistics()
    # The first get() mints. The refresher renews each token once it has
    # less than 600 s of use left, at about 49, 98 and 147 minutes.
    assert stats.mints - stats.refreshes == 1
    assert _mints(emulator) == 4
    assert stats.cached == 1


async def test_refresher_drops_token_unused_while_active(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    await github.tokens.get(INSTALLATION_ID, valid_for=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(github.tokens.run_refresher, active=lambda: [INSTALLATION_ID])
        )
        await trio.sleep(61 * 60)
        nursery.cancel_scope.cancel()
    assert github.tokens.statistics().cached == 0
    assert _mints(emulator) == 2


async def test_uninstalled_fails_fast(emulator: Emulator, github: GitHubClient) -> None:
    emulator.uninstall(INSTALLATION_ID)
    with pytest.raises(
        InstallationNotFound,
        match=r"^GitHub has no installation 1001 of this App \(404\): it was "
        r"uninstalled or the id is wrong",
    ) as info:
        await github.tokens.get(INSTALLATION_ID, valid_for=60)
    assert info.value.status_code == 404
    assert info.value.installation_id == INSTALLATION_ID
    assert _mints(emulator) == 1


async def test_suspended_until_unsuspended(
    emulator: Emulator, github: GitHubClient
) -> None:
    emulator.suspend(INSTALLATION_ID)
    with pytest.raises(
        InstallationSuspended,
        match=r"^installation 1001 is suspended \(403\); an owner of the account "
        r"must unsuspend the App",
    ):
        await github.tokens.get(INSTALLATION_ID, valid_for=60)

    emulator.unsuspend(INSTALLATION_ID)
    with pytest.raises(
        InstallationSuspended, match=r"^installation 1001 is suspended; an owner"
    ):
        await github.tokens.get(INSTALLATION_ID, valid_for=60)
    assert _mints(emulator) == 1

    github.tokens.unsuspended(INSTALLATION_ID)
    token = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    assert token.secret.startswith("ghs_")
    assert _mints(emulator) == 2


async def test_forget_suspended_drops_token(
    emulator: Emulator, github: GitHubClient
) -> None:
    await github.tokens.get(INSTALLATION_ID, valid_for=60)
    github.tokens.forget(INSTALLATION_ID, suspended=True)

    assert github.tokens.statistics().cached == 0
    assert github.tokens.is_suspended(INSTALLATION_ID)
    with pytest.raises(InstallationSuspended, match=r"^installation 1001 is suspended"):
        await github.tokens.get(INSTALLATION_ID, valid_for=60)


async def test_forget_mints_anew(emulator: Emulator, github: GitHubClient) -> None:
    first = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    github.tokens.forget(INSTALLATION_ID)
    second = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    assert second.secret != first.secret
    assert _mints(emulator) == 2


async def test_repository_not_accessible(
    emulator: Emulator, github: GitHubClient
) -> None:
    with pytest.raises(
        RepositoryNotAccessible,
        match=r"^installation 1001 does not include the repositories \['missing'\] "
        r"\(422: .*\); the account owner must add them",
    ) as info:
        await github.tokens.get(INSTALLATION_ID, valid_for=60, repositories=["missing"])
    assert info.value.status_code == 422
    assert _mints(emulator) == 1


async def test_permission_not_granted(emulator: Emulator, github: GitHubClient) -> None:
    with pytest.raises(
        PermissionNotGranted,
        match=r"^installation 1001 has not granted the permissions "
        r"\{'administration': 'write'\} \(422: .*\); ask less",
    ) as info:
        await github.tokens.get(
            INSTALLATION_ID, valid_for=60, permissions={"administration": "write"}
        )
    assert info.value.status_code == 422
    assert _mints(emulator) == 1


async def test_mint_error_shared_by_waiters(
    emulator: Emulator, github: GitHubClient
) -> None:
    emulator.uninstall(INSTALLATION_ID)
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await github.tokens.get(INSTALLATION_ID, valid_for=60)
        except InstallationNotFound as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert len(errors) == 5
    assert _mints(emulator) == 1


async def test_cancelled_leader_hands_over(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    emulator.inject(method="POST", path=MINT_PATH, status=500, delay=10)
    leader_scope = trio.CancelScope()
    got: list[Token] = []

    async def leader() -> None:
        with leader_scope:
            await github.tokens.get(INSTALLATION_ID, valid_for=60)

    async def waiter() -> None:
        got.append(await github.tokens.get(INSTALLATION_ID, valid_for=60))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        await trio.sleep(1)
        nursery.start_soon(waiter)
        await trio.sleep(1)
        assert github.tokens.statistics().shared_waits == 1
        leader_scope.cancel()

    assert leader_scope.cancelled_caught
    assert len(got) == 1
    assert got[0].secret.startswith("ghs_")


async def test_revoked_token_replaced_once(
    emulator: Emulator, github: GitHubClient
) -> None:
    emulator.create_repository("octo-org/hello", {"README.md": "hi\n"})
    first = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    emulator.revoke_token(first.secret)

    repo = await github.installation_request(
        INSTALLATION_ID, "GET", "/repos/octo-org/hello"
    )

    assert repo["full_name"] == "octo-org/hello"
    assert [
        r.status for r in emulator.requests if r.path == "/repos/octo-org/hello"
    ] == [
        401,
        200,
    ]
    assert _mints(emulator) == 2
    current = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    assert current.secret != first.secret


async def test_second_401_fails(emulator: Emulator, github: GitHubClient) -> None:
    emulator.create_repository("octo-org/hello", {"README.md": "hi\n"})
    emulator.inject(
        method="GET",
        path="/repos/octo-org/hello",
        status=401,
        body={"message": "Bad credentials"},
        times=2,
    )
    with pytest.raises(
        GitHubError,
        match=r"^GitHub rejected a newly minted token of installation 1001 for "
        r"GET /repos/octo-org/hello \(.*Bad credentials\)",
    ) as info:
        await github.installation_request(
            INSTALLATION_ID, "GET", "/repos/octo-org/hello"
        )
    assert info.value.status_code == 401
    assert _mints(emulator) == 2
    assert len([r for r in emulator.requests if r.path == "/repos/octo-org/hello"]) == 2


async def test_forget_during_mint_not_cached(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    emulator.inject(method="POST", path=MINT_PATH, status=500, delay=5)
    got: list[Token] = []

    async def caller() -> None:
        got.append(await github.tokens.get(INSTALLATION_ID, valid_for=60))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.sleep(1)
        github.tokens.forget(INSTALLATION_ID)

    assert len(got) == 1
    assert github.tokens.statistics().cached == 0


async def test_secrets_lists_cached_tokens(github: GitHubClient) -> None:
    token = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    assert github.tokens.secrets() == [token.secret]
    github.tokens.forget(INSTALLATION_ID)
    assert github.tokens.secrets() == []
