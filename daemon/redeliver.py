"""Ask GitHub again for deliveries that failed while the daemon was down.

GitHub does not redeliver a failed webhook by itself. It lists the App's
recent deliveries (``GET /app/hook/deliveries``, newest first, paged by
cursor) and redelivers one on request
(``POST /app/hook/deliveries/{id}/attempts``); both are documented under
"REST API endpoints for GitHub App webhooks" on docs.github.com.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

from daemon.errors import GhappdError
from daemon.github.client import GitHubClient

__all__ = ["KnownDeliveries", "MissedDelivery", "find_missed", "redeliver_missed"]

log = logging.getLogger(__name__)

# Deliveries received up to this many seconds before the last recorded one
# are looked at too, to allow for clock differences with GitHub.
_CLOCK_SLACK = 60.0


class KnownDeliveries(Protocol):
    """The part of the journal the scan reads."""

    async def known(self, ids: Iterable[str]) -> set[str]: ...

    async def last_received_at(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class MissedDelivery:
    """A failed delivery that the journal has never recorded."""

    id: int
    guid: str
    event: str
    delivered_at: float
    status: str


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


async def find_missed(
    *, client: GitHubClient, journal: KnownDeliveries, since: float
) -> list[MissedDelivery]:
    """Return failed deliveries after ``since`` (Unix time) never recorded.

    A guid with any successful attempt (a 2xx response) is not missed, nor
    one the journal knows in any state. The result is oldest first.
    """
    attempts: dict[str, list[dict[str, Any]]] = {}
    pages = cast(
        AsyncGenerator[Any, None],
        client.paginate("/app/hook/deliveries", params={"per_page": 100}),
    )
    try:
        async for item in pages:
            if not isinstance(item, dict):
                continue
            delivered_at = _timestamp(item.get("delivered_at"))
            if delivered_at is None:
                continue
            if delivered_at < since:
                break
            guid = item.get("guid")
            if isinstance(guid, str) and isinstance(item.get("id"), int):
                attempts.setdefault(guid, []).append(item)
    finally:
        await pages.aclose()

    known = await journal.known(attempts)
    missed = []
    for guid, items in attempts.items():
        if guid in known:
            continue
        codes = [item.get("status_code") for item in items]
        if any(isinstance(code, int) and 200 <= code < 300 for code in codes):
            continue
        first = min(items, key=lambda item: _timestamp(item["delivered_at"]) or 0)
        missed.append(
            MissedDelivery(
                id=first["id"],
                guid=guid,
                event=str(first.get("event", "")),
                delivered_at=_timestamp(first["delivered_at"]) or 0.0,
                status=str(first.get("status", "")),
            )
        )
    missed.sort(key=lambda delivery: delivery.delivered_at)
    return missed


async def redeliver_missed(
    *,
    client: GitHubClient,
    journal: KnownDeliveries,
    window: float,
    since: float | None = None,
) -> list[MissedDelivery]:
    """Ask GitHub to redeliver every missed delivery; return those asked for.

    Without ``since``, the scan starts at the last delivery the journal
    recorded, and never looks back further than ``window`` seconds. A
    failed request for one delivery is logged and the others go on.
    """
    now = time.time()
    if since is None:
        last = await journal.last_received_at()
        since = now - window if last is None else max(last - _CLOCK_SLACK, now - window)
    log.info(
        "looking for missed deliveries since %s",
        datetime.fromtimestamp(since).isoformat(timespec="seconds"),
    )
    missed = await find_missed(client=client, journal=journal, since=since)
    asked = []
    for delivery in missed:
        try:
            await client.app_request(
                "POST", f"/app/hook/deliveries/{delivery.id}/attempts", idempotent=True
            )
        except GhappdError as exc:
            log.warning(
                "redelivery of %s (%s, %s) failed: %s",
                delivery.guid,
                delivery.event,
                delivery.status,
                exc,
            )
            continue
        log.info(
            "asked GitHub to redeliver %s (%s, failed with %s)",
            delivery.guid,
            delivery.event,
            delivery.status,
        )
        asked.append(delivery)
    log.info(
        "missed deliveries: %d found, %d redelivery requests", len(missed), len(asked)
    )
    return asked
