"""``ghappd sandbox``: one pull request through the daemon, end to end.

Everything runs on 127.0.0.1 in a temporary directory: the GitHub
emulator, a repository whose pull request adds code with lint errors, and
the daemon with the job rules of a configuration file. A real
``pull_request.opened`` payload, signed like GitHub signs it, goes to the
daemon's webhook; when the job's check run completes, it is printed.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import secrets
import sys
import tempfile
import tomllib
import uuid
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import httpx
import trio

from daemon.config import load_config
from daemon.errors import ConfigError
from daemon.sandbox.emulator import Emulator, generate_app_key

if TYPE_CHECKING:
    from daemon.supervisor import Daemon

__all__ = ["SANDBOX_REPOSITORY", "run_sandbox", "sandbox_payload"]

log = logging.getLogger(__name__)

APP_ID = 4242
INSTALLATION_ID = 1001
SANDBOX_REPOSITORY = "Codertocat/Hello-World"
PULL_NUMBER = 2
# Seconds to wait for the check runs before giving up.
_WAIT = 120.0

_BASE_FILES = {
    "README.md": "# Hello-World\n\nA repository made by `ghappd sandbox`.\n",
    "hello.py": 'def greet(name: str) -> str:\n    return f"Hello, {name}!"\n',
}
# The pull request's change: an unused import and an undefined name, which
# ruff reports as F401 and F821.
_PULL_FILES = {
    "hello.py": (
        "import os\n\n\n"
        "def greet(name: str) -> str:\n"
        '    return f"Hello, {name}!" + suffix\n'
    ),
}

_BUILTIN_JOBS: list[Mapping[str, Any]] = [
    {
        "name": "ruff",
        "on": ["pull_request.opened", "pull_request.synchronize"],
        "command": ["ruff", "check", "--output-format=github", "."],
        "timeout": "5m",
    }
]


def sandbox_payload(*, head_sha: str, base_sha: str) -> dict[str, Any]:
    """Return the shipped ``pull_request.opened`` payload aimed at the sandbox."""
    text = resources.files("daemon.sandbox").joinpath("pull_request_opened.json")
    payload: dict[str, Any] = copy.deepcopy(json.loads(text.read_text()))
    payload["installation"] = {"id": INSTALLATION_ID, "node_id": "MDIzOkludGVncmF0aW9u"}
    pull = payload["pull_request"]
    pull["number"] = PULL_NUMBER
    payload["number"] = PULL_NUMBER
    pull["head"]["sha"] = head_sha
    pull["head"]["ref"] = "add-suffix"
    pull["base"]["sha"] = base_sha
    pull["base"]["ref"] = "main"
    pull["draft"] = False
    payload["repository"]["full_name"] = SANDBOX_REPOSITORY
    payload["repository"]["default_branch"] = "main"
    return payload


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()
        )
        return "{" + items + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _jobs_toml(jobs: list[Mapping[str, Any]]) -> str:
    lines = []
    for job in jobs:
        lines.append("[[jobs]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in job.items()]
        lines.append("")
    return "\n".join(lines)


def _read_jobs(config_path: Path | None) -> list[Mapping[str, Any]]:
    if config_path is None:
        return _BUILTIN_JOBS
    try:
        data = tomllib.loads(config_path.read_text())
    except OSError as exc:
        raise ConfigError([f"{config_path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{config_path}: invalid TOML: {exc}"]) from None
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise ConfigError([f"{config_path}: has no [[jobs]] for the sandbox to run"])
    if not any(isinstance(job, dict) and _matches_opened(job) for job in jobs):
        raise ConfigError(
            [
                f"{config_path}: no [[jobs]] rule runs on pull_request.opened,"
                " the event the sandbox sends; add one, or use another --config"
            ]
        )
    return jobs


def _write_config(
    directory: Path,
    urls: tuple[str, str],
    jobs: list[Mapping[str, Any]],
    *,
    key: bytes,
    webhook_secret: str,
) -> Path:
    (directory / "private-key.pem").write_bytes(key)
    (directory / "webhook-secret").write_text(webhook_secret)
    path = directory / "sandbox.toml"
    path.write_text(
        "\n".join(
            [
                "[app]",
                f"id = {APP_ID}",
                'private_key_file = "private-key.pem"',
                'webhook_secret_files = ["webhook-secret"]',
                f"api_url = {json.dumps(urls[0])}",
                f"git_url = {json.dumps(urls[1])}",
                "[server]",
                'listen = ["127.0.0.1:0"]',
                "[workspaces]",
                f"root = {json.dumps(str(directory / 'workspaces'))}",
                "[journal]",
                f"path = {json.dumps(str(directory / 'journal.sqlite3'))}",
                "redeliver_missed = false",
                "[logging]",
                'format = "console"',
                "",
                _jobs_toml(jobs),
            ]
        )
    )
    return path


def _check_jobs(
    directory: Path,
    jobs: list[Mapping[str, Any]],
    config_path: Path | None,
    *,
    key: bytes,
    webhook_secret: str,
) -> None:
    """Validate the rules before anything starts; errors name the user's file.

    The rules are copied in order, so ``[[jobs]] #N`` in a message is the
    N-th rule of ``config_path`` too.
    """
    placeholder = ("http://127.0.0.1:1", "http://127.0.0.1:1/git")
    path = _write_config(
        directory, placeholder, jobs, key=key, webhook_secret=webhook_secret
    )
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        label = config_path.name if config_path else "built-in rules"
        prefix = f"{path.name}: "
        raise ConfigError(
            [
                f"{label}: {error.removeprefix(prefix)}"
                for error in exc.errors
                if error.startswith(prefix + "[[jobs]]")
            ]
            or exc.errors
        ) from None


def _sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _print_check_run(run: Mapping[str, Any], out: TextIO) -> None:
    output = run.get("output") or {}
    print(f"check run {run.get('name')!r} on {run.get('head_sha')}", file=out)
    print(f"  status:     {run.get('status')}", file=out)
    print(f"  conclusion: {run.get('conclusion')}", file=out)
    print(f"  title:      {output.get('title')}", file=out)
    summary = str(output.get("summary") or "").strip()
    for line in summary.splitlines():
        print(f"  | {line}", file=out)
    annotations = run.get("annotations") or []
    print(f"  annotations ({len(annotations)}):", file=out)
    for note in annotations:
        first, *rest = str(note.get("message")).splitlines() or [""]
        print(
            f"    {note.get('path')}:{note.get('start_line')}:"
            f" {note.get('annotation_level')}: {first}",
            file=out,
        )
        for line in rest:
            print(f"      {line}", file=out)


async def run_sandbox(*, config_path: Path | None, out: TextIO = sys.stdout) -> int:
    """Run one pull request through the daemon and print its check runs.

    Returns the process exit code: 0 when every check run completed,
    1 otherwise.
    """
    # Imported here: the daemon's modules never import the sandbox, and
    # the sandbox needs the daemon only for this command.
    from daemon.supervisor import Daemon

    jobs = _read_jobs(config_path)
    with tempfile.TemporaryDirectory(prefix="ghappd-sandbox-") as tmp:
        directory = Path(tmp)
        key = generate_app_key()
        webhook_secret = secrets.token_hex(20)
        _check_jobs(
            directory, jobs, config_path, key=key, webhook_secret=webhook_secret
        )
        emulator = Emulator(
            app_id=APP_ID, public_key=key, repos_root=directory / "repos"
        )
        emulator.add_installation(INSTALLATION_ID, account="Codertocat")
        base_sha = emulator.create_repository(SANDBOX_REPOSITORY, _BASE_FILES)
        head_sha = emulator.commit(
            SANDBOX_REPOSITORY,
            _PULL_FILES,
            branch="add-suffix",
            message="Add a suffix to the greeting",
        )
        emulator.pull_ref(SANDBOX_REPOSITORY, PULL_NUMBER, head_sha)
        print(f"sandbox: repository {SANDBOX_REPOSITORY} in {directory}", file=out)
        print(f"sandbox: pull request #{PULL_NUMBER} at {head_sha}", file=out)

        async with trio.open_nursery() as nursery:
            await nursery.start(emulator.serve)
            print(f"sandbox: GitHub emulator on {emulator.api_url}", file=out)
            config_file = _write_config(
                directory,
                (emulator.api_url, emulator.git_url),
                jobs,
                key=key,
                webhook_secret=webhook_secret,
            )
            config = load_config(config_file)
            daemon = Daemon(config, environ={})
            urls = await nursery.start(daemon.run)
            print(f"sandbox: ghappd listening on {urls[0]}", file=out)

            payload = sandbox_payload(head_sha=head_sha, base_sha=base_sha)
            body = json.dumps(payload).encode()
            delivery = str(uuid.uuid4())
            async with httpx.AsyncClient() as http:
                response = await http.post(
                    urls[0] + config.server.webhook_path,
                    content=body,
                    headers={
                        "Content-Type": "application/json",
                        "X-GitHub-Event": "pull_request",
                        "X-GitHub-Delivery": delivery,
                        "X-Hub-Signature-256": _sign(webhook_secret, body),
                        "User-Agent": "GitHub-Hookshot/sandbox",
                    },
                )
            print(
                f"sandbox: POST pull_request.opened delivery {delivery}:"
                f" {response.status_code} {response.text.strip()}",
                file=out,
            )
            names = {job["name"] for job in jobs if _matches_opened(job)}
            runs = await _wait_for_check_runs(emulator, daemon, head_sha, names)
            daemon.shutdown()
            nursery.cancel_scope.cancel()

    print("", file=out)
    for run in runs:
        _print_check_run(run, out)
    complete = len(runs) == len(names) and all(
        r.get("status") == "completed" for r in runs
    )
    if not complete:
        print(
            f"sandbox: expected completed check runs for {sorted(names)},"
            f" got {len(runs)}; see the log above",
            file=out,
        )
    return 0 if complete else 1


def _matches_opened(job: Mapping[str, Any]) -> bool:
    on = job.get("on", [])
    return "pull_request" in on or "pull_request.opened" in on


async def _wait_for_check_runs(
    emulator: Emulator, daemon: Daemon, head_sha: str, names: set[str]
) -> list[dict[str, Any]]:
    """Wait until the check runs are completed and the daemon's lanes closed.

    Annotations arrive in updates after the completion, and a lane closes
    only once its job has sent them.
    """

    def runs() -> list[dict[str, Any]]:
        return [
            run
            for run in emulator.check_runs.values()
            if run.get("head_sha") == head_sha and run.get("name") in names
        ]

    with trio.move_on_after(_WAIT):
        while True:
            done = [run for run in runs() if run.get("status") == "completed"]
            if len(done) == len(names) and not daemon.dispatcher.lanes:
                return done
            await trio.sleep(0.1)
    return runs()
