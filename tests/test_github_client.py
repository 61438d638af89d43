"""The REST client's retries, rate limits, pagination and logging, on the emulator."""

from __future__ import annotations

import email.utils
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from fixtures_emulator import APP_ID, INSTALLATION_ID

from daemon import __version__
from daemon.errors import GitHubError, GitHubUnavailable, RateLimited
from daemon.github import AppAuth, GitHubClient, load_private_key, parse_rate_limit
from daemon.sandbox import Emulator

SECONDARY = (
    "You have exceeded a secondary rate limit. Please wait a few minutes "
    "before you try again."
)


def _app(app_key_pem: bytes) -> AppAuth:
    return AppAuth(app_id=APP_ID, private_key=load_private_key(app_key_pem, source="k"))


@pytest.fixture
async def github(emulator: Emulator, app_key_pem: bytes) -> AsyncIterator[GitHubClient]:
    async with GitHubClient(
        api_url=emulator.api_url, app=_app(app_key_pem), max_rate_limit_wait=300.0
    ) as client:
        yield client


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.startswith("daemon.github")
    ]


def _count(emulator: Emulator, method: str, path: str) -> int:
    return sum(1 for r in emulator.requests if r.method == method and r.path == path)


class CountingTransport(httpx.AsyncBaseTransport):
    """Pass requests to a real transport, counting those in flight."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.in_flight = 0
        self.max_in_flight = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self._inner.handle_async_request(request)
            await response.aread()
            return response
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        await self._inner.aclose()


# -- headers and URLs --------------------------------------------------------


async def test_standard_headers_sent(emulator: Emulator, github: GitHubClient) -> None:
    await github.app_request("GET", "/app")
    headers = {k.lower(): v for k, v in emulator.requests[-1].headers.items()}
    assert headers["accept"] == "application/vnd.github+json"
    assert headers["x-github-api-version"] == "2022-11-28"
    assert headers["user-agent"] == f"ghappd/{__version__}"
    assert headers["authorization"].startswith("Bearer ey")


async def test_enterprise_base_path_kept(app_key_pem: bytes) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"ok": True})

    async with GitHubClient(
        api_url="https://ghe.example.com/api/v3/",
        app=_app(app_key_pem),
        transport=httpx.MockTransport(handler),
    ) as client:
        await client.app_request("GET", "/app/installations")
    assert seen == ["https://ghe.example.com/api/v3/app/installations"]


# -- transient failures ------------------------------------------------------


async def test_retries_502_then_200(
    autojump_clock: trio.abc.Clock,
    emulator: Emulator,
    github: GitHubClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator.inject(method="GET", path="/app", status=502)
    caplog.set_level(logging.WARNING, logger="daemon.github")

    app = await github.app_request("GET", "/app")

    assert app["id"] == APP_ID
    assert [r.status for r in emulator.requests] == [502, 200]
    retries = [m for m in _messages(caplog) if "retrying" in m]
    assert len(retries) == 1
    assert retries[0].startswith("GitHub GET /app returned 502; retrying in ")
    assert retries[0].endswith("(attempt 1 of 5)")


async def test_persistent_5xx_gives_up(
    autojump_clock: trio.abc.Clock,
    emulator: Emulator,
    github: GitHubClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator.inject(method="GET", path="/app", status=503, times=10)
    caplog.set_level(logging.WARNING, logger="daemon.github")
    start = trio.current_time()

    with pytest.raises(
        GitHubUnavailable, match=r"^GitHub returned 503 for GET /app 5 times"
    ):
        await github.app_request("GET", "/app")

    assert _count(emulator, "GET", "/app") == 5
    # Backoff doubles from 1 s with jitter of up to half: at least 0.5+1+2+4.
    assert trio.current_time() - start >= 7.5
    messages = _messages(caplog)
    assert messages[-1] == "GitHub GET /app returned 503 (attempt 5); giving up"


async def test_post_not_retried_unless_idempotent(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    delivery_id = emulator.add_hook_delivery(
        guid="guid-1",
        event="ping",
        action=None,
        installation_id=None,
        status_code=502,
        payload={"zen": "hi"},
    )
    path = f"/app/hook/deliveries/{delivery_id}/attempts"
    emulator.inject(method="POST", path=path, status=502, times=2)

    with pytest.raises(
        GitHubError, match=r"^GitHub returned 502 for POST .* not idempotent$"
    ):
        await github.app_request("POST", path)
    assert _count(emulator, "POST", path) == 1

    await github.app_request("POST", path, idempotent=True)
    assert [r.status for r in emulator.requests if r.path == path] == [502, 502, 202]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_gives_up(
    autojump_clock: trio.abc.Clock, app_key_pem: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.github")
    url = f"http://127.0.0.1:{_closed_port()}"
    async with GitHubClient(
        api_url=url, app=_app(app_key_pem), max_attempts=3
    ) as client:
        with pytest.raises(
            GitHubUnavailable,
            match=r"^POST /app/installations/1/access_tokens to .* failed "
            r"\(ConnectError: .+\) after 3 attempts",
        ):
            await client.app_request("POST", "/app/installations/1/access_tokens")
    messages = _messages(caplog)
    assert len(messages) == 3
    assert messages[0].endswith("(attempt 1 of 3)")
    assert messages[2].endswith("(attempt 3); giving up")


# -- rate limits -------------------------------------------------------------


async def test_retry_after_honoured(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    emulator.inject(
        method="GET",
        path="/app",
        status=429,
        headers={"Retry-After": "2"},
        body={"message": "Too many requests"},
    )
    start = trio.current_time()

    await github.app_request("GET", "/app")

    assert trio.current_time() - start >= 2
    assert [r.status for r in emulator.requests] == [429, 200]


async def test_ratelimit_reset_honoured(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    reset = int(emulator.now()) + 40
    emulator.inject(
        method="GET",
        path="/app",
        status=403,
        headers={
            "x-ratelimit-remaining": "0",
            "x-ratelimit-limit": "5000",
            "x-ratelimit-reset": str(reset),
            "x-ratelimit-resource": "core",
        },
        body={"message": "API rate limit exceeded for installation ID 1001."},
    )
    start = trio.current_time()

    await github.app_request("GET", "/app")

    assert trio.current_time() - start >= 38
    assert [r.status for r in emulator.requests] == [403, 200]


async def test_secondary_limit_from_body(
    autojump_clock: trio.abc.Clock,
    emulator: Emulator,
    github: GitHubClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.github")
    emulator.inject(method="GET", path="/app", status=403, body={"message": SECONDARY})
    start = trio.current_time()

    await github.app_request("GET", "/app")

    assert trio.current_time() - start >= 60
    assert [r.status for r in emulator.requests] == [403, 200]
    assert "secondary rate limit for the App" in _messages(caplog)[0]


async def test_secondary_limit_backs_off_exponentially(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    emulator.inject(
        method="GET", path="/app", status=403, body={"message": SECONDARY}, times=2
    )
    start = trio.current_time()
    await github.app_request("GET", "/app")
    assert trio.current_time() - start >= 60 + 120


async def test_rate_limit_beyond_max_gives_up(
    autojump_clock: trio.abc.Clock,
    emulator: Emulator,
    github: GitHubClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.github")
    emulator.inject(
        method="GET",
        path="/app",
        status=429,
        headers={"Retry-After": "3600"},
        body={"message": SECONDARY},
    )
    start = trio.current_time()

    with pytest.raises(
        RateLimited,
        match=r"^GitHub's secondary rate limit for the App is exhausted until "
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00 \(3600 s, announced by the "
        r"Retry-After header\), longer than max_rate_limit_wait 300 s; GET /app "
        r"was not sent\. Retry after the reset, or raise max_rate_limit_wait$",
    ) as info:
        await github.app_request("GET", "/app")

    assert trio.current_time() - start < 1
    assert info.value.limit == "secondary rate limit"
    assert _count(emulator, "GET", "/app") == 1
    assert _messages(caplog)[-1].endswith("giving up")

    # The limit is remembered: the next call gives up without a request.
    with pytest.raises(RateLimited, match=r"^GitHub's secondary rate limit"):
        await github.app_request("GET", "/app")
    assert _count(emulator, "GET", "/app") == 1


async def test_rate_limit_repeated_gives_up(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    emulator.inject(
        method="GET",
        path="/app",
        status=429,
        headers={"Retry-After": "1"},
        body={"message": SECONDARY},
        times=10,
    )
    with pytest.raises(
        RateLimited,
        match=r"^GitHub's secondary rate limit for the App is exhausted until .* "
        r"still limited after 5 attempts; GET /app was not sent\. Retry after the "
        r"reset, or send fewer requests$",
    ):
        await github.app_request("GET", "/app")
    assert _count(emulator, "GET", "/app") == 5


async def test_rate_limited_installation_waits_alone(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    emulator.add_installation(2002, account="other-org")
    emulator.create_repository("octo-org/one", {"README.md": "1\n"})
    emulator.create_repository("other-org/two", {"README.md": "2\n"})
    emulator.inject(
        method="GET",
        path="/repos/octo-org/one",
        status=429,
        headers={"Retry-After": "30"},
        body={"message": SECONDARY},
    )
    finished: dict[int, float] = {}
    start = trio.current_time()

    async def call(installation_id: int, path: str) -> None:
        await github.installation_request(installation_id, "GET", path)
        finished[installation_id] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, INSTALLATION_ID, "/repos/octo-org/one")
        await trio.sleep(0.5)
        nursery.start_soon(call, 2002, "/repos/other-org/two")

    assert finished[INSTALLATION_ID] >= 30
    assert finished[2002] < 30


async def test_rate_limit_holds_back_same_installation(
    autojump_clock: trio.abc.Clock, emulator: Emulator, github: GitHubClient
) -> None:
    emulator.create_repository("octo-org/one", {"README.md": "1\n"})
    emulator.inject(
        method="GET",
        path="/repos/octo-org/one",
        status=429,
        headers={"Retry-After": "30"},
        body={"message": SECONDARY},
    )
    await github.tokens.get(INSTALLATION_ID, valid_for=60)
    finished: list[float] = []
    start = trio.current_time()

    async def call() -> None:
        await github.installation_request(INSTALLATION_ID, "GET", "/repos/octo-org/one")
        finished.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.sleep(1)
        nursery.start_soon(call)

    assert len(finished) == 2
    assert min(finished) >= 30
    assert _count(emulator, "GET", "/repos/octo-org/one") == 3


async def test_concurrency_capped(
    autojump_clock: trio.abc.Clock, emulator: Emulator, app_key_pem: bytes
) -> None:
    transport = CountingTransport()
    emulator.inject(method="GET", path="/app", status=200, body={}, times=10, delay=1)
    async with (
        GitHubClient(
            api_url=emulator.api_url,
            app=_app(app_key_pem),
            max_concurrent_requests=3,
            transport=transport,
        ) as client,
        trio.open_nursery() as nursery,
    ):
        for _ in range(10):
            nursery.start_soon(client.app_request, "GET", "/app")
    assert transport.max_in_flight == 3
    assert _count(emulator, "GET", "/app") == 10


def test_parse_rate_limit_ignores_permission_403() -> None:
    headers = httpx.Headers({"x-ratelimit-remaining": "4999"})
    assert parse_rate_limit(403, headers, "Resource not accessible", now=0.0) is None


def test_parse_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    value = email.utils.formatdate(now + 90, usegmt=True)
    limit = parse_rate_limit(429, httpx.Headers({"Retry-After": value}), "", now=now)
    assert limit is not None
    assert limit.wait == pytest.approx(90)


# -- errors, pagination, logging ---------------------------------------------


async def test_error_carries_github_message(
    emulator: Emulator, github: GitHubClient
) -> None:
    with pytest.raises(
        GitHubError,
        match=r"^GitHub returned 404 for GET /app/installations/999: Not Found$",
    ) as info:
        await github.app_request("GET", "/app/installations/999")
    assert info.value.status_code == 404
    assert info.value.method == "GET"


async def test_paginate_follows_cursor(
    emulator: Emulator, github: GitHubClient
) -> None:
    for number in range(5):
        emulator.add_hook_delivery(
            guid=f"guid-{number}",
            event="ping",
            action=None,
            installation_id=INSTALLATION_ID,
            status_code=200,
            payload={"n": number},
            delivered_at=f"2026-01-01T00:00:0{number}Z",
        )

    items = [
        item
        async for item in github.paginate(
            "/app/hook/deliveries", params={"per_page": 2}
        )
    ]

    assert sorted(item["guid"] for item in items) == [f"guid-{n}" for n in range(5)]
    pages = [r for r in emulator.requests if r.path == "/app/hook/deliveries"]
    assert len(pages) == 3
    assert "cursor=" in pages[1].query


async def test_paginate_refuses_foreign_link(
    emulator: Emulator, github: GitHubClient
) -> None:
    emulator.inject(
        method="GET",
        path="/app/hook/deliveries",
        status=200,
        headers={
            "Link": '<http://203.0.113.9/app/hook/deliveries?cursor=x>; rel="next"'
        },
        body=[{"id": 1}],
    )
    items: list[Any] = []
    with pytest.raises(
        GitHubError,
        match=r"^GitHub's next-page link for GET /app/hook/deliveries points to "
        r"http://203\.0\.113\.9/app/hook/deliveries, outside api_url",
    ):
        async for item in github.paginate("/app/hook/deliveries"):
            items.append(item)
    assert items == [{"id": 1}]


async def test_nothing_logged_contains_a_credential(
    autojump_clock: trio.abc.Clock,
    emulator: Emulator,
    github: GitHubClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.create_repository("octo-org/hello", {"README.md": "hi\n"})
    emulator.clock_offset = 600
    emulator.inject(method="POST", path="/app/installations/*", status=502)
    emulator.inject(
        method="GET",
        path="/repos/octo-org/hello",
        status=403,
        body={"message": SECONDARY},
    )
    first = await github.tokens.get(INSTALLATION_ID, valid_for=60)
    emulator.revoke_token(first.secret)
    await github.installation_request(INSTALLATION_ID, "GET", "/repos/octo-org/hello")
    emulator.uninstall(INSTALLATION_ID)
    github.tokens.forget(INSTALLATION_ID)
    with pytest.raises(GitHubError):
        await github.installation_request(
            INSTALLATION_ID, "GET", "/repos/octo-org/hello"
        )

    credentials = {
        value.partition(" ")[2]
        for r in emulator.requests
        for name, value in r.headers.items()
        if name.lower() == "authorization"
    }
    assert len(credentials) >= 4
    assert any(c.startswith("ghs_") for c in credentials)
    assert any(c.startswith("ey") for c in credentials)
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + (record.exc_text or "")
        for credential in credentials:
            assert credential not in text
            # A JWT's signature alone would leak it as well.
            assert credential.rsplit(".", 1)[-1] not in text
