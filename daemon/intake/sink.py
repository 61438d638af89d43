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
    """Where the intake hands each verified delivery."""

    async def admit(self, delivery: Delivery) -> Admission:
        """Take ``delivery`` or decline it, without waiting for any job.

        Return ``ACCEPTED`` once the delivery is queued (and, for a durable
        sink, recorded), ``DUPLICATE`` for an id already queued, and
        ``FULL`` when there is no room now. The intake answers GitHub while
        this call is awaited, and GitHub gives up after 10 seconds, so an
        implementation must never wait on a job, a clone or a GitHub API
        call. A :class:`~daemon.errors.GhappdError` it raises is answered
        503; any other exception propagates as a server error.
        """
        ...
