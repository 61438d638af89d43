"""The hand-over from the intake to the rest of the daemon."""

from __future__ import annotations

import enum
from typing import Protocol

from daemon.delivery import Delivery

__all__ = ["Admission", "DeliverySink"]


class Admission(enum.Enum):
    """A sink's decision on one delivery."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    FULL = "full"


class DeliverySink(Protocol):
    """The receiver of each verified delivery, such as a queue or a journal."""

    async def admit(self, delivery: Delivery) -> Admission:
        """Take ``delivery`` or decline it, without waiting for any job.

        Return ``ACCEPTED`` once the delivery is queued (and, for a durable
        sink, recorded), ``DUPLICATE`` for an id already queued, and
        ``FULL`` when there is no room now. GitHub waits for the response
        while this call is awaited, and records the delivery as failed after
        10 seconds (docs.github.com, "Handling failed webhook deliveries"),
        so an implementation must never wait on a job, a clone or a GitHub
        API call. A :class:`~daemon.errors.GhappdError` it raises gives a
        503 response. Any other exception propagates as a server error.
        quart-trio cancels the call when the client disconnects, so an
        implementation must leave no half-recorded delivery when cancelled.
        """
        ...
