"""The intake's settings, read again for every request."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["IntakeSettings"]

_RESERVED_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True, kw_only=True)
class IntakeSettings:
    """Limits and secrets for ``POST {webhook_path}``.

    ``max_body_size`` is in bytes; GitHub caps payloads at 25 MB
    (docs.github.com, "Webhook events and payloads"). ``secrets`` lists
    every accepted webhook secret, so a new one can be added before the old
    one is removed. ``retry_after`` is the ``Retry-After`` value in seconds
    sent with a 503. ``body_timeout`` is the time in seconds a client gets
    to send the whole body. GitHub records a delivery as failed when the
    response takes longer than 10 seconds (docs.github.com, "Handling
    failed webhook deliveries"). ``max_concurrent_deliveries`` is the
    number of webhook POSTs handled at once, body reading included. The app
    responds 503 to a POST beyond it before reading its body. The ``repr`` shows
    how many secrets there are, never their value. Raise ValueError for a
    value that cannot work.
    """

    webhook_path: str = "/webhooks/github"
    max_body_size: int = 25 * 1024 * 1024
    secrets: tuple[bytes, ...] = field(repr=False)
    retry_after: int = 5
    body_timeout: float = 10.0
    max_concurrent_deliveries: int = 16

    def __post_init__(self) -> None:
        if not self.webhook_path.startswith("/"):
            raise ValueError(f"webhook_path {self.webhook_path!r} must start with '/'")
        if self.webhook_path in _RESERVED_PATHS:
            raise ValueError(
                f"webhook_path {self.webhook_path!r} is taken by a health check;"
                " choose another path"
            )
        if self.max_body_size <= 0:
            raise ValueError(
                f"max_body_size {self.max_body_size!r} must be a positive byte count"
            )
        if not isinstance(self.secrets, tuple) or not all(
            isinstance(secret, bytes) for secret in self.secrets
        ):
            raise ValueError("secrets must be a tuple of bytes")
        if self.retry_after < 0:
            raise ValueError(
                f"retry_after {self.retry_after!r} must be zero or more seconds"
            )
        if self.body_timeout <= 0:
            raise ValueError(
                f"body_timeout {self.body_timeout!r} must be a positive number"
                " of seconds"
            )
        if (
            not isinstance(self.max_concurrent_deliveries, int)
            or isinstance(self.max_concurrent_deliveries, bool)
            or self.max_concurrent_deliveries <= 0
        ):
            raise ValueError(
                f"max_concurrent_deliveries {self.max_concurrent_deliveries!r}"
                " must be a positive integer"
            )

    def __repr__(self) -> str:
        return (
            f"IntakeSettings(webhook_path={self.webhook_path!r},"
            f" max_body_size={self.max_body_size!r},"
            f" secrets=<{len(self.secrets)} hidden>,"
            f" retry_after={self.retry_after!r},"
            f" body_timeout={self.body_timeout!r},"
            f" max_concurrent_deliveries={self.max_concurrent_deliveries!r})"
        )
