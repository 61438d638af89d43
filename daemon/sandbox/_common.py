"""Error responses and timestamp formats shared by the emulator's routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

__all__ = ["DOCS_URL", "APIError", "invalid", "iso8601", "parse_iso8601"]

DOCS_URL = "https://docs.github.com/rest"


class APIError(Exception):
    """An error response with GitHub's ``{"message", "documentation_url"}`` body.

    ``extra`` adds keys to the body (for example ``errors``); ``headers``
    adds response headers (for example ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """Return the JSON body GitHub sends with this status."""
        return {"message": self.message, "documentation_url": DOCS_URL, **self.extra}


def invalid(detail: str) -> APIError:
    """Return the 422 GitHub returns for a body that fails its schema."""
    return APIError(422, f"Invalid request.\n\n{detail}")


def iso8601(timestamp: float) -> str:
    """Format Unix seconds as GitHub does: ``2026-01-02T03:04:05Z``."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso8601(value: object, field: str) -> str:
    """Return an ISO 8601 timestamp from a request in GitHub's format.

    Raises the 422 APIError when ``value`` is not an ISO 8601 string.
    """
    if not isinstance(value, str):
        raise invalid(f"{field!r} must be an ISO 8601 timestamp, not {value!r}.")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise invalid(f"{field!r} is not an ISO 8601 timestamp: {value!r}.") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return iso8601(parsed.timestamp())
