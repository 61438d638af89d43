"""The REST client: one ``httpx.AsyncClient`` for the whole daemon.

Requests go out as the App (a JWT from :class:`AppAuth`) or as an
installation (a token from the client's :class:`TokenCache`). Every
request passes through :class:`daemon.github.sender.Sender`, which retries
transient failures and waits out rate limits. On top of that, a 401 for an
installation token the cache still trusts evicts it, and the request is
sent once more with a new token (:meth:`GitHubClient.installation_request`).

Errors: :class:`GitHubError` for an error response (the ``TokenError``
subclasses when minting fails), :class:`RateLimited` for a limit longer
than the configured wait, :class:`GitHubUnavailable` when GitHub cannot be
reached or keeps failing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import trio

from daemon import __version__
from daemon.errors import (
    GitHubError,
    GitHubUnavailable,
    RateLimited,
)
from daemon.github.app import AppAuth, AppIdentity, is_time_claim_rejection
from daemon.github.ratelimit import server_time
from daemon.github.sender import Sender
from daemon.github.tokens import Scope, Token, TokenCache, classify_mint_failure

__all__ = [
    "API_VERSION",
    "DEFAULT_API_URL",
    "GitHubClient",
]

log = logging.getLogger(__name__)

SECONDS = 1.0
MINUTES = 60 * SECONDS

DEFAULT_API_URL = "https://api.github.com"
# The REST API version this client is written against; GitHub documents it
# in "API Versions" (docs.github.com/en/rest/about-the-rest-api/api-versions).
API_VERSION = "2022-11-28"


def _bearer(secret: str) -> Callable[[], str]:
    return lambda: f"Bearer {secret}"


def _decode(response: httpx.Response, method: str, path: str) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise GitHubError(
            f"GitHub returned {response.status_code} for {method} {path} with a "
            "body that is not JSON; check that api_url points at the REST API "
            "(GitHub Enterprise Server: https://HOST/api/v3)",
            status_code=response.status_code,
            method=method,
            path=path,
        ) from None


class GitHubClient:
    """Call GitHub's REST API as the App or as one of its installations.

    ``api_url`` is ``https://api.github.com`` or, for GitHub Enterprise
    Server, ``https://HOST/api/v3``. ``max_concurrent_requests`` caps the
    requests in flight (GitHub's secondary limits allow at most 100
    concurrent requests, per "Rate limits for the REST API").
    ``max_rate_limit_wait`` (seconds) is the longest rate-limit wait that is
    waited out. ``max_attempts`` bounds the tries of one request after
    transient failures. Their backoff doubles from ``backoff_initial`` up to
    ``backoff_max`` seconds. ``timeout`` applies to each request (seconds).
    The token options are passed to :class:`TokenCache`. ``transport`` is for
    tests.

    Use it as an async context manager, or call :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        api_url: str = DEFAULT_API_URL,
        app: AppAuth,
        max_concurrent_requests: int = 16,
        max_rate_limit_wait: float = 5 * MINUTES,
        max_attempts: int = 5,
        backoff_initial: float = 1 * SECONDS,
        backoff_max: float = 30 * SECONDS,
        timeout: float = 30 * SECONDS,
        token_safety_margin: float = 1 * MINUTES,
        token_refresh_ahead: float = 15 * MINUTES,
        token_idle_timeout: float = 60 * MINUTES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_concurrent_requests < 1:
            raise ValueError(
                f"max_concurrent_requests must be >= 1, got {max_concurrent_requests!r}"
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        for name, value in (
            ("max_rate_limit_wait", max_rate_limit_wait),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
            ("timeout", timeout),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        url = httpx.URL(api_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"api_url must be an http(s) URL, got {api_url!r}")

        self.api_url = api_url.rstrip("/")
        self.app = app
        self.timeout = timeout
        self._limiter = trio.CapacityLimiter(max_concurrent_requests)
        self._http = httpx.AsyncClient(
            base_url=self.api_url,
            headers={
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": f"ghappd/{__version__}",
            },
            timeout=httpx.Timeout(timeout),
            transport=transport,
            follow_redirects=False,
        )
        self._sender = Sender(
            http=self._http,
            app=app,
            api_url=self.api_url,
            limiter=self._limiter,
            max_rate_limit_wait=max_rate_limit_wait,
            max_attempts=max_attempts,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
        )
        self.tokens = TokenCache(
            mint=self.mint_token,
            safety_margin=token_safety_margin,
            refresh_ahead=token_refresh_ahead,
            idle_timeout=token_idle_timeout,
        )

    def __repr__(self) -> str:
        return f"GitHubClient(api_url={self.api_url!r}, app={self.app!r})"

    async def __aenter__(self) -> GitHubClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """The limiter that caps concurrent requests (for ``statistics()``)."""
        return self._limiter

    # -- public calls ---------------------------------------------------

    async def app_request(
        self,
        method: str,
        path: str,
        *,
        json: object | None = None,
        params: Mapping[str, str | int] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """Send a request authenticated as the App; return the parsed JSON.

        ``idempotent`` defaults to True for every method except POST. Return
        None for an empty body. Raise :class:`GitHubError` for an error
        response, :class:`RateLimited` and :class:`GitHubUnavailable` as
        described in the module docstring.
        """
        response = await self._send_as_app(
            method, path, json=json, params=params, idempotent=idempotent
        )
        return _decode(response, method, path)

    async def installation_request(
        self,
        installation_id: int,
        method: str,
        path: str,
        *,
        json: object | None = None,
        params: Mapping[str, str | int] | None = None,
        idempotent: bool | None = None,
        repositories: Sequence[str] | None = None,
        permissions: Mapping[str, str] | None = None,
    ) -> Any:
        """Send a request as the installation; return the parsed JSON.

        The token comes from :attr:`tokens` (scoped by ``repositories`` and
        ``permissions``). A 401 evicts that token and the request is sent
        once more with a new one; a second 401 raises :class:`GitHubError`.
        Otherwise as :meth:`app_request`, plus the token errors of
        :meth:`TokenCache.get`.
        """
        response = await self._send_as_installation(
            installation_id,
            method,
            path,
            json=json,
            params=params,
            idempotent=idempotent,
            scope=Scope.of(repositories, permissions),
        )
        return _decode(response, method, path)

    async def paginate(
        self,
        path: str,
        *,
        installation_id: int | None = None,
        params: Mapping[str, str | int] | None = None,
        items_key: str | None = None,
    ) -> AsyncIterator[Any]:
        """Yield the items of every page, following ``Link: rel="next"``.

        Works for page and cursor pagination alike, because GitHub puts the
        next page's full URL in the ``Link`` header ("Using pagination in the
        REST API", docs.github.com/en/rest/using-the-rest-api/
        using-pagination-in-the-rest-api).
        A page is a JSON list, or an object whose ``items_key`` is the list
        (``"check_runs"`` for check runs). As the App unless
        ``installation_id`` is given. A next link outside ``api_url`` raises
        :class:`GitHubError`, so a credential is never sent elsewhere. Wrap
        the iterator in ``contextlib.aclosing`` when stopping early.
        """
        url: str | None = path
        query = params
        while url is not None:
            if installation_id is None:
                response = await self._send_as_app("GET", url, params=query)
            else:
                response = await self._send_as_installation(
                    installation_id, "GET", url, params=query, scope=Scope()
                )
            page = _decode(response, "GET", url)
            items = (
                page.get(items_key) if items_key and isinstance(page, dict) else page
            )
            if not isinstance(items, list):
                raise GitHubError(
                    f"GitHub's page for GET {path} is not a list"
                    + (f" under {items_key!r}" if items_key else "")
                    + "; pass items_key for object pages",
                    status_code=response.status_code,
                    method="GET",
                    path=path,
                )
            for item in items:
                yield item
            next_url = response.links.get("next", {}).get("url")
            url = self._check_next_link(next_url, path) if next_url else None
            query = None

    def _check_next_link(self, next_url: str, path: str) -> str:
        base = httpx.URL(self.api_url + "/")
        target = httpx.URL(next_url)
        if target.is_relative_url:
            return next_url
        same_origin = (target.scheme, target.host, target.port) == (
            base.scheme,
            base.host,
            base.port,
        )
        if not same_origin or not target.path.startswith(base.path):
            raise GitHubError(
                f"GitHub's next-page link for GET {path} points to "
                f"{target.copy_with(query=None)!s}, outside api_url "
                f"{self.api_url!r}; not following it",
                method="GET",
                path=path,
            )
        return next_url

    async def verify_app(self) -> AppIdentity:
        """Check the App id and key with ``GET /app``; return the App's identity.

        Raise :class:`GitHubUnavailable` when GitHub cannot be reached, and
        :class:`GitHubError` whose message says whether the App id or the
        key was refused, or when the key belongs to another App.
        """
        issuer = self.app.issuer
        try:
            data = await self.app_request("GET", "/app")
        except GitHubUnavailable as exc:
            raise GitHubUnavailable(
                f"the App credentials could not be checked: {exc}, or fix [app] api_url"
            ) from exc
        except RateLimited:
            raise
        except GitHubError as exc:
            raise self._explain_app_rejection(exc, issuer) from None

        if not isinstance(data, dict) or not isinstance(data.get("id"), int):
            raise GitHubError(
                f"GET /app at {self.api_url!r} did not return an App object; check "
                "that api_url points at the REST API",
                method="GET",
                path="/app",
            )
        if data["id"] != self.app.app_id:
            raise GitHubError(
                f"the private key and issuer {issuer!r} belong to App {data['id']} "
                f"({data.get('slug')!r}), not to the configured App id "
                f"{self.app.app_id}; fix the App id",
                method="GET",
                path="/app",
            )
        identity = AppIdentity(
            id=data["id"],
            slug=str(data.get("slug", "")),
            name=str(data.get("name", "")),
            client_id=data.get("client_id"),
        )
        log.info(
            "GitHub accepted the credentials of App %s (%s)", identity.id, identity.slug
        )
        return identity

    def _explain_app_rejection(self, exc: GitHubError, issuer: str) -> GitHubError:
        message = str(exc)
        lowered = message.lower()
        kwargs: dict[str, Any] = {
            "status_code": exc.status_code,
            "method": "GET",
            "path": "/app",
            "headers": exc.headers,
        }
        if is_time_claim_rejection(exc.status_code or 0, message):
            return exc
        if exc.status_code == 404 or "integration not found" in lowered:
            return GitHubError(
                f"GitHub knows no App with issuer {issuer!r} ({message}); check "
                "the App id (or client id) in the configuration",
                **kwargs,
            )
        if exc.status_code == 401:
            # GitHub returns "A JSON web token could not be decoded" both for
            # a key of another App and for a wrong App id with a valid key.
            return GitHubError(
                f"GitHub did not accept the App JWT for issuer {issuer!r} "
                f"({message}): the private key is not one of this App's keys, or "
                "the App id is wrong; download a new key from the App's settings "
                "page or fix the App id",
                **kwargs,
            )
        return exc

    async def mint_token(self, installation_id: int, *, scope: Scope) -> Token:
        """Mint an installation token with ``POST .../access_tokens``.

        Raise the :class:`TokenError` subclass that
        :func:`classify_mint_failure` picks for a refusal, or what
        :meth:`app_request` raises. Minting is retried like an idempotent
        request: a second token is harmless.
        """
        path = f"/app/installations/{int(installation_id)}/access_tokens"
        try:
            response = await self._send_as_app(
                "POST", path, json=scope.request_body(), idempotent=True
            )
        except RateLimited:
            raise
        except GitHubError as exc:
            raise classify_mint_failure(installation_id, scope, exc) from None

        body = _decode(response, "POST", path)
        secret = body.get("token") if isinstance(body, dict) else None
        expires_text = body.get("expires_at") if isinstance(body, dict) else None
        if (
            not isinstance(secret, str)
            or not secret
            or not isinstance(expires_text, str)
        ):
            raise GitHubError(
                f"GitHub's response to POST {path} has no token or expires_at",
                status_code=response.status_code,
                installation_id=installation_id,
                method="POST",
                path=path,
            )
        try:
            expires_at = datetime.fromisoformat(expires_text)
        except ValueError:
            raise GitHubError(
                f"GitHub's response to POST {path} has an invalid expires_at "
                f"{expires_text!r}",
                status_code=response.status_code,
                installation_id=installation_id,
                method="POST",
                path=path,
            ) from None
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)

        # The lifetime is measured on GitHub's clock (its Date header, which
        # has whole seconds: one is taken off), then placed on the trio clock.
        issued = server_time(response.headers, default=self.app.now())
        lifetime = expires_at.timestamp() - issued - 1 * SECONDS
        permissions = body.get("permissions")
        return Token(
            installation_id=installation_id,
            secret=secret,
            expires_at=expires_at,
            deadline=trio.current_time() + lifetime,
            scope=scope,
            permissions=dict(permissions) if isinstance(permissions, dict) else {},
        )

    async def revoke_token(self, token: Token) -> None:
        """Revoke ``token`` on GitHub, after dropping it from :attr:`tokens`.

        GitHub's "Revoke an installation access token" is
        ``DELETE /installation/token``, authenticated with the token being
        revoked, and returns 204. The token leaves the cache before the
        request, so no caller gets it from there while it is revoked. A 401
        or 404 means that the token already stops working (expired, revoked,
        or its installation removed), and counts as done.

        Nothing is raised for a failed revocation: every failure (another
        error response, a rate limit, GitHub unreachable after the retries)
        is logged with the installation id, and the token then stays valid
        until its ``expires_at``. Cancellation propagates, so a caller that
        revokes while being cancelled shields and bounds the call.
        """
        installation_id = token.installation_id
        self.tokens.evict(token, reason="it is being revoked")
        try:
            await self._sender.send(
                "DELETE",
                "/installation/token",
                authorization=_bearer(token.secret),
                installation_id=installation_id,
            )
        except (GitHubError, GitHubUnavailable) as exc:
            status = exc.status_code if isinstance(exc, GitHubError) else None
            if status in (401, 404):
                log.info(
                    "token of installation %s was unusable already (%d)",
                    installation_id,
                    status,
                )
            else:
                log.warning(
                    "revoking a token of installation %s failed, it stays valid "
                    "until %s: %s",
                    installation_id,
                    token.expires_at.isoformat(),
                    exc,
                )
            return
        log.info("revoked a token of installation %s", installation_id)

    # -- sending -------------------------------------------------------

    async def _send_as_app(
        self,
        method: str,
        path: str,
        *,
        json: object | None = None,
        params: Mapping[str, str | int] | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        return await self._sender.send(
            method,
            path,
            authorization=lambda: f"Bearer {self.app.jwt()}",
            installation_id=None,
            json=json,
            params=params,
            idempotent=idempotent,
        )

    async def _send_as_installation(
        self,
        installation_id: int,
        method: str,
        path: str,
        *,
        json: object | None = None,
        params: Mapping[str, str | int] | None = None,
        idempotent: bool | None = None,
        scope: Scope,
    ) -> httpx.Response:
        # The token must outlive the request, so it is asked for valid_for
        # the request timeout.
        for round_number in (1, 2):
            token = await self.tokens.get(
                installation_id,
                valid_for=self.timeout,
                repositories=scope.repositories,
                permissions=dict(scope.permissions)
                if scope.permissions is not None
                else None,
            )
            secret = token.secret
            try:
                return await self._sender.send(
                    method,
                    path,
                    authorization=_bearer(secret),
                    installation_id=installation_id,
                    json=json,
                    params=params,
                    idempotent=idempotent,
                )
            except GitHubError as exc:
                if exc.status_code != 401:
                    raise
                log_path = httpx.URL(path).path
                if round_number == 2:
                    log.warning(
                        "GitHub %s %s returned 401 for a new token of installation "
                        "%s (token 2 of 2); giving up",
                        method,
                        log_path,
                        installation_id,
                    )
                    raise GitHubError(
                        f"GitHub rejected a newly minted token of installation "
                        f"{installation_id} for {method} {log_path} ({exc}); check the "
                        "App's permissions and the installation",
                        status_code=401,
                        installation_id=installation_id,
                        method=method,
                        path=path,
                        headers=exc.headers,
                    ) from None
                self.tokens.evict(token)
                log.warning(
                    "GitHub %s %s returned 401 for a cached token of installation "
                    "%s (token 1 of 2, revoked?); retrying with a new token",
                    method,
                    log_path,
                    installation_id,
                )
        raise AssertionError("unreachable")
