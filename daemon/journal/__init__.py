"""The durable record of accepted deliveries and of their jobs' states.

A delivery is committed to the journal before the intake sends its 202
response, and the journal returns it after a crash or restart until it is
marked finished. :class:`Journal` is the interface; :class:`SqliteJournal` keeps
it in a SQLite file and :class:`MemoryJournal` in process memory.
"""

from __future__ import annotations

from daemon.journal.interface import (
    JobRecord,
    Journal,
    JournalEntry,
    JournalStatistics,
    JournalStats,
    PruneResult,
    RecordOutcome,
    RecordResult,
    State,
    decode_payload,
)
from daemon.journal.memory import MemoryJournal
from daemon.journal.sqlite import SCHEMA_VERSION, SqliteJournal

__all__ = [
    "SCHEMA_VERSION",
    "JobRecord",
    "Journal",
    "JournalEntry",
    "JournalStatistics",
    "JournalStats",
    "MemoryJournal",
    "PruneResult",
    "RecordOutcome",
    "RecordResult",
    "SqliteJournal",
    "State",
    "decode_payload",
]
