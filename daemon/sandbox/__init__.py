"""A local GitHub emulator for ``ghappd sandbox`` and the tests.

No production module imports this package: only the CLI and the tests do.
"""

from __future__ import annotations

from daemon.sandbox.emulator import (
    DEFAULT_EVENTS,
    DEFAULT_PERMISSIONS,
    Emulator,
    RecordedRequest,
    generate_app_key,
)
from daemon.sandbox.payloads import pull_request_opened

__all__ = [
    "DEFAULT_EVENTS",
    "DEFAULT_PERMISSIONS",
    "Emulator",
    "RecordedRequest",
    "generate_app_key",
    "pull_request_opened",
]
