"""Missed deliveries: the startup scan and ``ghappd redeliver``, as processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
from fixtures_daemon import WEBHOOK_SECRET, pull_request_payload, write_config
from fixtures_emulator import ACCOUNT, INSTALLATION_ID
from fixtures_process import (
    GHAPPD,
    REPO_ROOT,
    DaemonProcess,
    SpawnDaemon,
    socket_activation_prefix,
    wait_for,
)

from daemon.delivery import Delivery
from daemon.journal import SqliteJournal
from daemon.sandbox import Emulator

REPO = f"{ACCOUNT}/hello"
HOURS = 3600.0


@contextmanager
def _listener() -> Iterator[socket.socket]:
    """Yield a listening socket on 127.0.0.1 that outlives each daemon run."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener
    finally:
        listener.close()


def _payload(emulator: Emulator, number: int) -> dict[str, Any]:
    if REPO not in emulator.repositories:
        emulator.create_repository(REPO, {"README.md": "hello\n"})
    head = emulator.commit(REPO, {f"f{number}.txt": "x\n"}, branch="feature")
    return pull_request_payload(
        repository=REPO, number=number, head_sha=head, installation_id=INSTALLATION_ID
    )


def _completed(emulator: Emulator, external_id: str) -> bool:
    return any(
        run["external_id"] == external_id and run["status"] == "completed"
        for run in emulator.check_runs.values()
    )


def _add_failed(
    emulator: Emulator,
    guid: str,
    payload: dict[str, Any],
    *,
    status_code: int,
    delivered_at: float,
) -> int:
    return emulator.add_hook_delivery(
        guid=guid,
        event="pull_request",
        action="opened",
        installation_id=INSTALLATION_ID,
        status_code=status_code,
        payload=payload,
        delivered_at=delivered_at,
    )


async def test_startup_redelivers_missed_once(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    directory = tmp_path / "daemon"
    directory.mkdir()
    config = write_config(
        directory,
        emulator=emulator,
        key_file=app_key_file,
        jobs=[{"name": "true", "on": ["pull_request.opened"], "command": ["true"]}],
        sections={
            "server": {"listen": ["fd://3"]},
            "journal": {"redeliver_missed": True},
            "logging": {"level": "info"},
        },
    )
    with _listener() as listener:
        host, port = listener.getsockname()
        emulator.webhook_url = f"http://{host}:{port}/webhooks/github"
        emulator.webhook_secret = WEBHOOK_SECRET.encode()

        async def start() -> DaemonProcess:
            daemon = await spawn_daemon(
                config,
                pass_fds=[listener.fileno()],
                prefix=socket_activation_prefix(listener.fileno()),
            )
            await daemon.wait_log(r"missed deliveries: \d+ found")
            return daemon

        async def stop(daemon: DaemonProcess) -> None:
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait_exit() == 0

        first = await start()
        seen = await first.post(
            "pull_request", _payload(emulator, 1), delivery_id="seen"
        )
        assert seen.status_code == 202
        await wait_for(lambda: _completed(emulator, "seen:true"), what="the first job")
        await stop(first)

        now = time.time()
        missed = [
            _add_failed(
                emulator,
                "miss-1",
                _payload(emulator, 11),
                status_code=503,
                delivered_at=now - 3,
            ),
            _add_failed(
                emulator,
                "miss-2",
                _payload(emulator, 12),
                status_code=0,
                delivered_at=now - 2,
            ),
            _add_failed(
                emulator,
                "miss-3",
                _payload(emulator, 13),
                status_code=500,
                delivered_at=now - 1,
            ),
        ]
        _add_failed(
            emulator,
            "old",
            _payload(emulator, 14),
            status_code=503,
            delivered_at=now - 2 * HOURS,
        )
        _add_failed(
            emulator,
            "ok",
            _payload(emulator, 15),
            status_code=200,
            delivered_at=now - 2,
        )
        _add_failed(
            emulator,
            "seen",
            _payload(emulator, 1),
            status_code=502,
            delivered_at=now - 2,
        )
        _add_failed(
            emulator,
            "retried",
            _payload(emulator, 16),
            status_code=503,
            delivered_at=now - 3,
        )
        _add_failed(
            emulator,
            "retried",
            _payload(emulator, 16),
            status_code=202,
            delivered_at=now - 1,
        )

        second = await start()
        await wait_for(
            lambda: all(_completed(emulator, f"miss-{n}:true") for n in (1, 2, 3)),
            what="the three redelivered jobs",
        )
        assert emulator.redelivery_attempts == missed
        assert "missed deliveries: 3 found, 3 redelivery requests" in second.stderr()
        await stop(second)

        third = await start()

        assert "missed deliveries: 0 found, 0 redelivery requests" in third.stderr()
        assert emulator.redelivery_attempts == missed
        for guid in ("old", "ok", "retried"):
            assert not _completed(emulator, f"{guid}:true"), guid
        runs = [r["external_id"] for r in emulator.check_runs.values()]
        assert sorted(runs) == [
            "miss-1:true",
            "miss-2:true",
            "miss-3:true",
            "seen:true",
        ]
        await stop(third)


async def test_redeliver_command_asks_for_missed(
    emulator: Emulator, app_key_file: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "daemon"
    directory.mkdir()
    config = write_config(directory, emulator=emulator, key_file=app_key_file, jobs=[])
    known = _payload(emulator, 1)
    async with SqliteJournal(path=directory / "journal.sqlite3") as journal:
        await journal.record(
            Delivery(
                id="known",
                event="pull_request",
                payload=known,
                body=json.dumps(known).encode(),
                received_at=time.time() - 5,
            )
        )
    now = time.time()
    _add_failed(emulator, "known", known, status_code=503, delivered_at=now - 60)
    second = _add_failed(
        emulator,
        "cmd-2",
        _payload(emulator, 2),
        status_code=0,
        delivered_at=now - 20 * 60,
    )
    first = _add_failed(
        emulator,
        "cmd-1",
        _payload(emulator, 3),
        status_code=503,
        delivered_at=now - 30 * 60,
    )
    _add_failed(
        emulator,
        "cmd-old",
        _payload(emulator, 4),
        status_code=503,
        delivered_at=now - 2 * HOURS,
    )
    _add_failed(
        emulator,
        "cmd-ok",
        _payload(emulator, 5),
        status_code=200,
        delivered_at=now - 60,
    )

    with trio.fail_after(30):
        result = await trio.run_process(
            [*GHAPPD, "redeliver", "--since", "1h", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            cwd=str(tmp_path),
        )

    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "asked GitHub to redeliver 2 deliveries\n"
    assert emulator.redelivery_attempts == [first, second]


async def test_redeliver_command_rejects_bad_since(
    emulator: Emulator, app_key_file: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, emulator=emulator, key_file=app_key_file, jobs=[])

    with trio.fail_after(30):
        result = await trio.run_process(
            [*GHAPPD, "redeliver", "--since", "soon", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            cwd=str(tmp_path),
        )

    assert result.returncode == 2
    assert "'soon'" in result.stderr.decode()
    assert emulator.redelivery_attempts == []
