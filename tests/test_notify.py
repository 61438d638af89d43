from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from daemon.notify import Notifier


class _Receiver:
    def __init__(self, sock: trio.socket.SocketType, address: str) -> None:
        self.sock = sock
        self.address = address

    async def receive(self) -> str:
        with trio.fail_after(5):
            data = await self.sock.recv(65536)
        return data.decode()


@pytest.fixture
async def path_receiver(tmp_path: Path) -> AsyncIterator[_Receiver]:
    path = str(tmp_path / "notify")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    with sock:
        yield _Receiver(sock, path)


@pytest.fixture
async def abstract_receiver() -> AsyncIterator[_Receiver]:
    name = "ghappd-test-" + uuid.uuid4().hex
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind("\0" + name)
    with sock:
        yield _Receiver(sock, "@" + name)


async def test_messages_arrive_in_order(path_receiver: _Receiver) -> None:
    notifier = Notifier(notify_socket=path_receiver.address)

    assert await notifier.status("starting")
    assert await notifier.ready()
    assert await notifier.watchdog()
    assert await notifier.stopping()
    notifier.close()

    assert await path_receiver.receive() == "STATUS=starting"
    assert await path_receiver.receive() == "READY=1"
    assert await path_receiver.receive() == "WATCHDOG=1"
    assert await path_receiver.receive() == "STOPPING=1"


async def test_abstract_address_is_used(abstract_receiver: _Receiver) -> None:
    notifier = Notifier(notify_socket=abstract_receiver.address)

    assert await notifier.ready()

    assert await abstract_receiver.receive() == "READY=1"


async def test_status_newlines_become_spaces(path_receiver: _Receiver) -> None:
    notifier = Notifier(notify_socket=path_receiver.address)

    await notifier.status("3 lanes\n2 jobs running")

    assert await path_receiver.receive() == "STATUS=3 lanes 2 jobs running"


async def test_reloading_carries_monotonic_usec(path_receiver: _Receiver) -> None:
    notifier = Notifier(notify_socket=path_receiver.address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    await notifier.reloading()
    await notifier.ready()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    lines = (await path_receiver.receive()).split("\n")
    assert lines[0] == "RELOADING=1"
    assert len(lines) == 2
    name, _, value = lines[1].partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert await path_receiver.receive() == "READY=1"


async def test_no_socket_sends_nothing() -> None:
    notifier = Notifier(notify_socket=None, watchdog_usec=1_000_000)

    assert not notifier.enabled
    assert not await notifier.ready()
    assert notifier.watchdog_interval is None


async def test_unsupported_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        notifier = Notifier(notify_socket="vsock:2:1234")

    assert not notifier.enabled
    assert "vsock:2:1234" in caplog.text


async def test_missing_socket_logs_and_returns_false(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = str(tmp_path / "absent")
    notifier = Notifier(notify_socket=address)

    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        sent = await notifier.ready()

    assert not sent
    assert "READY=1" in caplog.text
    assert address in caplog.text


def test_from_environ_reads_and_unsets() -> None:
    environ = {
        "NOTIFY_SOCKET": "@ghappd-test",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }

    notifier = Notifier.from_environ(environ)

    assert notifier.enabled
    assert notifier.watchdog_interval == 15.0
    assert environ == {"PATH": "/usr/bin"}


def test_from_environ_keeps_when_asked() -> None:
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000"}

    Notifier.from_environ(environ, unset=False)

    assert "NOTIFY_SOCKET" in environ
    assert "WATCHDOG_USEC" in environ


def test_from_environ_ignores_bad_watchdog() -> None:
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "soon"}

    notifier = Notifier.from_environ(environ)

    assert notifier.enabled
    assert notifier.watchdog_interval is None


def test_rejects_nonpositive_watchdog() -> None:
    with pytest.raises(ValueError, match=r"^watchdog_usec=0 is not a positive"):
        Notifier(notify_socket="/run/systemd/notify", watchdog_usec=0)


async def test_watchdog_pings_at_half_timeout(
    path_receiver: _Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    notifier = Notifier(
        notify_socket=path_receiver.address,
        watchdog_usec=4_000_000,
        watchdog_pid=os.getpid(),
    )
    ping_times: list[float] = []

    async def record() -> None:
        while True:
            message = await path_receiver.sock.recv(65536)
            assert message == b"WATCHDOG=1"
            ping_times.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(record)
        await nursery.start(notifier.run_watchdog)
        await trio.sleep(9)
        nursery.cancel_scope.cancel()

    assert [round(t - start, 3) for t in ping_times] == [0.0, 2.0, 4.0, 6.0, 8.0]


async def test_watchdog_off_for_other_pid(
    path_receiver: _Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    notifier = Notifier(
        notify_socket=path_receiver.address,
        watchdog_usec=4_000_000,
        watchdog_pid=os.getpid() + 1,
    )

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run_watchdog)
    await notifier.ready()

    assert notifier.watchdog_interval is None
    assert await path_receiver.receive() == "READY=1"


async def test_watchdog_without_pid_pings(
    path_receiver: _Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    notifier = Notifier(notify_socket=path_receiver.address, watchdog_usec=2_000_000)

    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
        assert await path_receiver.receive() == "WATCHDOG=1"
        nursery.cancel_scope.cancel()

    assert notifier.watchdog_interval == 1.0


async def test_stopping_sent_when_cancelled(path_receiver: _Receiver) -> None:
    notifier = Notifier(notify_socket=path_receiver.address)

    with trio.CancelScope() as scope:
        scope.cancel()
        sent = await notifier.stopping()

    assert sent
    assert await path_receiver.receive() == "STOPPING=1"


def _fill_queue(address: str) -> int:
    count = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        filler.connect(address)
        while True:
            try:
                filler.send(b"FILL=1")
            except BlockingIOError:
                return count
            count += 1


async def test_full_queue_waits_for_room(path_receiver: _Receiver) -> None:
    notifier = Notifier(notify_socket=path_receiver.address)
    await notifier.status("connected")
    assert await path_receiver.receive() == "STATUS=connected"
    queued = _fill_queue(path_receiver.address)
    results: list[bool] = []

    async def send_ready() -> None:
        results.append(await notifier.ready())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_ready)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            messages = [await path_receiver.receive() for _ in range(queued + 1)]

    assert results == [True]
    assert messages[:queued] == ["FILL=1"] * queued
    assert messages[queued] == "READY=1"


async def test_full_queue_times_out(
    path_receiver: _Receiver,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier(notify_socket=path_receiver.address)
    await notifier.status("connected")
    _fill_queue(path_receiver.address)

    start = trio.current_time()
    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        sent = await notifier.ready()

    assert not sent
    assert trio.current_time() - start == pytest.approx(5.0)
    assert "timed out" in caplog.text
