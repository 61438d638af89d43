"""Shared fixtures. Area fixtures live in tests/fixtures_*.py plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins: list[str] = ["fixtures_emulator", "fixtures_daemon", "fixtures_process"]

WEBHOOK_FIXTURES = Path(__file__).parent / "fixtures" / "webhooks"


@pytest.fixture
def webhook_fixtures() -> Path:
    return WEBHOOK_FIXTURES
