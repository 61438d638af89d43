"""The ghappd command line, run as a subprocess like an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.sandbox import generate_app_key

REPO_ROOT = Path(__file__).parent.parent


def ghappd(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO_ROOT,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def config_dir(tmp_path: Path, app_key_pem: bytes) -> Path:
    (tmp_path / "config.toml").write_text((REPO_ROOT / "config.toml").read_text())
    (tmp_path / "private-key.pem").write_bytes(app_key_pem)
    (tmp_path / "webhook-secret").write_text("do-not-print-me\n")
    return tmp_path


def test_check_config_prints_effective_config(config_dir: Path) -> None:
    result = ghappd("check-config", "--config", str(config_dir / "config.toml"))
    assert result.returncode == 0, result.stderr
    assert "[queue]\nmax_concurrent_jobs = 4" in result.stdout
    assert "do-not-print-me" not in result.stdout + result.stderr
    assert "<secret from " in result.stdout
    assert "valid, 1 job rules" in result.stderr


def test_check_config_reports_errors(config_dir: Path) -> None:
    path = config_dir / "config.toml"
    path.write_text(
        path.read_text().replace("max_concurrent_jobs = 4", "max_concurrent_jobs = 0")
    )
    result = ghappd("check-config", "--config", str(path))
    assert result.returncode == 2
    assert (
        "config.toml: [queue] max_concurrent_jobs must be a positive integer, got 0"
        in result.stderr
    )


def test_check_config_rejects_bad_key(config_dir: Path) -> None:
    (config_dir / "private-key.pem").write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n"
        "-----END OPENSSH PRIVATE KEY-----\n"
    )
    result = ghappd("check-config", "--config", str(config_dir / "config.toml"))
    assert result.returncode == 2
    assert "private-key.pem" in result.stderr
    assert "b3Blbn" not in result.stderr


def test_run_exits_2_on_invalid_config(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[app]\nid = 0\n")
    result = ghappd("run", "--config", str(tmp_path / "config.toml"))
    assert result.returncode == 2
    assert "[app] id must be a positive integer" in result.stderr


def test_version() -> None:
    result = ghappd("version")
    assert result.returncode == 0
    assert result.stdout.startswith("ghappd ")


def test_sandbox_prints_completed_check_run(tmp_path: Path) -> None:
    result = ghappd("sandbox", "--config", str(REPO_ROOT / "config.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status:     completed" in result.stdout
    assert "conclusion: failure" in result.stdout
    assert "F401" in result.stdout
    assert "F821" in result.stdout
    assert "annotations (2):" in result.stdout


def test_generated_key_is_pkcs1() -> None:
    assert generate_app_key().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
