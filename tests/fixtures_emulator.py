"""Fixtures that run the GitHub emulator on 127.0.0.1 for a test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from daemon.sandbox import Emulator, generate_app_key

APP_ID = 4242
INSTALLATION_ID = 1001
ACCOUNT = "octo-org"


@pytest.fixture(scope="session")
def app_key_pem() -> bytes:
    """A private key for the App, generated once per test session."""
    return generate_app_key()


@pytest.fixture
def app_key_file(tmp_path: Path, app_key_pem: bytes) -> Path:
    """The App's private key written to a PEM file."""
    path = tmp_path / "app-key.pem"
    path.write_bytes(app_key_pem)
    path.chmod(0o600)
    return path


@pytest.fixture
async def emulator(
    nursery: trio.Nursery, tmp_path: Path, app_key_pem: bytes
) -> AsyncIterator[Emulator]:
    """A serving emulator: App 4242, installation 1001 on octo-org, all repos."""
    github = Emulator(
        app_id=APP_ID, public_key=app_key_pem, repos_root=tmp_path / "repos"
    )
    github.add_installation(INSTALLATION_ID, account=ACCOUNT)
    await nursery.start(github.serve)
    yield github
