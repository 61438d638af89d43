"""Context variables that tag every log record with the work in hand.

trio copies the current context into each task it starts, so a value set
in a lane or job task is seen by every log call made inside it. The log
handlers turn these into journald fields (``DELIVERY_ID``, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = [
    "FIELDS",
    "bind",
    "current_fields",
    "delivery_id",
    "event",
    "installation_id",
    "job",
    "repository",
]

delivery_id: ContextVar[str | None] = ContextVar("delivery_id", default=None)
installation_id: ContextVar[int | None] = ContextVar("installation_id", default=None)
event: ContextVar[str | None] = ContextVar("event", default=None)
job: ContextVar[str | None] = ContextVar("job", default=None)
repository: ContextVar[str | None] = ContextVar("repository", default=None)

# journald field name -> variable
FIELDS: dict[str, ContextVar[str | None] | ContextVar[int | None]] = {
    "DELIVERY_ID": delivery_id,
    "INSTALLATION_ID": installation_id,
    "EVENT": event,
    "JOB": job,
    "REPOSITORY": repository,
}


def current_fields() -> dict[str, str]:
    """Return the context fields that are set, as journald field strings."""
    fields = {}
    for name, var in FIELDS.items():
        value = var.get()
        if value is not None:
            fields[name] = str(value)
    return fields


@contextlib.contextmanager
def bind(**values: str | int | None) -> Iterator[None]:
    """Set context variables by their lower-case field names for a block."""
    tokens = []
    try:
        for name, value in values.items():
            var = FIELDS[name.upper()]
            tokens.append((var, var.set(value)))  # type: ignore[arg-type]
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)  # type: ignore[arg-type]
