from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config, parse_duration, parse_size
from daemon.errors import GhappdError

APP = """
[app]
id = 42
private_key_file = "key.pem"
webhook_secret_files = ["secret"]
"""

JOB = """
[[jobs]]
name = "lint"
on = ["pull_request.opened"]
command = ["ruff", "check", "."]
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "key.pem").write_text("-----BEGIN RSA PRIVATE KEY-----\nx\n")
    (tmp_path / "secret").write_text("s3cret-value\n")
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    return info.value.errors


def test_example_config_loads(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config.toml"
    path = write(tmp_path, example.read_text())
    (tmp_path / "private-key.pem").write_text("key")
    (tmp_path / "webhook-secret").write_text("secret-value")
    config = load_config(path, environ={})
    assert config.app.id == 4242
    assert config.jobs[0].command == ("ruff", "check", "--output-format=github", ".")
    assert config.server.max_body_size == 25 * 1024 * 1024
    assert config.journal.retention == 7 * 86400


def test_defaults_and_secret_masking(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, APP + JOB), environ={})
    assert config.queue.max_concurrent_jobs == 4
    assert config.app.webhook_secrets[0].reveal() == b"s3cret-value"
    assert "s3cret-value" not in repr(config)
    assert config.jobs[0].timeout == 600
    assert config.workspaces.root == tmp_path / "workspaces"
    assert config.journal.path == tmp_path / "journal.sqlite3"


def test_credentials_directory_resolves_secrets(tmp_path: Path) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "key.pem").write_text("other key")
    (credentials / "secret").write_text("rotated-secret")
    path = write(tmp_path, APP)
    config = load_config(
        path,
        environ={
            "CREDENTIALS_DIRECTORY": str(credentials),
            "STATE_DIRECTORY": "/var/lib/ghappd",
            "CACHE_DIRECTORY": "/var/cache/ghappd",
        },
    )
    assert config.app.private_key.reveal() == b"other key"
    assert config.app.webhook_secrets[0].reveal() == b"rotated-secret"
    assert config.journal.path == Path("/var/lib/ghappd/journal.sqlite3")
    assert config.workspaces.root == Path("/var/cache/ghappd/workspaces")


def test_config_error_is_ghappd_error() -> None:
    assert issubclass(ConfigError, GhappdError)


BAD_FILES = [
    (
        APP + "[queue]\nmax_concurrent_jobs = 0\n",
        "config.toml: [queue] max_concurrent_jobs must be a positive integer, got 0",
    ),
    (
        APP + "[queue]\nmax_concurent_jobs = 3\n",
        "config.toml: [queue] max_concurent_jobs: unknown key;"
        " did you mean max_concurrent_jobs?",
    ),
    (
        "[app]\nprivate_key_file = 'key.pem'\nwebhook_secret_files = ['secret']\n",
        "config.toml: [app] id is required: a positive integer (the App ID)",
    ),
    (
        APP.replace("id = 42", 'id = "42"'),
        "config.toml: [app] id must be a positive integer (the App ID), got '42'",
    ),
    (
        APP + '[server]\nmax_body_size = "big"\n',
        "config.toml: [server] max_body_size must be a positive size in bytes or a"
        " string like \"25MiB\", got 'big'",
    ),
    (
        APP + '[queue]\nshutdown_grace = "5 minutes"\n',
        "config.toml: [queue] shutdown_grace must be a duration in seconds or a"
        " string like \"30s\", got '5 minutes'",
    ),
    (
        APP + "[github]\nmax_concurrent_requests = 500\n",
        "config.toml: [github] max_concurrent_requests must be an integer from 1 to"
        " 100 (GitHub's secondary rate limit allows at most 100 concurrent"
        " requests), got 500",
    ),
    (
        APP + '[logging]\nformat = "xml"\n',
        'config.toml: [logging] format must be one of "auto", "journal", "json",'
        " \"console\", got 'xml'",
    ),
    (
        APP + '[server]\nlisten = ["8080"]\n',
        'config.toml: [server] listen must be a non-empty list of "HOST:PORT" or'
        " \"fd://N\" strings, got ['8080']",
    ),
    (
        APP + JOB.replace('["ruff", "check", "."]', '"ruff check ."'),
        "config.toml: [[jobs]] #1 (lint) command must be a non-empty list of"
        " strings (argv), got 'ruff check .'",
    ),
    (
        APP + JOB.replace('["pull_request.opened"]', '["pull request"]'),
        "config.toml: [[jobs]] #1 (lint) on must be a non-empty list like"
        ' ["pull_request.opened", "push"], got [\'pull request\']',
    ),
    (
        APP + JOB + 'timeout = "2h"\ntoken = true\n',
        "config.toml: [[jobs]] #1 (lint) timeout must be at most 55m when"
        " token = true (an installation token lives one hour), got '2h'",
    ),
    (
        APP + JOB + JOB,
        "config.toml: [[jobs]] #2 name 'lint' is used by an earlier job; names"
        " must be unique (they name the check runs)",
    ),
    (
        APP + JOB + 'permissions = { contents = "read" }\n',
        "config.toml: [[jobs]] #1 (lint) permissions is set but token = false;"
        " the command gets no token to use them",
    ),
    (
        APP + JOB + 'permissions = { contents = "admin" }\ntoken = true\n',
        "config.toml: [[jobs]] #1 (lint) permissions must be a table of"
        " permission = \"read\" or \"write\", got {'contents': 'admin'}",
    ),
    (
        APP + JOB + 'env = { GITHUB_TOKEN = "x" }\n',
        'config.toml: [[jobs]] #1 (lint) env must be a table of NAME = "value"'
        " (names other than the GITHUB_* the runner sets), got"
        " {'GITHUB_TOKEN': 'x'}",
    ),
    (
        APP + JOB + 'comand = ["x"]\n',
        "config.toml: [[jobs]] #1 (lint) comand: unknown key; did you mean command?",
    ),
    (
        APP + JOB + 'repositories = ["octo-org"]\n',
        "config.toml: [[jobs]] #1 (lint) repositories must be a list of"
        ' "owner/name" globs like "octo-org/*", got [\'octo-org\']',
    ),
    (
        APP + JOB.replace('["pull_request.opened"]', '["pull_requests"]'),
        "config.toml: [[jobs]] #1 (lint) on names unknown event 'pull_requests' in"
        " 'pull_requests'; did you mean pull_request?",
    ),
    (
        APP + JOB.replace('["pull_request.opened"]', '["pull_request.opend"]'),
        "config.toml: [[jobs]] #1 (lint) on names unknown pull_request action"
        " 'opend' in 'pull_request.opend'; did you mean opened?",
    ),
    (
        APP + "[sever]\n",
        "config.toml: top level: sever: unknown key; did you mean server?",
    ),
    (
        APP.replace('["secret"]', '["missing-secret"]'),
        "config.toml: [app] webhook_secret_files[0] cannot read",
    ),
    (
        APP.replace("api_url", "x") + 'api_url = "ftp://example"\n',
        "config.toml: [app] api_url must be an http(s) URL, got 'ftp://example'",
    ),
    (
        APP + "[github]\nmax_rate_limit_wait = nan\n",
        "config.toml: [github] max_rate_limit_wait must be a duration in seconds"
        ' or a string like "15m", got nan',
    ),
    (
        APP + '[workspaces]\nroot = "a\\u0000b"\n',
        "config.toml: [workspaces] root must be a directory path, got 'a\\x00b'",
    ),
    (
        APP.replace('"key.pem"', '"/dev/zero"'),
        "config.toml: [app] private_key_file file '/dev/zero' is not a regular file",
    ),
    (
        "[app\n",
        "config.toml: invalid TOML:",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_file_message(tmp_path: Path, text: str, message: str) -> None:
    errors = errors_of(tmp_path, text)
    assert any(error.startswith(message) for error in errors), errors


def test_every_error_is_reported(tmp_path: Path) -> None:
    text = APP + "[queue]\nmax_concurrent_jobs = 0\nlane_capacity = -1\n"
    errors = errors_of(tmp_path, text)
    assert len(errors) == 2


def test_empty_secret_file_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, APP)
    (tmp_path / "secret").write_text("  \n")
    with pytest.raises(
        ConfigError,
        match=r"^config\.toml: \[app\] webhook_secret_files\[0\] file .* is empty$",
    ):
        load_config(path, environ={})


def test_short_webhook_secret_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, APP)
    (tmp_path / "secret").write_text("short\n")
    with pytest.raises(
        ConfigError,
        match=r"^config\.toml: \[app\] webhook_secret_files\[0\] file .* holds a"
        r" secret of 5 bytes; use a random string of at least 8 characters$",
    ):
        load_config(path, environ={})


def test_missing_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^/nonexistent/config\.toml: cannot read"):
        load_config("/nonexistent/config.toml", environ={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (30, 30.0),
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("7d", 604800.0),
        ("500ms", 0.5),
        ("2.5", 2.5),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m10", "-5", -1, True, "1h 30", "s"])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [(10, 10), ("25MiB", 25 * 1024**2), ("1GB", 10**9), ("3 kib", 3072)],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_fixture_events_are_known() -> None:
    from daemon.events import KNOWN_EVENTS

    fixtures = Path(__file__).parent / "fixtures" / "webhooks"
    names = {path.stem for path in fixtures.glob("*.json")}
    assert names <= KNOWN_EVENTS, names - KNOWN_EVENTS


def test_unknown_distant_event_accepted(tmp_path: Path) -> None:
    text = APP + JOB.replace('["pull_request.opened"]', '["brand_new_event"]')
    config = load_config(write(tmp_path, text), environ={})
    assert config.jobs[0].on == ("brand_new_event",)
