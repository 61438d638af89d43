"""A burst of deliveries for one installation through the lanes' overflow path.

The daemon runs in-process with its real intake over HTTP and its real
SQLite journal. Its job executor is replaced by a recording fake, so what
is under test is intake, journal and lanes: a lane channel with room for 100
is a small part of the burst, and the rest must come back from the journal
in order.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import trio
from fixtures_daemon import pull_request_payload, sign, write_config
from fixtures_emulator import ACCOUNT, INSTALLATION_ID

from daemon.config import load_config
from daemon.routing import JobSpec
from daemon.sandbox import Emulator
from daemon.supervisor import Daemon

BURST = 5000
CONNECTIONS = 4
LANE_CAPACITY = 100
REPO = f"{ACCOUNT}/hello"


class _RecordingExecutor:
    """An executor that records the deliveries it runs, once ``gate`` is set."""

    def __init__(self, gate: trio.Event) -> None:
        self.gate = gate
        self.ran: list[str] = []
        self.other: list[tuple[str, str]] = []

    async def queued(self, job: JobSpec, *, ahead: int) -> None:
        return None

    async def run(self, job: JobSpec) -> None:
        await self.gate.wait()
        self.ran.append(job.delivery.id)

    async def skipped(self, job: JobSpec, *, reason: str) -> None:
        self.other.append(("skipped", job.delivery.id))

    async def cancelled(self, job: JobSpec, *, reason: str) -> None:
        self.other.append(("cancelled", job.delivery.id))

    async def failed(self, job: JobSpec, *, error: BaseException) -> None:
        self.other.append(("failed", job.delivery.id))

    async def interrupted(self, job: JobSpec) -> None:
        self.other.append(("interrupted", job.delivery.id))


def _request(host: str, port: int, number: int, payload: dict[str, Any]) -> bytes:
    """Return one signed delivery as raw HTTP/1.1 with keep-alive."""
    body = json.dumps(payload).encode()
    head = (
        f"POST /webhooks/github HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "X-GitHub-Event: pull_request\r\n"
        f"X-GitHub-Delivery: burst-{number}\r\n"
        f"X-Hub-Signature-256: {sign(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


async def _read_response(
    stream: trio.SocketStream, buffer: bytes
) -> tuple[int, bool, bytes]:
    """Read one response; return its status, whether the server closes, the rest."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the intake closed the connection")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the intake closed the connection mid-response")
        rest += chunk
    return int(lines[0].split()[1]), close, rest[length:]


async def test_burst_runs_in_journal_order(
    emulator: Emulator, app_key_file: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    head = emulator.create_repository(REPO, {"README.md": "hello\n"})
    path = write_config(
        tmp_path,
        emulator=emulator,
        key_file=app_key_file,
        jobs=[{"name": "burst", "on": ["pull_request.opened"], "command": ["true"]}],
        sections={
            "queue": {"lane_capacity": LANE_CAPACITY},
            "logging": {"level": "warning"},
        },
    )
    daemon = Daemon(load_config(path, environ={}), environ={})
    gate = trio.Event()
    executor = _RecordingExecutor(gate)
    daemon.dispatcher.executor = executor
    [url] = await nursery.start(daemon.run)
    with trio.fail_after(30):
        while not daemon.readiness.ready:
            await trio.sleep(0.02)

    # One real payload; each delivery gets its own pull request number, so
    # no delivery supersedes another.
    template = pull_request_payload(
        repository=REPO, number=1, head_sha=head, installation_id=INSTALLATION_ID
    )
    host, port = url.removeprefix("http://").split(":")
    statuses: dict[int, int] = {}
    numbers = iter(range(1, BURST + 1))

    async def send() -> None:
        # hypercorn closes a keep-alive connection after
        # keep_alive_max_requests (1000 by default) with "Connection: close".
        stream: trio.SocketStream | None = None
        buffer = b""
        for number in numbers:
            if stream is None:
                stream = await trio.open_tcp_stream(host, int(port))
                buffer = b""
            template["number"] = template["pull_request"]["number"] = number
            await stream.send_all(_request(host, int(port), number, template))
            status, close, buffer = await _read_response(stream, buffer)
            statuses[status] = statuses.get(status, 0) + 1
            if close:
                await stream.aclose()
                stream = None
        if stream is not None:
            await stream.aclose()

    with trio.fail_after(90):
        async with trio.open_nursery() as senders:
            for _ in range(CONNECTIONS):
                senders.start_soon(send)
    assert statuses == {202: BURST}
    assert len(daemon.dispatcher.lanes) == 1
    [lane] = daemon.dispatcher.lanes.values()
    assert lane.overflowing

    gate.set()

    with trio.fail_after(60):
        while len(executor.ran) < BURST:
            await trio.sleep(0.05)
    with sqlite3.connect(
        f"file:{tmp_path / 'journal.sqlite3'}?mode=ro", uri=True
    ) as db:
        accepted = [
            row[0] for row in db.execute("SELECT id FROM deliveries ORDER BY seq")
        ]
    db.close()
    assert len(accepted) == BURST
    assert executor.ran == accepted
    assert len(set(executor.ran)) == BURST
    assert executor.other == []
    daemon.shutdown()
