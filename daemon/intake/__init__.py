"""The webhook intake: signature check, parsing, dedup and health checks.

The intake imports nothing of lanes, jobs or the journal. It hands each
verified delivery to a :class:`DeliverySink` and sets the response status
from the sink's :class:`Admission`.
"""

from __future__ import annotations

from daemon.intake.app import create_app
from daemon.intake.dedup import MemorySink
from daemon.intake.readiness import Readiness
from daemon.intake.server import serve_intake
from daemon.intake.settings import IntakeSettings
from daemon.intake.sink import Admission, DeliverySink

__all__ = [
    "Admission",
    "DeliverySink",
    "IntakeSettings",
    "MemorySink",
    "Readiness",
    "create_app",
    "serve_intake",
]
