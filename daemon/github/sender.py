"""Send one REST request under GitHub's retry and rate-limit rules.

:class:`Sender` is the loop behind every ``GitHubClient`` call:

- connection errors, timeouts and 5xx responses are retried with bounded
  exponential backoff and jitter, then raise :class:`GitHubUnavailable`.
  A POST is retried only when the caller marks it idempotent, unless the
  connection failed before the request was sent;
- 403/429 rate limits (``daemon.github.ratelimit``) are waited out up to
  ``max_rate_limit_wait`` seconds, else raise :class:`RateLimited`. The
  wait is kept per installation, and per App for JWT calls, so a limited
  installation holds back only its own requests;
- a 401 that rejects the JWT's time claims sets the clock offset from the
  response's ``Date`` header, and the request is sent once more.

Any other error response raises :class:`GitHubError` with GitHub's message.
Log records name the method, path, status and attempt, never a credential.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
import trio

from daemon.errors import GitHubError, GitHubUnavailable, RateLimited
from daemon.github.app import AppAuth, is_time_claim_rejection
from daemon.github.ratelimit import RateLimit, parse_rate_limit, server_time

__all__ = ["Sender", "github_message"]

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
# Transport errors raised before any byte of the request was sent: safe to
# retry for every method.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})


def github_message(response: httpx.Response) -> str:
    """Return the ``message`` of GitHub's error body, or a short stand-in."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return response.reason_phrase


@dataclass(slots=True)
class _Backoff:
    """Rate-limit state of one installation, or of the App."""

    until: float = 0.0
    limit: RateLimit | None = None
    secondary_hits: int = 0


@dataclass(slots=True)
class _Call:
    """One request being sent, with its counters."""

    method: str
    path: str
    installation_id: int | None
    idempotent: bool
    attempt: int = 0
    failures: int = 0
    limited: int = 0
    clock_corrected: bool = False

    @property
    def who(self) -> str:
        if self.installation_id is None:
            return "the App"
        return f"installation {self.installation_id}"


