"""An in-memory delivery sink that drops repeated delivery ids."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import trio

from daemon.delivery import Delivery
from daemon.intake.sink import Admission

__all__ = ["MemorySink"]

log = logging.getLogger(__name__)


class MemorySink:
    """A bounded seen-set of delivery ids in front of a trio memory channel.

    A delivery whose id was accepted less than ``window`` seconds ago is a
    ``DUPLICATE``. Otherwise the delivery is sent with ``send_nowait``.
    When the channel has no room the result is ``FULL`` and the id is not
    remembered, so a later redelivery of it is accepted. The
    seen-set keeps at most ``max_entries`` ids and forgets the oldest
    first, so under a flood a duplicate older than the newest
    ``max_entries`` ids is accepted again.

    ``clock`` returns seconds; it defaults to :func:`trio.current_time`,
    which follows a test's ``autojump_clock``.
    """

    def __init__(
        self,
        *,
        send_channel: trio.MemorySendChannel[Delivery],
        max_entries: int = 100_000,
        window: float = 3600.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries {max_entries!r} must be at least 1")
        if window <= 0:
            raise ValueError(f"window {window!r} must be a positive number of seconds")
        self._send_channel = send_channel
        self._max_entries = max_entries
        self._window = window
        self._clock = clock
        # delivery id -> clock time of acceptance, oldest first
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        """Return how many delivery ids are remembered now."""
        return len(self._seen)

    async def admit(self, delivery: Delivery) -> Admission:
        """Queue ``delivery`` unless its id was seen or the channel is full.

        Never blocks: the method contains no ``await``, so it executes no
        checkpoint. A closed or broken channel (the consumer is gone, for
        example during shutdown) gives ``FULL`` and one log line.
        """
        now = self._clock()
        self._forget_expired(now)

        if delivery.id in self._seen:
            return Admission.DUPLICATE

        try:
            self._send_channel.send_nowait(delivery)
        except trio.WouldBlock:
            return Admission.FULL
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning(
                "delivery %s not queued: channel unusable (%s)",
                delivery.id,
                type(exc).__name__,
            )
            return Admission.FULL

        self._seen[delivery.id] = now
        if len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)
        return Admission.ACCEPTED

    def _forget_expired(self, now: float) -> None:
        cutoff = now - self._window
        while self._seen:
            oldest_id, accepted_at = next(iter(self._seen.items()))
            if accepted_at > cutoff:
                break
            del self._seen[oldest_id]
