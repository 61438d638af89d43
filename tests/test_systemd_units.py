from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.config import QueueConfig, RunnerConfig

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = UNITS / "ghappd.service"
SOCKET = UNITS / "ghappd.socket"
EXEC_START = "/opt/ghappd/bin/ghappd"

# Measured with systemd 252 (Debian 12): 1.2. Newer versions add checks,
# so the bound leaves a little room; raising it needs a reason in the
# unit file.
MAX_EXPOSURE = 2.0

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    analyze is None,
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


def _directives(path: Path) -> list[tuple[str, str, str, int]]:
    """Return (section, key, value, line number) for each assignment."""
    section = ""
    result = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            section = stripped.strip("[]")
            continue
        key, _, value = stripped.partition("=")
        result.append((section, key, value, number))
    return result


def _is_directive(line: str) -> bool:
    return bool(line.strip()) and not line.startswith("#")


def _values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v, _ in _directives(path) if s == section and k == key]


def _value(path: Path, section: str, key: str) -> str:
    values = _values(path, section, key)
    assert len(values) == 1, f"{key}= appears {len(values)} times in {path.name}"
    return values[0]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match is not None, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def _copy_units(tmp_path: Path, *, extra_service_line: str = "") -> Path:
    # verify and security check that ExecStart's binary exists, so the
    # copies point it at one that does; the arguments stay.
    service = SERVICE.read_text().replace(
        EXEC_START, shutil.which("true") or "/bin/true"
    )
    if extra_service_line:
        service = service.replace("[Service]\n", f"[Service]\n{extra_service_line}\n")
    (tmp_path / "ghappd.service").write_text(service)
    shutil.copy(SOCKET, tmp_path / "ghappd.socket")
    return tmp_path


def _verify(directory: Path) -> tuple[int, list[str]]:
    assert analyze is not None
    result = subprocess.run(
        [analyze, "verify", "--man=no", "ghappd.service", "ghappd.socket"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # systemd-analyze verify exits 0 on unknown keys and bad values and only
    # prints them, each line naming the unit file.
    problems = [line for line in result.stderr.splitlines() if "ghappd." in line]
    return result.returncode, problems


@needs_analyze
def test_units_pass_verify(tmp_path: Path) -> None:
    returncode, problems = _verify(_copy_units(tmp_path))

    assert problems == []
    assert returncode == 0


@needs_analyze
def test_verify_reports_unknown_key(tmp_path: Path) -> None:
    directory = _copy_units(tmp_path, extra_service_line="ProtectEverything=yes")

    _, problems = _verify(directory)

    assert len(problems) == 1
    assert "ProtectEverything" in problems[0]


@needs_analyze
def test_security_exposure_low(tmp_path: Path) -> None:
    assert analyze is not None
    directory = _copy_units(tmp_path)

    result = subprocess.run(
        [analyze, "security", "--offline=true", "ghappd.service"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
    )

    match = re.search(
        r"Overall exposure level for ghappd\.service: (\d+\.\d+)", result.stdout
    )
    assert match is not None, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE


def test_service_is_notify_with_watchdog() -> None:
    assert _value(SERVICE, "Service", "Type") == "notify"
    assert _seconds(_value(SERVICE, "Service", "WatchdogSec")) > 0
    assert _value(SERVICE, "Service", "Restart") == "on-failure"


def test_service_runs_ghappd_with_config() -> None:
    exec_start = _value(SERVICE, "Service", "ExecStart")

    assert exec_start == f"{EXEC_START} run --config /etc/ghappd/config.toml"


def test_service_reload_sends_sighup() -> None:
    assert _value(SERVICE, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_stop_timeout_outlasts_grace() -> None:
    timeout = _seconds(_value(SERVICE, "Service", "TimeoutStopSec"))

    assert timeout > QueueConfig().shutdown_grace + RunnerConfig().kill_grace
    assert _value(SERVICE, "Service", "KillMode") == "mixed"


def test_service_directories() -> None:
    assert _value(SERVICE, "Service", "DynamicUser") == "yes"
    assert _value(SERVICE, "Service", "StateDirectory") == "ghappd"
    assert _value(SERVICE, "Service", "CacheDirectory") == "ghappd"
    assert _value(SERVICE, "Service", "UMask") == "0077"


def test_credentials_match_example_config() -> None:
    example = (UNITS.parent / "config.toml").read_text()
    names = [
        value.partition(":")[0]
        for value in _values(SERVICE, "Service", "LoadCredential")
    ]

    assert names == ["private-key.pem", "webhook-secret"]
    assert 'private_key_file = "private-key.pem"' in example
    assert 'webhook_secret_files = ["webhook-secret"]' in example


def test_address_families_limited() -> None:
    families = _value(SERVICE, "Service", "RestrictAddressFamilies").split()

    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_every_hardening_line_commented() -> None:
    lines = SERVICE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "--- Hardening" in line)

    uncommented = []
    for section, key, _, number in _directives(SERVICE):
        index = number - 1
        if index <= start or section != "Service":
            continue
        # Walk up through the block of directives this one belongs to.
        above = index - 1
        while above > start and _is_directive(lines[above]):
            above -= 1
        if not lines[above].startswith("#"):
            uncommented.append(key)

    assert uncommented == []


def test_socket_passes_one_listener() -> None:
    assert len(_values(SOCKET, "Socket", "ListenStream")) == 1
    assert _value(SOCKET, "Socket", "Accept") == "no"
    assert int(_value(SOCKET, "Socket", "Backlog")) > 0
    assert _value(SOCKET, "Install", "WantedBy") == "sockets.target"
