"""A webhook delivery as the intake accepted it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Delivery"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One accepted webhook delivery.

    ``body`` is the raw request body as GitHub sent it (the bytes the
    signature covers); ``payload`` is the decoded JSON object.
    ``received_at`` is a Unix timestamp in seconds.
    """

    id: str
    event: str
    payload: dict[str, Any] = field(repr=False)
    body: bytes = field(repr=False)
    received_at: float
    content_type: str = "application/json"

    @property
    def action(self) -> str | None:
        action = self.payload.get("action")
        return action if isinstance(action, str) else None

    @property
    def installation_id(self) -> int | None:
        installation = self.payload.get("installation")
        if not isinstance(installation, dict):
            return None
        value = installation.get("id")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return None

    @property
    def repository(self) -> str | None:
        repository = self.payload.get("repository")
        if not isinstance(repository, dict):
            return None
        name = repository.get("full_name")
        return name if isinstance(name, str) else None