class Sender:
    """Send requests through ``http``, applying the rules in the module doc.

    ``limiter`` caps the requests in flight; it is held only while a
    request is on the wire, never during a backoff wait. Waits use
    ``trio.sleep``, so they follow trio's clock.
    """

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        app: AppAuth,
        api_url: str,
        limiter: trio.CapacityLimiter,
        max_rate_limit_wait: float,
        max_attempts: int,
        backoff_initial: float,
        backoff_max: float,
    ) -> None:
        self._http = http
        self._app = app
        self._api_url = api_url
        self._limiter = limiter
        self.max_rate_limit_wait = max_rate_limit_wait
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._backoff: dict[int | None, _Backoff] = {}
        self._random = random.Random()

    async def send(
        self,
        method: str,
        path: str,
        *,
        authorization: Callable[[], str],
        installation_id: int | None,
        json: object | None = None,
        params: Mapping[str, str | int] | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send the request until it succeeds; return the 2xx/3xx response.

        ``installation_id`` None means the request is authenticated as the
        App, whose ``authorization`` is called for each attempt so a retry
        carries a fresh JWT. ``idempotent`` defaults to True for every
        method except POST. Raise as described in the module docstring.
        Cancellation stops a wait or a request in flight, and nothing is
        retried after it.
        """
        method = method.upper()
        call = _Call(
            method=method,
            path=httpx.URL(path).path,
            installation_id=installation_id,
            idempotent=method in _IDEMPOTENT_METHODS
            if idempotent is None
            else idempotent,
        )
        state = self._backoff.setdefault(installation_id, _Backoff())

        while True:
            await self._wait_out(state, call)
            call.attempt += 1
            try:
                async with self._limiter:
                    response = await self._http.request(
                        method,
                        path,
                        json=json,
                        params=params,
                        headers={"Authorization": authorization()},
                    )
            except httpx.TransportError as exc:
                await self._after_transport_error(exc, call)
                continue

            status = response.status_code
            if status < 400:
                state.secondary_hits = 0
                return response
            message = github_message(response)

            if self._clock_corrected(response, message, call):
                continue
            if self._rate_limit_seen(response, message, state, call):
                continue
            if status in _RETRYABLE_STATUS:
                await self._after_server_error(response, message, call)
                continue
            raise self._error(response, message, call)

    async def _wait_out(self, state: _Backoff, call: _Call) -> None:
        # A rate limit seen by any request of this installation (or of the
        # App) holds back all of its requests until the limit resets.
        wait = state.until - trio.current_time()
        if wait <= 0 or state.limit is None:
            return
        if wait > self.max_rate_limit_wait:
            raise self._rate_limited(state.limit, call, wait=wait)
        await trio.sleep(wait)

    def _jittered(self, failures: int) -> float:
        delay: float = min(
            self.backoff_max, self.backoff_initial * 2.0 ** (failures - 1)
        )
        return delay / 2 + self._random.uniform(0, delay / 2)

    async def _after_transport_error(
        self, exc: httpx.TransportError, call: _Call
    ) -> None:
        call.failures += 1
        name = type(exc).__name__
        retryable = call.idempotent or isinstance(exc, _NOT_SENT)
        if not retryable or call.failures >= self.max_attempts:
            log.warning(
                "GitHub %s %s failed with %s (attempt %d); giving up",
                call.method,
                call.path,
                name,
                call.attempt,
            )
            reason = (
                f"after {call.failures} attempts"
                if retryable
                else "and was not retried because it is not idempotent"
            )
            detail = f"{name}: {exc}" if str(exc) else name
            raise GitHubUnavailable(
                f"{call.method} {call.path} to {self._api_url!r} failed ({detail})"
                f" {reason}; check that GitHub is reachable from this host"
            ) from exc

        delay = self._jittered(call.failures)
        log.warning(
            "GitHub %s %s failed with %s; retrying in %.1f s (attempt %d of %d)",
            call.method,
            call.path,
            name,
            delay,
            call.attempt,
            self.max_attempts,
        )
        await trio.sleep(delay)

    def _clock_corrected(
        self, response: httpx.Response, message: str, call: _Call
    ) -> bool:
        # GitHub rejects a JWT whose `iat` is ahead of its clock or whose
        # `exp` is behind it; the Date header gives GitHub's time.
        if call.installation_id is not None or call.clock_corrected:
            return False
        if not is_time_claim_rejection(response.status_code, message):
            return False
        call.clock_corrected = True
        if not self._app.correct_clock(response.headers.get("date")):
            return False
        log.warning(
            "GitHub %s %s rejected the JWT's time claims (status %d, attempt %d); "
            "retrying once with the clock offset %.0f s",
            call.method,
            call.path,
            response.status_code,
            call.attempt,
            self._app.clock_offset,
        )
        return True

    def _rate_limit_seen(
        self, response: httpx.Response, message: str, state: _Backoff, call: _Call
    ) -> bool:
        now = server_time(response.headers, default=self._app.now())
        limit = parse_rate_limit(
            response.status_code,
            response.headers,
            message,
            now=now,
            secondary_hits=state.secondary_hits + 1,
        )
        if limit is None:
            return False

        call.limited += 1
        if limit.announced_by == "the response message":
            state.secondary_hits += 1
        state.limit = limit
        state.until = max(state.until, trio.current_time() + limit.wait)
        if limit.wait > self.max_rate_limit_wait or call.limited >= self.max_attempts:
            raise self._rate_limited(
                limit,
                call,
                wait=limit.wait,
                status=response.status_code,
                headers=response.headers,
            )
        log.warning(
            "GitHub %s %s returned %d: %s for %s; waiting %.0f s until %s "
            "(attempt %d of %d)",
            call.method,
            call.path,
            response.status_code,
            limit.limit,
            call.who,
            limit.wait,
            limit.reset_at.isoformat(),
            call.attempt,
            self.max_attempts,
        )
        return True

    def _rate_limited(
        self,
        limit: RateLimit,
        call: _Call,
        *,
        wait: float,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> RateLimited:
        if wait > self.max_rate_limit_wait:
            cause = f"longer than max_rate_limit_wait {self.max_rate_limit_wait:.0f} s"
            fix = "Retry after the reset, or raise max_rate_limit_wait"
        else:
            cause = f"still limited after {call.limited} attempts"
            fix = "Retry after the reset, or send fewer requests"
        log.warning(
            "GitHub %s %s is held back by the %s for %s until %s (%.0f s, %s, "
            "status %s, attempt %d); giving up",
            call.method,
            call.path,
            limit.limit,
            call.who,
            limit.reset_at.isoformat(),
            wait,
            cause,
            status if status is not None else "not sent",
            call.attempt,
        )
        return RateLimited(
            f"GitHub's {limit.limit} for {call.who} is exhausted until "
            f"{limit.reset_at.isoformat()} ({wait:.0f} s, announced by "
            f"{limit.announced_by}), {cause}; {call.method} {call.path} was not "
            f"sent. {fix}",
            limit=limit.limit,
            reset_at=limit.reset_at,
            status_code=status,
            installation_id=call.installation_id,
            method=call.method,
            path=call.path,
            headers=headers,
        )

    async def _after_server_error(
        self, response: httpx.Response, message: str, call: _Call
    ) -> None:
        call.failures += 1
        status = response.status_code
        if call.idempotent and call.failures < self.max_attempts:
            delay = self._jittered(call.failures)
            log.warning(
                "GitHub %s %s returned %d; retrying in %.1f s (attempt %d of %d)",
                call.method,
                call.path,
                status,
                delay,
                call.attempt,
                self.max_attempts,
            )
            await trio.sleep(delay)
            return

        log.warning(
            "GitHub %s %s returned %d (attempt %d); giving up",
            call.method,
            call.path,
            status,
            call.attempt,
        )
        if call.idempotent:
            raise GitHubUnavailable(
                f"GitHub returned {status} for {call.method} {call.path} "
                f"{call.attempt} times ({message}); GitHub is failing, try again "
                "later"
            )
        raise GitHubError(
            f"GitHub returned {status} for {call.method} {call.path} ({message}); "
            "not retried because the request is not idempotent",
            status_code=status,
            installation_id=call.installation_id,
            method=call.method,
            path=call.path,
            headers=response.headers,
        )

    def _error(
        self, response: httpx.Response, message: str, call: _Call
    ) -> GitHubError:
        status = response.status_code
        hint = ""
        if call.installation_id is None and is_time_claim_rejection(status, message):
            hint = (
                f" (even with the clock offset {self._app.clock_offset:.0f} s "
                "taken from GitHub's Date header); check this host's clock"
            )
        return GitHubError(
            f"GitHub returned {status} for {call.method} {call.path}: {message}{hint}",
            status_code=status,
            installation_id=call.installation_id,
            method=call.method,
            path=call.path,
            headers=response.headers,
        )
