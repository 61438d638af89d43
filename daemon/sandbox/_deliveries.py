"""The App's hook deliveries: the list GitHub keeps, and sending them again.

GitHub's "List deliveries for an app webhook" returns the newest delivery
first and pages with an opaque ``cursor`` named in the ``Link`` header.
"Redeliver a delivery for an app webhook" sends the stored payload again
with the same ``X-GitHub-Delivery`` guid and records a new delivery with
``redelivery: true``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import httpx

from daemon.sandbox._common import APIError, iso8601

__all__ = ["HookDeliveries", "signature"]

log = logging.getLogger(__name__)

_SEND_TIMEOUT = 10.0


def signature(secret: bytes, body: bytes) -> str:
    """Return the ``X-Hub-Signature-256`` value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _timestamp(value: datetime | str | float) -> str:
    if isinstance(value, datetime):
        return iso8601(value.timestamp())
    if isinstance(value, str):
        return iso8601(datetime.fromisoformat(value).timestamp())
    return iso8601(value)


class HookDeliveries:
    """The deliveries of the App's webhook and where they are sent.

    ``clock`` returns the emulator's time in Unix seconds; ``next_id``
    returns a fresh id. ``webhook_url`` and ``webhook_secret`` may change
    at any time; a None secret sends deliveries unsigned.
    """

    def __init__(
        self,
        *,
        app_id: int,
        clock: Callable[[], float],
        next_id: Callable[[], int],
        webhook_url: str | None,
        webhook_secret: bytes | None,
    ) -> None:
        self.app_id = app_id
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.deliveries: list[dict[str, Any]] = []
        self.redelivery_attempts: list[str | int] = []
        self._clock = clock
        self._next_id = next_id
        self._bodies: dict[int, bytes] = {}

    def add(
        self,
        *,
        guid: str,
        event: str,
        action: str | None,
        installation_id: int | None,
        status_code: int,
        payload: object,
        delivered_at: datetime | str | float | None,
        redelivery: bool,
    ) -> int:
        """Record a delivery as the list endpoint shows it and return its id."""
        delivery_id = self._next_id()
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        decoded = json.loads(body) if body else None
        repository = decoded.get("repository") if isinstance(decoded, dict) else None
        self.deliveries.append(
            {
                "id": delivery_id,
                "guid": guid,
                "delivered_at": _timestamp(
                    self._clock() if delivered_at is None else delivered_at
                ),
                "redelivery": redelivery,
                "duration": 0.01,
                "status": "OK" if 200 <= status_code < 300 else "Invalid HTTP Response",
                "status_code": status_code,
                "event": event,
                "action": action,
                "installation_id": installation_id,
                "repository_id": (
                    repository.get("id") if isinstance(repository, dict) else None
                ),
            }
        )
        self._bodies[delivery_id] = body
        return delivery_id

    def find(self, delivery_id: int) -> dict[str, Any]:
        """Return a delivery's detail with its payload; 404 APIError if unknown."""
        for item in self.deliveries:
            if item["id"] == delivery_id:
                body = self._bodies[delivery_id]
                return {
                    **item,
                    "url": self.webhook_url,
                    "request": {"headers": {}, "payload": json.loads(body)},
                    "response": {"headers": {}, "payload": None},
                }
        raise APIError(404, "Not Found")

    def page(
        self, *, per_page: int, cursor: str | None, api_url: str
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Return one page, newest first, and its ``Link`` header or None.

        A cursor is ``v1_<id>`` of the last delivery of the previous page.
        Raises a 422 APIError for a cursor that names no delivery.
        """
        ordered = sorted(
            self.deliveries,
            key=lambda item: (item["delivered_at"], item["id"]),
            reverse=True,
        )
        start = 0
        if cursor:
            ids = [item["id"] for item in ordered]
            try:
                start = ids.index(int(cursor.removeprefix("v1_"))) + 1
            except ValueError:
                raise APIError(422, f"Invalid cursor: {cursor!r}") from None
        page = ordered[start : start + per_page]
        if start + per_page >= len(ordered):
            return page, None
        query = urlencode({"per_page": per_page, "cursor": f"v1_{page[-1]['id']}"})
        return page, f'<{api_url}/app/hook/deliveries?{query}>; rel="next"'

    async def redeliver(self, delivery_id: int) -> int:
        """Send a recorded delivery again; return the new delivery's id.

        The attempt is recorded in ``redelivery_attempts`` first, whether or
        not the receiver responds. Raises a 404 APIError for an unknown id.
        """
        original = next(
            (item for item in self.deliveries if item["id"] == delivery_id), None
        )
        if original is None:
            raise APIError(404, "Not Found")
        self.redelivery_attempts.append(delivery_id)
        body = self._bodies[delivery_id]
        status = await self.post(
            event=original["event"], guid=original["guid"], body=body
        )
        return self.add(
            guid=original["guid"],
            event=original["event"],
            action=original["action"],
            installation_id=original["installation_id"],
            status_code=status,
            payload=body,
            delivered_at=None,
            redelivery=True,
        )

    async def send(self, *, event: str, payload: object, guid: str | None) -> int:
        """Send a new delivery, record it, and return the receiver's status."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        decoded = json.loads(body)
        guid = guid or secrets.token_hex(16)
        status = await self.post(event=event, guid=guid, body=body)
        installation = (
            decoded.get("installation") if isinstance(decoded, dict) else None
        )
        action = decoded.get("action") if isinstance(decoded, dict) else None
        self.add(
            guid=guid,
            event=event,
            action=action if isinstance(action, str) else None,
            installation_id=(
                installation.get("id") if isinstance(installation, dict) else None
            ),
            status_code=status,
            payload=body,
            delivered_at=None,
            redelivery=False,
        )
        return status

    async def post(self, *, event: str, guid: str, body: bytes) -> int:
        """POST one delivery to ``webhook_url``; return its status, 0 if unreachable.

        The headers are those GitHub's "Webhook events and payloads" lists
        under "Delivery headers". The receiver gets 10 seconds to respond.
        """
        if self.webhook_url is None:
            log.info("delivery %s not sent: webhook_url is not set", guid)
            return 0
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/sandbox",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": guid,
            "X-GitHub-Hook-ID": "1",
            "X-GitHub-Hook-Installation-Target-Type": "integration",
            "X-GitHub-Hook-Installation-Target-ID": str(self.app_id),
        }
        if self.webhook_secret is not None:
            headers["X-Hub-Signature-256"] = signature(self.webhook_secret, body)
        try:
            async with httpx.AsyncClient(timeout=_SEND_TIMEOUT) as client:
                response = await client.post(
                    self.webhook_url, content=body, headers=headers
                )
        except httpx.HTTPError as exc:
            log.info("delivery %s to %s failed: %r", guid, self.webhook_url, exc)
            return 0
        log.info("delivery %s got status %d", guid, response.status_code)
        return response.status_code
