"""Load the TOML configuration into frozen dataclasses.

Every problem found is collected, so one run of ``ghappd check-config``
lists them all. Each message names the file, the key and the bad value and
says what is expected::

    config.toml: [queue] max_concurrent_jobs must be a positive integer, got 0

Secrets are never in the TOML file: it names files, and relative names
resolve against ``$CREDENTIALS_DIRECTORY`` when it is set (systemd's
``LoadCredential=``), else against the folder of the configuration file.
This module imports nothing of the daemon but its error tree and the
list of GitHub's event names.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from daemon.errors import ConfigError
from daemon.events import KNOWN_EVENTS, PULL_REQUEST_ACTIONS

__all__ = [
    "AppConfig",
    "Config",
    "ConfigError",
    "GitHubConfig",
    "JobRule",
    "JournalConfig",
    "LoggingConfig",
    "QueueConfig",
    "RunnerConfig",
    "Secret",
    "ServerConfig",
    "WorkspacesConfig",
    "load_config",
    "parse_duration",
    "parse_size",
]

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES

# Installation tokens expire one hour after they are minted
# (docs.github.com, "Generating an installation access token for a GitHub
# App"). A command that gets GITHUB_TOKEN needs one valid past its deadline,
# so its timeout plus this margin must fit in that hour.
TOKEN_LIFETIME = 1 * HOURS
TOKEN_MARGIN = 5 * MINUTES

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE = re.compile(r"(\d+)\s*([a-z]*)")
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}")
_EVENT_SPEC = re.compile(r"[a-z_]+(\.[a-z_]+)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PERMISSION_LEVELS = ("read", "write")
_JOURNAL_SOCKET = "/run/systemd/journal/socket"
_DEFAULT_JOB_TIMEOUT = 10 * MINUTES
# Webhook secrets shorter than this are rejected: they are easy to guess,
# and the log redaction filter skips strings this short.
_MIN_WEBHOOK_SECRET = 8
_MAX_SECRET_FILE = 64 * 1024
_NO_TEXT: tuple[str, ...] = ()
_NO_ENV: dict[str, str] = {}

# Variables the runner sets itself; a rule may not override them.
RESERVED_ENV = frozenset(
    {
        "CI",
        "GITHUB_API_URL",
        "GITHUB_EVENT_NAME",
        "GITHUB_EVENT_PATH",
        "GITHUB_REF",
        "GITHUB_REPOSITORY",
        "GITHUB_SERVER_URL",
        "GITHUB_SHA",
        "GITHUB_TOKEN",
        "GITHUB_WORKSPACE",
        "HOME",
        "PATH",
    }
)


class Secret:
    """Bytes read from a credential file; ``repr`` and ``str`` mask them."""

    __slots__ = ("_value", "source")

    def __init__(self, value: bytes, *, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<{len(self._value)} bytes from {self.source}>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class AppConfig:
    id: int
    private_key: Secret
    private_key_file: Path
    webhook_secrets: tuple[Secret, ...]
    client_id: str | None = None
    api_url: str = "https://api.github.com"
    git_url: str = "https://github.com"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[str, ...] = ("127.0.0.1:8080",)
    webhook_path: str = "/webhooks/github"
    max_body_size: int = 25 * 1024 * 1024
    dedup_window: float = 1 * HOURS
    dedup_max_entries: int = 100_000
    max_concurrent_deliveries: int = 16


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_concurrent_jobs: int = 4
    intake_capacity: int = 1000
    lane_capacity: int = 100
    shutdown_grace: float = 30 * SECONDS


@dataclass(frozen=True, slots=True)
class GitHubConfig:
    max_concurrent_requests: int = 16
    max_retries: int = 5
    max_rate_limit_wait: float = 15 * MINUTES
    request_timeout: float = 30 * SECONDS


@dataclass(frozen=True, slots=True)
class WorkspacesConfig:
    root: Path = Path("workspaces")


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    nice: int = 10
    kill_grace: float = 10 * SECONDS
    output_limit: int = 1024 * 1024
    git_timeout: float = 5 * MINUTES
    max_annotations: int = 1000
    sandbox: Literal["none", "bwrap"] = "none"


@dataclass(frozen=True, slots=True)
class JournalConfig:
    enabled: bool = True
    path: Path = Path("journal.sqlite3")
    retention: float = 7 * 86400 * SECONDS
    max_size: int = 1024**3
    redeliver_missed: bool = True
    redeliver_window: float = 3 * 86400 * SECONDS


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: Literal["auto", "journal", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    journal_socket: str = _JOURNAL_SOCKET


@dataclass(frozen=True, slots=True)
class JobRule:
    """One ``[[jobs]]`` table: which deliveries run which command."""

    name: str
    on: tuple[str, ...]
    command: tuple[str, ...]
    timeout: float = _DEFAULT_JOB_TIMEOUT
    repositories: tuple[str, ...] = ()
    skip_drafts: bool = False
    allow_bots: bool = False
    token: bool = False
    permissions: Mapping[str, str] = field(default_factory=lambda: {"contents": "read"})
    report: Literal["auto", "check_run", "comment"] = "auto"
    forks: Literal["restricted", "trusted", "skip"] = "restricted"
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, Secret] = field(default_factory=dict, repr=False)

    def matches_event(self, event: str, action: str | None) -> bool:
        """Return whether ``on`` lists the event, or the event and action."""
        if event in self.on:
            return True
        return action is not None and f"{event}.{action}" in self.on

    def matches_repository(self, full_name: str | None) -> bool:
        """Return whether the repository matches ``repositories`` (empty: all).

        Globs use :func:`fnmatch.fnmatchcase` on the owner and the name
        separately, so ``*`` never crosses the ``/``. GitHub names are
        case-insensitive, so both sides are lower-cased.
        """
        if not self.repositories:
            return True
        if full_name is None:
            return False
        parts = full_name.lower().split("/")
        if len(parts) != 2:
            return False
        for glob in self.repositories:
            patterns = glob.lower().split("/")
            if all(map(fnmatch.fnmatchcase, parts, patterns)):
                return True
        return False


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    app: AppConfig
    server: ServerConfig
    queue: QueueConfig
    github: GitHubConfig
    workspaces: WorkspacesConfig
    runner: RunnerConfig
    journal: JournalConfig
    logging: LoggingConfig
    jobs: tuple[JobRule, ...]


def parse_duration(value: object) -> float:
    """Return seconds from a number of seconds or a string like ``"1h30m"``.

    Raises :class:`ValueError` for anything else, including negative values.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(value)
        return float(value)
    if not isinstance(value, str):
        raise ValueError(value)
    text = value.strip().lower().replace(" ", "")
    if text and text.replace(".", "", 1).isdigit():
        return float(text)
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            raise ValueError(value)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(text):
        raise ValueError(value)
    return total


