"""``ghappd run`` as a process: signals, startup errors and systemd protocols."""

from __future__ import annotations

import array
import os
import signal
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from fixtures_daemon import pull_request_payload, write_config
from fixtures_emulator import ACCOUNT, INSTALLATION_ID
from fixtures_process import (
    GHAPPD,
    REPO_ROOT,
    SpawnDaemon,
    ends,
    gated_job,
    group_alive,
    read_job_log,
    socket_activation_prefix,
    starts,
    wait_for,
)

from daemon.sandbox import Emulator

REPO = f"{ACCOUNT}/hello"


def _pull_request(emulator: Emulator, number: int = 7) -> dict[str, Any]:
    if REPO not in emulator.repositories:
        emulator.create_repository(REPO, {"README.md": "hello\n"})
    head = emulator.commit(REPO, {f"f{number}.txt": "x\n"}, branch="feature")
    return pull_request_payload(
        repository=REPO, number=number, head_sha=head, installation_id=INSTALLATION_ID
    )


def _write(
    tmp_path: Path,
    emulator: Emulator,
    key: Path,
    jobs: list[dict[str, Any]],
    **sections: dict[str, Any],
) -> Path:
    directory = tmp_path / "daemon"
    directory.mkdir(exist_ok=True)
    return write_config(
        directory, emulator=emulator, key_file=key, jobs=jobs, sections=sections
    )


def _completed(emulator: Emulator, external_id: str) -> list[dict[str, Any]]:
    return [
        run
        for run in emulator.check_runs.values()
        if run["external_id"] == external_id and run["status"] == "completed"
    ]


def _true_job(name: str) -> dict[str, Any]:
    return {"name": name, "on": ["pull_request.opened"], "command": ["true"]}


async def _receive_datagrams(
    sock: trio.socket.SocketType,
    into: list[bytes],
    on_message: Callable[[bytes], None] | None = None,
) -> None:
    """Append every datagram to ``into``, reading memfds passed with SCM_RIGHTS."""
    fds = array.array("i")
    while True:
        data, ancillary, _flags, _address = await sock.recvmsg(
            1 << 20, socket.CMSG_SPACE(fds.itemsize * 4)
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) // 4 * 4])
                for fd in received:
                    with os.fdopen(fd, "rb") as memfd:
                        data = memfd.read()
        into.append(data)
        if on_message is not None:
            on_message(data)


def _bind_datagram(path: Path) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


# -- signals ----------------------------------------------------------------


