"""The ghappd command line, run as a subprocess like an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from fixtures_daemon import fixture_payload, pull_request_payload, write_config
from fixtures_emulator import ACCOUNT, INSTALLATION_ID

from daemon.sandbox import Emulator, generate_app_key

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
    assert f'webhook_secret_files = ["{config_dir}/webhook-secret"]' in result.stdout
    assert "valid; job rules: 1" in result.stderr


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


async def receive(config: Path, payload: Path) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [
            *(sys.executable, "-m", "daemon", "receive", "--config", str(config)),
            *("--event", "pull_request", "--payload", str(payload)),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_receive_runs_one_payload(
    emulator: Emulator, app_key_file: Path, tmp_path: Path
) -> None:
    emulator.create_repository(f"{ACCOUNT}/hello", {"README.md": "hello\n"})
    head = emulator.commit(f"{ACCOUNT}/hello", {"a.py": "x = 1\n"}, branch="feature")
    config = write_config(
        tmp_path,
        emulator=emulator,
        key_file=app_key_file,
        jobs=[{"name": "check", "on": ["pull_request.opened"], "command": ["true"]}],
    )
    payload = tmp_path / "payload.json"
    payload.write_text(
        json.dumps(
            pull_request_payload(
                repository=f"{ACCOUNT}/hello",
                number=3,
                head_sha=head,
                installation_id=INSTALLATION_ID,
            )
        )
    )

    result = await receive(config, payload)

    assert result.returncode == 0, result.stderr.decode()
    assert b"check: success" in result.stdout
    [run] = emulator.check_runs.values()
    assert run["conclusion"] == "success"
    assert run["head_sha"] == head


async def test_receive_without_matching_rule(
    emulator: Emulator, app_key_file: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        emulator=emulator,
        key_file=app_key_file,
        jobs=[{"name": "check", "on": ["push"], "command": ["true"]}],
    )
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps(fixture_payload("pull_request", "opened")))

    result = await receive(config, payload)

    assert result.returncode == 1
    assert b"no rule runs for pull_request.opened" in result.stdout


def test_check_config_output_loads_again(config_dir: Path) -> None:
    first = ghappd("check-config", "--config", str(config_dir / "config.toml"))
    effective = config_dir / "effective.toml"
    effective.write_text(first.stdout)
    second = ghappd("check-config", "--config", str(effective))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[1:] == first.stdout.splitlines()[1:]


def test_sandbox_reports_bad_rules(tmp_path: Path) -> None:
    config = tmp_path / "rules.toml"
    config.write_text(
        '[[jobs]]\nname = "x"\non = ["pull_request.opened"]\ncommand = "ruff"\n'
    )
    result = ghappd("sandbox", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("rules.toml: [[jobs]] #1 (x) command must be")
    assert "Traceback" not in result.stderr


def test_sandbox_needs_opened_rule(tmp_path: Path) -> None:
    config = tmp_path / "rules.toml"
    config.write_text('[[jobs]]\nname = "x"\non = ["push"]\ncommand = ["true"]\n')
    result = ghappd("sandbox", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "no [[jobs]] rule runs on pull_request.opened" in result.stderr
