"""Send signed webhook deliveries over keep-alive HTTP/1.1 and time each one.

The benchmarks in this folder import this module as ``loadgen``: Python
puts the folder of the script it runs on ``sys.path``. The load generator
speaks HTTP/1.1 over raw trio sockets, so its own cost per request is a
``send_all`` and a few ``receive_some`` calls, with no client library in
between. Every loop is bounded by the number of requests and every
request by a timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

__all__ = [
    "LoadResult",
    "ServerClosed",
    "build_requests",
    "process_cpu",
    "read_response",
    "run_load",
    "send_batch",
    "stop_process",
]

_RECEIVE_SIZE = 65536


class ServerClosed(ConnectionError):
    """The server closed the connection before it sent a response head."""


@dataclass(kw_only=True)
class LoadResult:
    """The measured part of one load run against one server process."""

    label: str
    requests: int
    seconds: float
    latencies: list[float]
    statuses: dict[int, int]
    server_cpu: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_per_request(self) -> float:
        """Server CPU seconds (user and system) per measured request."""
        return self.server_cpu / self.requests

    def percentile(self, fraction: float) -> float:
        """Return the latency in seconds below which ``fraction`` of them fall.

        The value is the sorted latency at index ``int(fraction * n)``,
        capped at the last one, with no interpolation.
        """
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, int(fraction * len(ordered)))
        return ordered[index]


def build_requests(
    host: str,
    port: int,
    *,
    path: str,
    body: bytes,
    secret: bytes,
    count: int,
    prefix: str,
) -> list[bytes]:
    """Return ``count`` raw HTTP/1.1 ``pull_request`` deliveries of ``body``.

    Every request carries the delivery id ``{prefix}-{index}`` and the
    ``X-Hub-Signature-256`` header of ``body`` under ``secret``.
    """
    signature = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    requests = []
    for index in range(count):
        head = (
            f"POST {path} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "X-GitHub-Event: pull_request\r\n"
            f"X-GitHub-Delivery: {prefix}-{index}\r\n"
            f"X-Hub-Signature-256: {signature}\r\n"
            "User-Agent: GitHub-Hookshot/bench\r\n"
            "\r\n"
        )
        requests.append(head.encode() + body)
    return requests


async def read_response(
    stream: trio.SocketStream, buffer: bytes
) -> tuple[int, bool, bytes]:
    """Read one response after ``buffer`` and return its status, close flag and rest.

    The close flag is true when the response has ``Connection: close``.
    The rest is what was received after the body, which belongs to the
    next response. The body's length comes from ``Content-Length`` (0
    when missing), so chunked responses are not supported. Raise
    ServerClosed when the stream ends before the head, and
    ConnectionError when it ends inside the body.
    """
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(_RECEIVE_SIZE)
        if not chunk:
            raise ServerClosed("the server closed the connection")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])

    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True

    while len(rest) < length:
        chunk = await stream.receive_some(_RECEIVE_SIZE)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-response")
        rest += chunk
    return status, close, rest[length:]


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buffer = b""

    async def exchange(self, request: bytes, timeout: float) -> int:
        """Send ``request`` and return the status, reconnecting once if closed."""
        for attempt in range(2):
            with trio.fail_after(timeout):
                if self.stream is None:
                    self.stream = await trio.open_tcp_stream(self.host, self.port)
                    self.buffer = b""
                await self.stream.send_all(request)
                try:
                    status, close, self.buffer = await read_response(
                        self.stream, self.buffer
                    )
                except ServerClosed:
                    # The server closed an idle keep-alive connection before
                    # it read the request.
                    await self.stream.aclose()
                    self.stream = None
                    if attempt == 1:
                        raise
                    continue
            if close:
                await self.stream.aclose()
                self.stream = None
            return status
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


async def send_batch(
    host: str,
    port: int,
    batch: list[bytes],
    *,
    connections: int,
    timeout: float,
    latencies: list[float],
    statuses: dict[int, int],
) -> float:
    """Send ``batch`` over ``connections`` connections and return the seconds taken.

    Each connection sends its next request once the previous response is
    read, and appends the request's latency in seconds to ``latencies``
    and counts its status in ``statuses``. hypercorn ends a keep-alive
    connection with ``Connection: close`` after ``keep_alive_max_requests``
    (1000 by default), and the connection then opens a new one. Each
    attempt at a request, connecting included, has ``timeout`` seconds,
    and trio.TooSlowError is raised when it runs out. ServerClosed is
    raised when the server closes the connection twice in a row before
    a response.
    """
    pending: Iterator[bytes] = iter(batch)

    async def worker() -> None:
        connection = _Connection(host, port)
        for request in pending:
            started = time.perf_counter()
            status = await connection.exchange(request, timeout)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
        await connection.aclose()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    return time.perf_counter() - started


async def run_load(
    host: str,
    port: int,
    batch: list[bytes],
    *,
    label: str,
    warmup: int,
    server_pid: int,
    connections: int,
    timeout: float,
) -> LoadResult:
    """Send the first ``warmup`` requests of ``batch``, then measure the rest.

    The result contains the measured requests only, with the CPU time that
    process ``server_pid`` used while they ran. Errors propagate as in
    send_batch.
    """
    await send_batch(
        host,
        port,
        batch[:warmup],
        connections=connections,
        timeout=timeout,
        latencies=[],
        statuses={},
    )

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    cpu_before = process_cpu(server_pid)
    seconds = await send_batch(
        host,
        port,
        batch[warmup:],
        connections=connections,
        timeout=timeout,
        latencies=latencies,
        statuses=statuses,
    )
    cpu = process_cpu(server_pid) - cpu_before
    return LoadResult(
        label=label,
        requests=len(batch) - warmup,
        seconds=seconds,
        latencies=latencies,
        statuses=statuses,
        server_cpu=cpu,
    )


def process_cpu(pid: int) -> float:
    """Return the user plus system CPU seconds process ``pid`` has used.

    Read from ``/proc/PID/stat`` (Linux), in clock ticks of 10 ms on most
    kernels. This depends less than requests per second on what else the
    machine runs, but still moves with it (shared caches, frequency).
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat.rpartition(")")[2].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    return (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")


def stop_process(process: subprocess.Popen[Any], *, timeout: float) -> None:
    """Send SIGTERM to ``process`` and kill it after ``timeout`` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