def parse_size(value: object) -> int:
    """Return bytes from an integer or a string like ``"25MiB"`` or ``"1GB"``."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value
    if not isinstance(value, str):
        raise ValueError(value)
    match = _SIZE.fullmatch(value.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(value)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read and validate the configuration file at ``path``.

    ``environ`` (default ``os.environ``) supplies ``CREDENTIALS_DIRECTORY``,
    ``STATE_DIRECTORY`` and ``CACHE_DIRECTORY``. Raises :class:`ConfigError`
    listing every problem found.
    """
    path = Path(path)
    env = os.environ if environ is None else environ
    label = path.name
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{label}: not valid UTF-8 text"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{label}: invalid TOML: {exc}"]) from None

    loader = _Loader(label=label, base=path.resolve().parent, environ=env)
    config = loader.load(data, path)
    if loader.errors:
        raise ConfigError(loader.errors)
    assert config is not None
    return config


_T = TypeVar("_T")


class _Missing:
    pass


_MISSING = _Missing()


class _Loader:
    """One pass over the TOML document that collects every error."""

    def __init__(self, *, label: str, base: Path, environ: Mapping[str, str]) -> None:
        self.label = label
        self.base = base
        self.environ = environ
        self.errors: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{self.label}: {where} {message}")

    # -- tables --------------------------------------------------------------

    def table(
        self, data: Mapping[str, Any], name: str, known: set[str]
    ) -> Mapping[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.error(f"[{name}]", f"must be a table, got {value!r}")
            return {}
        self.reject_unknown(value, f"[{name}]", known)
        return value

    def reject_unknown(
        self, table: Mapping[str, Any], where: str, known: set[str]
    ) -> None:
        for key in table:
            if key in known:
                continue
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.error(f"{where} {key}:", f"unknown key{hint}")

    def get(
        self,
        table: Mapping[str, Any],
        where: str,
        key: str,
        convert: Callable[[object], _T],
        expected: str,
        default: _T | _Missing = _MISSING,
    ) -> _T | None:
        if key not in table:
            if isinstance(default, _Missing):
                self.error(f"{where} {key}", f"is required: {expected}")
                return None
            return default
        value = table[key]
        try:
            return convert(value)
        except (ValueError, TypeError):
            self.error(f"{where} {key}", f"must be {expected}, got {value!r}")
            return None

    # -- the document --------------------------------------------------------

    def load(self, data: Mapping[str, Any], path: Path) -> Config | None:
        self.reject_unknown(
            data,
            "top level:",
            {
                "app",
                "server",
                "queue",
                "github",
                "workspaces",
                "runner",
                "journal",
                "logging",
                "jobs",
            },
        )
        app = self.load_app(data)
        sections = {name: self.load_section(data, name) for name in _SECTIONS}
        jobs = self.load_jobs(data)
        if self.errors or app is None:
            return None
        return Config(
            path=path,
            app=app,
            jobs=jobs,
            **sections,
        )

    def load_app(self, data: Mapping[str, Any]) -> AppConfig | None:
        where = "[app]"
        if "app" not in data:
            self.error(where, "table is required: it names the App id and its key")
            return None
        table = self.table(
            data,
            "app",
            {
                "id",
                "client_id",
                "private_key_file",
                "webhook_secret_files",
                "api_url",
                "git_url",
            },
        )
        app_id = self.get(
            table, where, "id", _positive_int, "a positive integer (the App ID)"
        )
        client_id = self.get(
            table, where, "client_id", _optional_text, "a non-empty string", None
        )
        api_url = self.get(
            table,
            where,
            "api_url",
            _http_url,
            "an http(s) URL",
            "https://api.github.com",
        )
        git_url = self.get(
            table, where, "git_url", _http_url, "an http(s) URL", "https://github.com"
        )
        key_name = self.get(
            table, where, "private_key_file", _text, "a file name (the App's PEM key)"
        )
        secret_names = self.get(
            table,
            where,
            "webhook_secret_files",
            _text_list,
            "a non-empty list of file names",
        )
        key: Secret | None = None
        key_path: Path | None = None
        if key_name is not None:
            key_path = self.credential_path(key_name)
            key = self.read_secret(where, "private_key_file", key_path)
        secrets: list[Secret] = []
        for index, name in enumerate(secret_names or ()):
            secret = self.read_secret(
                where, f"webhook_secret_files[{index}]", self.credential_path(name)
            )
            if secret is not None:
                secret = Secret(secret.reveal().strip(), source=secret.source)
                if len(secret.reveal()) < _MIN_WEBHOOK_SECRET:
                    self.error(
                        f"{where} webhook_secret_files[{index}]",
                        f"file {secret.source!r} holds a secret of"
                        f" {len(secret.reveal())} bytes; use a random string of"
                        f" at least {_MIN_WEBHOOK_SECRET} characters",
                    )
                    continue
                secrets.append(secret)
        if None in (app_id, key, key_path, api_url, git_url) or not secrets:
            return None
        assert app_id is not None
        assert key is not None
        assert key_path is not None
        assert api_url is not None
        assert git_url is not None
        return AppConfig(
            id=app_id,
            client_id=client_id,
            private_key=key,
            private_key_file=key_path,
            webhook_secrets=tuple(secrets),
            api_url=api_url,
            git_url=git_url,
        )

    def credential_path(self, name: str) -> Path:
        path = Path(name).expanduser()
        if path.is_absolute():
            return path
        credentials = self.environ.get("CREDENTIALS_DIRECTORY")
        if credentials:
            return Path(credentials) / path
        return self.base / path

    def read_secret(self, where: str, key: str, path: Path) -> Secret | None:
        try:
            value = _read_small_file(path)
        except ValueError as exc:
            self.error(f"{where} {key}", f"file {str(path)!r} {exc}")
            return None
        except OSError as exc:
            hint = ""
            if isinstance(exc, FileNotFoundError):
                hint = (
                    "; relative names are looked up in $CREDENTIALS_DIRECTORY,"
                    " else next to the configuration file"
                )
            self.error(
                f"{where} {key}", f"cannot read {str(path)!r}: {exc.strerror}{hint}"
            )
            return None
        if not value.strip():
            self.error(f"{where} {key}", f"file {str(path)!r} is empty")
            return None
        return Secret(value, source=str(path))

    def directory_path(self, value: str, variable: str) -> Path:
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        directory = self.environ.get(variable)
        if directory:
            return Path(directory) / path
        return self.base / path

    def load_section(self, data: Mapping[str, Any], name: str) -> Any:
        """Build the dataclass of table ``[name]`` from its :data:`_SECTIONS` keys."""
        cls, keys = _SECTIONS[name]
        table = self.table(data, name, {key.name for key in keys})
        defaults = cls()
        values: dict[str, object] = {}
        for key in keys:
            default = getattr(defaults, key.name)
            value = self.get(
                table, f"[{name}]", key.name, key.convert, key.expected, default
            )
            if value is None:
                # The error is recorded; the default keeps the rest going.
                value = default
            if key.directory is not None:
                value = self.directory_path(str(value), key.directory)
            values[key.name] = value
        return cls(**values)

    def load_jobs(self, data: Mapping[str, Any]) -> tuple[JobRule, ...]:
        raw = data.get("jobs", [])
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            self.error("[[jobs]]", f"must be an array of tables, got {raw!r}")
            return ()
        rules: list[JobRule] = []
        names: set[str] = set()
        for index, table in enumerate(raw):
            rule = self.load_job(index, table)
            if rule is None:
                continue
            if rule.name in names:
                self.error(
                    f"[[jobs]] #{index + 1} name",
                    f"{rule.name!r} is used by an earlier job; names must be unique"
                    " (they name the check runs)",
                )
                continue
            names.add(rule.name)
            rules.append(rule)
        return tuple(rules)

    def load_job(self, index: int, table: Mapping[str, Any]) -> JobRule | None:
        name = table.get("name")
        label = (
            f"#{index + 1}" if not isinstance(name, str) else f"#{index + 1} ({name})"
        )
        where = f"[[jobs]] {label}"
        self.reject_unknown(
            table,
            where,
            {
                "name",
                "on",
                "command",
                "timeout",
                "repositories",
                "skip_drafts",
                "allow_bots",
                "token",
                "permissions",
                "report",
                "forks",
                "env",
                "secret_env",
            },
        )
        errors_before = len(self.errors)
        name = self.get(
            table,
            where,
            "name",
            _job_name,
            "a name of letters, digits, spaces, '.', '_' or '-' (at most 100)",
        )
        on = self.get(
            table,
            where,
            "on",
            _event_list,
            'a non-empty list like ["pull_request.opened", "push"]',
        )
        command = self.get(
            table, where, "command", _text_list, "a non-empty list of strings (argv)"
        )
        timeout = self.get(
            table,
            where,
            "timeout",
            _positive(parse_duration),
            'a positive duration in seconds or a string like "10m"',
            _DEFAULT_JOB_TIMEOUT,
        )
        repositories = self.get(
            table,
            where,
            "repositories",
            _glob_list,
            'a list of "owner/name" globs like "octo-org/*"',
            _NO_TEXT,
        )
        skip_drafts = self.get(
            table, where, "skip_drafts", _bool, "true or false", False
        )
        allow_bots = self.get(table, where, "allow_bots", _bool, "true or false", False)
        token = self.get(table, where, "token", _bool, "true or false", False)
        permissions = self.get(
            table,
            where,
            "permissions",
            _permissions,
            'a table of permission = "read" or "write"',
            {"contents": "read"},
        )
        report = self.get(
            table,
            where,
            "report",
            _choice("auto", "check_run", "comment"),
            'one of "auto", "check_run", "comment"',
            "auto",
        )
        forks = self.get(
            table,
            where,
            "forks",
            _choice("restricted", "trusted", "skip"),
            'one of "restricted", "trusted", "skip"',
            "restricted",
        )
        env = self.get(
            table,
            where,
            "env",
            _env_table,
            'a table of NAME = "value" (names other than the GITHUB_* the runner sets)',
            _NO_ENV,
        )
        secret_env_names = self.get(
            table,
            where,
            "secret_env",
            _env_table,
            'a table of NAME = "credential file name"',
            _NO_ENV,
        )
        secret_env: dict[str, Secret] = {}
        for variable, file_name in (secret_env_names or {}).items():
            secret = self.read_secret(
                where, f"secret_env.{variable}", self.credential_path(file_name)
            )
            if secret is not None:
                secret_env[variable] = Secret(
                    secret.reveal().strip(), source=secret.source
                )

        for entry in on or ():
            typo = _event_typo(entry)
            if typo is not None:
                self.error(f"{where} on", typo)
        if token and timeout is not None and timeout + TOKEN_MARGIN > TOKEN_LIFETIME:
            limit = int((TOKEN_LIFETIME - TOKEN_MARGIN) // MINUTES)
            self.error(
                f"{where} timeout",
                f"must be at most {limit}m when token = true (an installation"
                f" token lives one hour), got {table.get('timeout')!r}",
            )
        if "permissions" in table and not token:
            self.error(
                f"{where} permissions",
                "is set but token = false; the command gets no token to use them",
            )
        if len(self.errors) != errors_before:
            return None
        assert name is not None
        assert on is not None
        assert command is not None
        assert timeout is not None
        return JobRule(
            name=name,
            on=on,
            command=command,
            timeout=timeout,
            repositories=repositories or (),
            skip_drafts=bool(skip_drafts),
            allow_bots=bool(allow_bots),
            token=bool(token),
            permissions=dict(permissions or {}),
            report=report or "auto",  # type: ignore[arg-type]
            forks=forks or "restricted",  # type: ignore[arg-type]
            env=dict(env or {}),
            secret_env=secret_env,
        )


# -- converters: each raises ValueError or TypeError for a bad value ---------


def _read_small_file(path: Path) -> bytes:
    """Read a credential file; raise ValueError for a special or huge file.

    A FIFO would block and ``/dev/zero`` would never end, so only regular
    files of at most :data:`_MAX_SECRET_FILE` bytes are read.
    """
    with open(path, "rb", opener=_open_nonblocking) as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise ValueError("is not a regular file")
        if status.st_size > _MAX_SECRET_FILE:
            raise ValueError(
                f"is {status.st_size} bytes; a key or secret is at most"
                f" {_MAX_SECRET_FILE} bytes"
            )
        return file.read(_MAX_SECRET_FILE + 1)


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(value)
    return value


def _bounded_int(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(value)
        if not low <= value <= high:
            raise ValueError(value)
        return value

    return convert


def _positive(convert: Callable[[object], _T]) -> Callable[[object], _T]:
    def wrapped(value: object) -> _T:
        result = convert(value)
        if not result > 0:  # type: ignore[operator]
            raise ValueError(value)
        return result

    return wrapped


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError(value)
    return value


def _optional_text(value: object) -> str | None:
    return _text(value)


def _text_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(value)
    return tuple(_text(item) for item in value)


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(value)
        assert isinstance(value, str)
        return value

    return convert


def _http_url(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", text):
        raise ValueError(value)
    return text.rstrip("/")


def _url_path(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", text):
        raise ValueError(value)
    return text


def _listen_list(value: object) -> tuple[str, ...]:
    items = _text_list(value)
    for item in items:
        if item == "systemd" or re.fullmatch(r"fd://[A-Za-z0-9_.:-]*", item):
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(value)
    return items


def _job_name(value: object) -> str:
    if not isinstance(value, str) or not _JOB_NAME.fullmatch(value):
        raise ValueError(value)
    return value


def _event_list(value: object) -> tuple[str, ...]:
    items = _text_list(value)
    for item in items:
        if not _EVENT_SPEC.fullmatch(item):
            raise ValueError(value)
    return items


def _glob_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(value)
    items = tuple(_text(item) for item in value)
    for item in items:
        if item.count("/") != 1 or any(c.isspace() for c in item):
            raise ValueError(value)
    return items


def _permissions(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(value)
    result: dict[str, str] = {}
    for key, level in value.items():
        if not re.fullmatch(r"[a-z_]+", key) or level not in _PERMISSION_LEVELS:
            raise ValueError(value)
        result[key] = level
    return result


def _env_table(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(value)
    result: dict[str, str] = {}
    for key, item in value.items():
        if not _ENV_NAME.fullmatch(key) or key in RESERVED_ENV:
            raise ValueError(value)
        if not isinstance(item, str) or "\0" in item:
            raise ValueError(value)
        result[key] = item
    return result


@dataclass(frozen=True, slots=True)
class _Key:
    """One key of a table: its converter and the expected value, for messages.

    ``directory`` names the environment variable a relative path resolves
    against (else the configuration file's folder).
    """

    name: str
    convert: Callable[[object], object]
    expected: str
    directory: str | None = None


_COUNT = "a positive integer"


def _duration(example: str, *, positive: bool = True) -> str:
    prefix = "a positive duration" if positive else "a duration"
    return f'{prefix} in seconds or a string like "{example}"'


def _size(example: str) -> str:
    return f'a positive size in bytes or a string like "{example}"'


_SECTIONS: dict[str, tuple[type, tuple[_Key, ...]]] = {
    "server": (
        ServerConfig,
        (
            _Key(
                "listen",
                _listen_list,
                'a non-empty list of "HOST:PORT" or "fd://N" strings',
            ),
            _Key("webhook_path", _url_path, 'a URL path starting with "/"'),
            _Key("max_body_size", _positive(parse_size), _size("25MiB")),
            _Key("dedup_window", _positive(parse_duration), _duration("1h")),
            _Key("dedup_max_entries", _positive_int, _COUNT),
            _Key("max_concurrent_deliveries", _positive_int, _COUNT),
        ),
    ),
    "queue": (
        QueueConfig,
        (
            _Key("max_concurrent_jobs", _positive_int, _COUNT),
            _Key("intake_capacity", _positive_int, _COUNT),
            _Key("lane_capacity", _positive_int, _COUNT),
            _Key("shutdown_grace", parse_duration, _duration("30s", positive=False)),
        ),
    ),
    "github": (
        GitHubConfig,
        (
            _Key(
                "max_concurrent_requests",
                _bounded_int(1, 100),
                "an integer from 1 to 100 (GitHub's secondary rate limit allows"
                " at most 100 concurrent requests)",
            ),
            _Key("max_retries", _bounded_int(0, 20), "an integer from 0 to 20"),
            _Key(
                "max_rate_limit_wait",
                parse_duration,
                _duration("15m", positive=False),
            ),
            _Key("request_timeout", _positive(parse_duration), _duration("30s")),
        ),
    ),
    "workspaces": (
        WorkspacesConfig,
        (_Key("root", _text, "a directory path", directory="CACHE_DIRECTORY"),),
    ),
    "runner": (
        RunnerConfig,
        (
            _Key(
                "nice",
                _bounded_int(0, 19),
                "an integer from 0 to 19 (added to the daemon's own niceness)",
            ),
            _Key("kill_grace", parse_duration, _duration("10s", positive=False)),
            _Key("output_limit", _positive(parse_size), _size("1MiB")),
            _Key("git_timeout", _positive(parse_duration), _duration("5m")),
            _Key(
                "max_annotations",
                _bounded_int(0, 100_000),
                "an integer from 0 to 100000",
            ),
            _Key("sandbox", _choice("none", "bwrap"), '"none" or "bwrap"'),
        ),
    ),
    "journal": (
        JournalConfig,
        (
            _Key("enabled", _bool, "true or false"),
            _Key("path", _text, "a file path", directory="STATE_DIRECTORY"),
            _Key("retention", _positive(parse_duration), _duration("7d")),
            _Key("max_size", _positive(parse_size), _size("1GiB")),
            _Key("redeliver_missed", _bool, "true or false"),
            _Key("redeliver_window", _positive(parse_duration), _duration("3d")),
        ),
    ),
    "logging": (
        LoggingConfig,
        (
            _Key(
                "format",
                _choice("auto", "journal", "json", "console"),
                'one of "auto", "journal", "json", "console"',
            ),
            _Key(
                "level",
                _choice("debug", "info", "warning", "error"),
                'one of "debug", "info", "warning", "error"',
            ),
            _Key("journal_socket", _text, "a socket path"),
        ),
    ),
}


def _event_typo(entry: str) -> str | None:
    """Return a message when ``entry`` looks like a misspelt event or action."""
    event, _, action = entry.partition(".")
    if event not in KNOWN_EVENTS:
        close = difflib.get_close_matches(event, KNOWN_EVENTS, n=1, cutoff=0.8)
        if close:
            return (
                f"names unknown event {event!r} in {entry!r}; did you mean {close[0]}?"
            )
    if event == "pull_request" and action and action not in PULL_REQUEST_ACTIONS:
        close = difflib.get_close_matches(action, PULL_REQUEST_ACTIONS, n=1, cutoff=0.7)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"names unknown pull_request action {action!r} in {entry!r}{hint}"
    return None
