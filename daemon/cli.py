"""The ``ghappd`` command line.

Exit codes: 0 success, 1 a runtime failure, 2 invalid configuration or
usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from daemon import __version__
from daemon.config import Config, load_config, parse_duration
from daemon.errors import ConfigError, GhappdError

__all__ = ["format_config", "main"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG = os.environ.get("GHAPPD_CONFIG", "/etc/ghappd/config.toml")


def format_config(config: Config) -> str:
    """Return the effective configuration as a TOML file ghappd can load.

    Every key is shown with its value after defaults and path resolution.
    Secrets appear only as the files they come from, so the output is safe
    to share and can be used as a configuration file itself.
    """
    app = config.app
    lines: list[str] = [f"# effective configuration of {config.path}", "", "[app]"]
    lines.append(f"id = {app.id}")
    if app.client_id is not None:
        lines.append(f"client_id = {_format_value(app.client_id)}")
    lines.append(f"private_key_file = {_format_value(app.private_key.source)}")
    sources = [secret.source for secret in app.webhook_secrets]
    lines.append(f"webhook_secret_files = {_format_value(sources)}")
    lines.append(f"api_url = {_format_value(app.api_url)}")
    lines.append(f"git_url = {_format_value(app.git_url)}")
    for section in dataclasses.fields(config):
        if section.name in ("path", "app", "jobs"):
            continue
        lines += ["", f"[{section.name}]"]
        table = getattr(config, section.name)
        for field in dataclasses.fields(table):
            lines.append(f"{field.name} = {_format_value(getattr(table, field.name))}")
    for rule in config.jobs:
        lines += ["", "[[jobs]]"]
        for field in dataclasses.fields(rule):
            value = getattr(rule, field.name)
            if field.name == "permissions" and not rule.token:
                continue
            if field.name == "secret_env":
                value = {name: secret.source for name, secret in value.items()}
            lines.append(f"{field.name} = {_format_value(value)}")
    return "\n".join(lines) + "\n"


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_format_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(
            f"{json.dumps(k)} = {_format_value(v)}" for k, v in value.items()
        )
        return "{ " + items + " }" if items else "{}"
    return str(value)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        if not Path(path).exists():
            print(
                "give the configuration file with --config FILE, or set GHAPPD_CONFIG",
                file=sys.stderr,
            )
        raise SystemExit(2) from None


def _check_key(config: Config) -> list[str]:
    from daemon.github.app import load_private_key

    try:
        load_private_key(
            config.app.private_key.reveal(), source=str(config.app.private_key_file)
        )
    except GhappdError as exc:
        return [f"{config.path.name}: [app] private_key_file: {exc}"]
    return []


def _command_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    errors = _check_key(config)
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        return 2
    sys.stdout.write(format_config(config))
    print(f"# {args.config}: valid; job rules: {len(config.jobs)}", file=sys.stderr)
    return 0


def _configure_logging(config: Config, secrets: Any = None) -> None:
    from daemon.logs import configure_logging

    configure_logging(
        format=config.logging.format,
        level=config.logging.level,
        journal_socket=config.logging.journal_socket,
        secrets=secrets,
    )


def _command_run(args: argparse.Namespace) -> int:
    from daemon.supervisor import Daemon

    config = _load(args.config)
    _configure_logging(config)
    # systemd's watchdog ends a hung daemon with SIGABRT; faulthandler then
    # writes every thread's stack to stderr, which journald records.
    faulthandler.enable()
    try:
        daemon = Daemon(config)
    except GhappdError as exc:
        log.error("ghappd cannot start: %s", exc)
        return 1
    _configure_logging(config, secrets=daemon.secrets)
    try:
        trio.run(lambda: daemon.run(handle_signals=True))
    except KeyboardInterrupt:
        return 0
    except (GhappdError, BaseExceptionGroup) as exc:
        error = _operational_error(exc)
        if error is None:
            raise
        log.error("ghappd stopped on an error: %s", error)
        return 1
    return 0


def _operational_error(error: BaseException) -> GhappdError | None:
    """Return the GhappdError that ``error`` is or that nested groups wrap alone.

    An error raised inside the daemon's nurseries reaches ``trio.run``
    wrapped in one exception group per nursery.
    """
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, GhappdError) else None


def _command_sandbox(args: argparse.Namespace) -> int:
    from daemon.logs import configure_logging
    from daemon.sandbox.run import run_sandbox

    configure_logging(format="console", level=args.log_level)
    # hypercorn sets its own logger to INFO; the sandbox prints its addresses.
    logging.getLogger("hypercorn.error").setLevel(args.log_level.upper())
    config_path = Path(args.config) if args.config else None
    if config_path is None and Path("config.toml").is_file():
        config_path = Path("config.toml")
    try:
        return trio.run(lambda: run_sandbox(config_path=config_path))
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 2


def _command_receive(args: argparse.Namespace) -> int:
    from daemon.receive import receive

    config = _load(args.config)
    _configure_logging(config)
    body = Path(args.payload).read_bytes()
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"{args.payload}: not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(payload, dict):
        print(f"{args.payload}: the payload must be a JSON object", file=sys.stderr)
        return 2
    from daemon.delivery import Delivery

    delivery = Delivery(
        id=args.delivery or f"receive-{uuid.uuid4()}",
        event=args.event,
        payload=payload,
        body=body,
        received_at=time.time(),
    )
    try:
        return trio.run(lambda: receive(config, delivery))
    except GhappdError as exc:
        log.error("receive failed: %s", exc)
        return 1


def _command_redeliver(args: argparse.Namespace) -> int:
    from daemon.receive import redeliver

    config = _load(args.config)
    _configure_logging(config)
    try:
        since = parse_duration(args.since)
    except ValueError:
        print(
            f"--since must be a duration like 2h or 3d, got {args.since!r}",
            file=sys.stderr,
        )
        return 2
    try:
        asked = trio.run(lambda: redeliver(config, since=since))
    except GhappdError as exc:
        log.error("redeliver failed: %s", exc)
        return 1
    print(f"asked GitHub to redeliver {asked} deliveries")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghappd",
        description="Self-hosted GitHub App daemon: webhooks in, jobs out.",
    )
    parser.add_argument("--version", action="version", version=f"ghappd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            default=DEFAULT_CONFIG,
            help=f"the TOML configuration file (default {DEFAULT_CONFIG})",
        )

    run = commands.add_parser("run", help="run the daemon")
    with_config(run)
    run.set_defaults(handler=_command_run)

    check = commands.add_parser(
        "check-config", help="print the effective configuration, or its errors"
    )
    with_config(check)
    check.set_defaults(handler=_command_check_config)

    sandbox = commands.add_parser(
        "sandbox",
        help="run one pull request through ghappd against a local GitHub emulator",
    )
    sandbox.add_argument(
        "--config",
        help="take the [[jobs]] rules from this file (default: ./config.toml"
        " if it exists, else a built-in ruff job)",
    )
    sandbox.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the daemon's log level (default: %(default)s)",
    )
    sandbox.set_defaults(handler=_command_sandbox)

    receive = commands.add_parser(
        "receive", help="run one payload through the rules and jobs, then exit"
    )
    with_config(receive)
    receive.add_argument(
        "--event", required=True, help="the event name, e.g. pull_request"
    )
    receive.add_argument(
        "--payload", required=True, help="a JSON file with the payload"
    )
    receive.add_argument("--delivery", help="the delivery id (default: a new one)")
    receive.set_defaults(handler=_command_receive)

    redeliver = commands.add_parser(
        "redeliver",
        help="ask GitHub to redeliver failed deliveries the journal never recorded",
    )
    with_config(redeliver)
    redeliver.add_argument(
        "--since", required=True, help="how far back to look, e.g. 6h or 2d"
    )
    redeliver.set_defaults(handler=_command_redeliver)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(handler=lambda args: print(f"ghappd {__version__}") or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result: int = args.handler(args)
    return result
