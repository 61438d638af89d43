"""Recognise GitHub's rate-limit responses and the wait each one requests.

The rules are from "Rate limits for the REST API", section "Exceeding the
rate limit" (docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api):

- a limit is announced with status 403 or 429;
- with a ``retry-after`` header, wait that many seconds;
- else with ``x-ratelimit-remaining: 0``, wait until ``x-ratelimit-reset``
  (UTC epoch seconds);
- else a secondary limit (the message says "secondary rate limit") gets at
  least one minute, and exponentially longer while it goes on.

Everything here is pure: the caller passes the current time.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "SECONDARY_MIN_WAIT",
    "RateLimit",
    "parse_rate_limit",
    "server_time",
]

SECONDS = 1.0
SECONDARY_MIN_WAIT = 60 * SECONDS
# Cap on the doubling of waits for a secondary limit that keeps coming back.
SECONDARY_MAX_WAIT = 15 * 60 * SECONDS


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A rate-limit response: which limit, and how long to wait (seconds)."""

    limit: str
    wait: float
    reset_at: datetime
    announced_by: str


def server_time(headers: Mapping[str, str], *, default: float) -> float:
    """Return the Unix time in a response's ``Date`` header, else ``default``."""
    value = headers.get("date")
    if not value:
        return default
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    if parsed.tzinfo is None:
        return default
    return parsed.timestamp()


def _parse_retry_after(value: str, *, now: float) -> float | None:
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        return None
    return max(0.0, parsed.timestamp() - now)


def _limit_name(headers: Mapping[str, str]) -> str:
    resource = headers.get("x-ratelimit-resource")
    total = headers.get("x-ratelimit-limit")
    name = "primary rate limit"
    if resource:
        name += f" for resource {resource!r}"
    if total:
        name += f" ({total} requests an hour)"
    return name


def parse_rate_limit(
    status_code: int,
    headers: Mapping[str, str],
    message: str,
    *,
    now: float,
    secondary_hits: int = 1,
) -> RateLimit | None:
    """Return the rate limit a response announces, or None if it is not one.

    ``headers`` is a case-insensitive mapping (``httpx.Headers``). ``now``
    is GitHub's current Unix time (see :func:`server_time`).
    ``secondary_hits`` counts consecutive secondary-limit responses without
    headers, starting at 1; each doubles the wait from one minute.
    """
    if status_code not in (403, 429):
        return None
    lowered = message.lower()
    secondary = "secondary rate limit" in lowered
    limit = "secondary rate limit" if secondary else _limit_name(headers)

    retry_after = headers.get("retry-after")
    if retry_after is not None:
        wait = _parse_retry_after(retry_after, now=now)
        if wait is not None:
            return _make(limit, wait, now, "the Retry-After header")

    if headers.get("x-ratelimit-remaining", "").strip() == "0":
        try:
            reset = float(headers.get("x-ratelimit-reset", ""))
        except ValueError:
            reset = None
        if reset is not None:
            return _make(
                limit, max(0.0, reset - now), now, "the x-ratelimit-reset header"
            )

    if secondary or status_code == 429 or "rate limit" in lowered:
        wait = min(
            SECONDARY_MIN_WAIT * 2 ** max(0, secondary_hits - 1), SECONDARY_MAX_WAIT
        )
        return _make(limit, wait, now, "the response message")
    return None


def _make(limit: str, wait: float, now: float, announced_by: str) -> RateLimit:
    return RateLimit(
        limit=limit,
        wait=wait,
        reset_at=datetime.fromtimestamp(now + wait, tz=UTC),
        announced_by=announced_by,
    )