async def test_sigterm_stops_running_job(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    joblog, gate = tmp_path / "slow.joblog", tmp_path / "gate"
    config = _write(
        tmp_path,
        emulator,
        app_key_file,
        [gated_job("slow", log=joblog, gate=gate)],
        queue={"shutdown_grace": "1s"},
        runner={"kill_grace": "1s", "git_timeout": "30s"},
    )
    first = await spawn_daemon(config)
    payload = _pull_request(emulator)
    response = await first.post("pull_request", payload, delivery_id="term-1")
    assert response.status_code == 202
    await wait_for(lambda: starts(joblog) == [7], what="the job to start")
    queued = await first.post(
        "pull_request", _pull_request(emulator, 8), delivery_id="term-2"
    )
    assert queued.status_code == 202
    [line] = read_job_log(joblog)
    assert line.pgid is not None
    workspaces = tmp_path / "daemon" / "workspaces"
    assert [p for p in workspaces.iterdir() if p.name != ".lock"]

    first.signal(signal.SIGTERM)

    # The bound is shutdown_grace plus kill_grace plus start-up slack.
    assert await first.wait_exit(timeout=15) == 0
    assert not group_alive(line.pgid)
    assert [p.name for p in workspaces.iterdir() if p.name != ".lock"] == []
    assert "shutting down" in first.stderr()
    assert ends(joblog) == []

    gate.touch()
    await spawn_daemon(config)
    await wait_for(
        lambda: (
            _completed(emulator, "term-1:slow") and _completed(emulator, "term-2:slow")
        ),
        what="the interrupted and the queued job",
    )
    assert starts(joblog) == [7, 7, 8]
    for external_id in ("term-1:slow", "term-2:slow"):
        runs = [
            r for r in emulator.check_runs.values() if r["external_id"] == external_id
        ]
        assert len(runs) == 1, external_id
        assert runs[0]["conclusion"] == "success", external_id


async def test_sighup_applies_new_rules(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    config = _write(tmp_path, emulator, app_key_file, [_true_job("first")])
    daemon = await spawn_daemon(config)
    response = await daemon.post(
        "pull_request", _pull_request(emulator, 1), delivery_id="hup-1"
    )
    assert response.status_code == 202
    await wait_for(lambda: _completed(emulator, "hup-1:first"), what="rule first")

    _write(tmp_path, emulator, app_key_file, [_true_job("first"), _true_job("second")])
    daemon.signal(signal.SIGHUP)
    await daemon.wait_log(r"configuration reloaded from .*: job rules: 2")
    await daemon.post("pull_request", _pull_request(emulator, 2), delivery_id="hup-2")

    await wait_for(
        lambda: (
            _completed(emulator, "hup-2:first") and _completed(emulator, "hup-2:second")
        ),
        what="both rules on the new delivery",
    )
    assert not [
        r for r in emulator.check_runs.values() if r["external_id"] == "hup-1:second"
    ]


async def test_sighup_keeps_rules_on_invalid_file(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    config = _write(tmp_path, emulator, app_key_file, [_true_job("first")])
    daemon = await spawn_daemon(config)
    valid = config.read_text()
    config.write_text(
        valid + '\n[[jobs]]\nname = "second"\non = ["pull_request"]\n'
        'command = ["true"]\nbogus_key = 1\n'
    )

    daemon.signal(signal.SIGHUP)

    await daemon.wait_log(r"reload rejected: .*bogus_key")
    response = await daemon.post(
        "pull_request", _pull_request(emulator, 3), delivery_id="hup-3"
    )
    assert response.status_code == 202
    await wait_for(lambda: _completed(emulator, "hup-3:first"), what="the old rule")
    assert not [r for r in emulator.check_runs.values() if r["name"] == "second"]
    assert daemon.running()


# -- startup errors -----------------------------------------------------------


async def _run_to_exit(config: Path, tmp_path: Path) -> trio.CompletedProcess[bytes]:
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with trio.fail_after(30):
        return await trio.run_process(
            [*GHAPPD, "run", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=environment,
            cwd=str(tmp_path),
        )


async def test_corrupt_journal_fails_startup(
    emulator: Emulator, app_key_file: Path, tmp_path: Path
) -> None:
    config = _write(tmp_path, emulator, app_key_file, [])
    journal = tmp_path / "daemon" / "journal.sqlite3"
    content = b"this is not a SQLite database\n" * 200
    journal.write_bytes(content)

    result = await _run_to_exit(config, tmp_path)

    assert result.returncode == 1
    assert str(journal) in result.stderr.decode()
    assert journal.read_bytes() == content


async def test_foreign_database_fails_startup(
    emulator: Emulator, app_key_file: Path, tmp_path: Path
) -> None:
    config = _write(tmp_path, emulator, app_key_file, [])
    journal = tmp_path / "daemon" / "journal.sqlite3"
    with sqlite3.connect(journal) as connection:
        connection.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO photos (name) VALUES ('cat.jpg')")
    connection.close()
    content = journal.read_bytes()

    result = await _run_to_exit(config, tmp_path)

    assert result.returncode == 1
    assert str(journal) in result.stderr.decode()
    assert journal.read_bytes() == content


async def test_unreadable_journal_fails_startup(
    emulator: Emulator, app_key_file: Path, tmp_path: Path
) -> None:
    # A directory in the journal's place cannot be opened even by root.
    config = _write(tmp_path, emulator, app_key_file, [])
    journal = tmp_path / "daemon" / "journal.sqlite3"
    journal.mkdir()
    (journal / "keep").write_text("operator data\n")

    result = await _run_to_exit(config, tmp_path)

    assert result.returncode == 1
    assert str(journal) in result.stderr.decode()
    assert (journal / "keep").read_text() == "operator data\n"


async def test_address_in_use_fails_startup(
    emulator: Emulator, app_key_file: Path, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        host, port = taken.getsockname()
        config = _write(
            tmp_path, emulator, app_key_file, [], server={"listen": [f"{host}:{port}"]}
        )

        result = await _run_to_exit(config, tmp_path)

    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert f"[server] listen: listening on {host}:{port} failed" in stderr
    assert "Traceback" not in stderr


# -- systemd protocols --------------------------------------------------------


async def test_socket_activation_serves_webhook(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    host, port = listener.getsockname()
    config = _write(
        tmp_path,
        emulator,
        app_key_file,
        [_true_job("true")],
        server={"listen": ["fd://3"]},
    )
    try:
        daemon = await spawn_daemon(
            config,
            pass_fds=[listener.fileno()],
            prefix=socket_activation_prefix(listener.fileno()),
        )
    finally:
        listener.close()

    response = await daemon.post(
        "pull_request",
        _pull_request(emulator),
        delivery_id="socket-1",
        url=f"http://{host}:{port}/webhooks/github",
    )

    assert response.status_code == 202
    assert daemon.url == f"http://{host}:{port}"
    await wait_for(lambda: _completed(emulator, "socket-1:true"), what="the job")


async def test_sd_notify_protocol(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    path = tmp_path / "notify"
    sock = _bind_datagram(path)
    await sock.bind(str(path))
    messages: list[bytes] = []
    credentials_before_ready: list[bool] = []

    def on_message(data: bytes) -> None:
        if b"READY=1" in data.split(b"\n"):
            credentials_before_ready.append(
                any(
                    r.method == "GET" and r.path == "/app" and r.status == 200
                    for r in emulator.requests
                )
            )

    # The first credentials check fails, so READY=1 must wait for the retry.
    emulator.inject(method="GET", path="/app", status=401, times=1)
    config = _write(tmp_path, emulator, app_key_file, [])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive_datagrams, sock, messages, on_message)
        daemon = await spawn_daemon(
            config, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        )
        await wait_for(lambda: b"READY=1" in messages, what="READY=1")
        await wait_for(lambda: messages.count(b"WATCHDOG=1") >= 2, what="two pings")

        daemon.signal(signal.SIGTERM)

        assert await daemon.wait_exit() == 0
        await wait_for(lambda: b"STOPPING=1" in messages, what="STOPPING=1")
        nursery.cancel_scope.cancel()
    sock.close()

    assert credentials_before_ready == [True]
    statuses = [m for m in messages if m.startswith(b"STATUS=")]
    assert statuses
    assert messages.index(b"READY=1") < messages.index(b"STOPPING=1")
    app_requests = [r.status for r in emulator.requests if r.path == "/app"]
    assert app_requests[0] == 401


def _journal_fields(datagram: bytes) -> dict[str, str]:
    """Decode one native journal protocol entry into its fields."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, newline, after = rest.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode(errors="replace")
            rest = after
            continue
        # NAME\n, then a little-endian 64-bit length, the value and \n.
        length = int.from_bytes(after[:8], "little")
        fields[line.decode()] = after[8 : 8 + length].decode(errors="replace")
        rest = after[8 + length + 1 :]
        assert newline
    return fields


async def test_journald_records_carry_job_fields(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    path = tmp_path / "journal.socket"
    sock = _bind_datagram(path)
    await sock.bind(str(path))
    datagrams: list[bytes] = []
    leak_job = {
        "name": "leak",
        "on": ["pull_request.opened"],
        "command": ["sh", "-c", 'echo "token is $GITHUB_TOKEN"; exit 1'],
        "token": True,
    }
    config = _write(
        tmp_path,
        emulator,
        app_key_file,
        [leak_job],
        logging={"format": "journal", "level": "debug", "journal_socket": str(path)},
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive_datagrams, sock, datagrams)
        daemon = await spawn_daemon(config, wait_ready=False)

        def ready_url() -> str | None:
            for data in datagrams:
                message = _journal_fields(data).get("MESSAGE", "")
                if message.startswith("ghappd ready on "):
                    return message.removeprefix("ghappd ready on ").split(",")[0]
            return None

        await wait_for(lambda: ready_url() is not None, what="the ready record")
        daemon.url = str(ready_url())
        response = await daemon.post(
            "pull_request", _pull_request(emulator), delivery_id="jd-1"
        )
        assert response.status_code == 202
        await wait_for(lambda: _completed(emulator, "jd-1:leak"), what="the job")
        await wait_for(
            lambda: any(
                "lane 1001 closed" in d.decode(errors="replace") for d in datagrams
            ),
            what="the lane to close",
        )
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        nursery.cancel_scope.cancel()
    sock.close()

    entries = [_journal_fields(d) for d in datagrams]
    in_job = [e for e in entries if e.get("JOB") == "leak"]
    assert in_job
    for entry in in_job:
        assert entry.get("DELIVERY_ID") == "jd-1", entry
        assert entry.get("INSTALLATION_ID") == str(INSTALLATION_ID), entry
        assert entry.get("REPOSITORY") == REPO, entry
    tokens = emulator.tokens_for(INSTALLATION_ID)
    assert tokens
    [run] = _completed(emulator, "jd-1:leak")
    assert "token is" in str(run["output"])
    for token in tokens:
        assert not [d for d in datagrams if token.encode() in d]


async def test_sigterm_without_jobs_exits_zero(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    config = _write(tmp_path, emulator, app_key_file, [])
    daemon = await spawn_daemon(config)
    async with httpx.AsyncClient() as http:
        health = await http.get(f"{daemon.url}/readyz")
    assert health.status_code == 200

    daemon.signal(signal.SIGTERM)

    assert await daemon.wait_exit() == 0
    assert "ghappd stopped" in daemon.stderr()
