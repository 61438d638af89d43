"""Records of the requests the emulator served, and the faults it injects."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Fault", "RecordedRequest"]


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the emulator responded to.

    ``time`` is the emulator's clock in Unix seconds when the request
    arrived. ``installation_id`` is set when an installation token
    authenticated the request. ``headers`` has lower-case names. ``body``
    is empty for git requests.
    """

    method: str
    path: str
    status: int
    installation_id: int | None
    time: float
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)

    def json(self) -> Any:
        """Return the request body decoded as JSON."""
        return json.loads(self.body)


@dataclass(slots=True)
class Fault:
    """An injected response and how many more requests it is used for."""

    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: object | None
    remaining: int
    delay: float

    def matches(self, method: str, path: str) -> bool:
        """Return whether the fault applies to a request for ``method`` ``path``."""
        if self.method not in {"*", method}:
            return False
        return fnmatch.fnmatchcase(path, self.path)
