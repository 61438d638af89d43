"""Tell systemd about start-up, reloads, shutdown and liveness (sd_notify).

The protocol is the one sd_notify(3) documents: each notification is one
datagram of newline-separated ``NAME=value`` assignments, sent over an
``AF_UNIX``/``SOCK_DGRAM`` socket to the address in ``$NOTIFY_SOCKET``. An
address that starts with ``/`` is a filesystem path, one that starts with
``@`` names a socket in the abstract namespace (the ``@`` becomes a NUL
byte). Without ``$NOTIFY_SOCKET`` every method does nothing, so the daemon
runs the same outside systemd.

The watchdog task pings only from inside the trio loop: when the loop is
blocked it cannot ping, so after ``WatchdogSec=`` systemd kills the
service with SIGABRT, and ``Restart=on-failure`` starts it again.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

import trio

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

# A send waits at most this long for room in the receiver's queue. systemd
# reads its notification socket promptly, so a timeout means the service
# manager is stuck. The notification is then dropped and logged.
_SEND_TIMEOUT = 5.0

_ENVIRONMENT_NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Send sd_notify notifications to the service manager.

    The notification methods return ``True`` when the datagram was sent
    and ``False`` when there is no notification socket or sending failed. A failed send
    is logged and never raised: systemd acts on a missing ``READY=1`` or
    ``WATCHDOG=1`` itself, by its own timeouts. Cancellation while a send
    waits for buffer space drops that notification and propagates.
    """

    def __init__(
        self,
        *,
        notify_socket: str | None,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
        pid: int | None = None,
    ) -> None:
        """Create a notifier for the socket address ``notify_socket``.

        ``watchdog_usec`` is the watchdog timeout in microseconds, and
        ``watchdog_pid`` the process it is meant for (``None`` for this
        one); ``pid`` defaults to :func:`os.getpid`. An address that is
        neither a path nor an abstract name (recent systemd versions can
        also pass ``vsock:`` addresses) is logged and disables
        notifications.
        Raises :class:`ValueError` for a watchdog timeout that is not
        positive.
        """
        if watchdog_usec is not None and watchdog_usec <= 0:
            raise ValueError(
                f"watchdog_usec={watchdog_usec!r} is not a positive number"
                " of microseconds; pass None to disable the watchdog"
            )
        self._address = _parse_address(notify_socket)
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._pid = os.getpid() if pid is None else pid
        self._socket: socket.socket | None = None

    @classmethod
    def from_environ(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset: bool = True,
    ) -> Notifier:
        """Create a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
        ``WATCHDOG_PID`` in ``environ`` (default :data:`os.environ`).

        With ``unset`` (the default) the three variables are removed, so
        git and job commands started later do not inherit them, as
        ``unset_environment`` does in sd_notify(3). Malformed watchdog
        values are logged and disable the watchdog.
        """
        env = os.environ if environ is None else environ
        notifier = cls(
            notify_socket=env.get("NOTIFY_SOCKET") or None,
            watchdog_usec=_positive_int(env, "WATCHDOG_USEC"),
            watchdog_pid=_positive_int(env, "WATCHDOG_PID"),
        )
        if unset:
            for name in _ENVIRONMENT_NAMES:
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is configured."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings, or ``None`` without a watchdog.

        sd_watchdog_enabled(3) recommends pinging at half the timeout.
        The watchdog is off when ``WATCHDOG_PID`` names another process.
        """
        if self._address is None or self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != self._pid:
            return None
        return self._watchdog_usec / 1_000_000 / 2

    async def ready(self) -> bool:
        """Send ``READY=1``: start-up (or a reload) has finished."""
        return await self.notify("READY=1")

    async def status(self, text: str) -> bool:
        """Send ``STATUS=text``, the one-line status ``systemctl`` shows.

        Line breaks in ``text`` are replaced by spaces, because a newline
        would end the assignment.
        """
        return await self.notify("STATUS=" + " ".join(text.splitlines()))

    async def stopping(self) -> bool:
        """Send ``STOPPING=1``: shutdown has begun."""
        return await self.notify("STOPPING=1")

    async def reloading(self) -> bool:
        """Send ``RELOADING=1`` with ``MONOTONIC_USEC=``; call :meth:`ready`
        when the reload has finished.

        sd_notify(3) documents ``MONOTONIC_USEC=``, the ``CLOCK_MONOTONIC``
        time in microseconds, as the companion of ``RELOADING=1``: systemd
        253 and later use it to match the reply to the reload they
        requested with ``Type=notify-reload``. Older versions ignore it.
        """
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return await self.notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    async def watchdog(self) -> bool:
        """Send ``WATCHDOG=1``, one liveness ping."""
        return await self.notify("WATCHDOG=1")

    async def notify(self, state: str) -> bool:
        """Send ``state``, newline-separated assignments, as one datagram.

        When the socket has room, the datagram goes out before any
        checkpoint, so ``STOPPING=1`` is sent even from a cancelled scope.
        Otherwise it waits, up to 5 seconds, for the socket to be writable.
        """
        if self._address is None:
            return False
        data = state.encode(errors="replace")
        try:
            sock = self._connect(self._address)
            if _send_nowait(sock, data):
                return True
            with trio.move_on_after(_SEND_TIMEOUT):
                while True:
                    await trio.lowlevel.wait_writable(sock)
                    if _send_nowait(sock, data):
                        return True
        except OSError as exc:
            # A new socket next time, in case systemd replaced its own.
            self.close()
            log.warning(
                "sending %r to notification socket %r failed: %s",
                _first_name(state),
                _display(self._address),
                exc,
            )
            return False
        log.warning(
            "sending %r to notification socket %r timed out after %.0f s",
            _first_name(state),
            _display(self._address),
            _SEND_TIMEOUT,
        )
        return False

    async def run_watchdog(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send ``WATCHDOG=1`` every :attr:`watchdog_interval` seconds.

        Reports started at once. Returns right after starting when the
        watchdog is off (no socket, no ``WATCHDOG_USEC``, or
        ``WATCHDOG_PID`` naming another process); otherwise runs until
        cancelled. The first ping goes out immediately.
        """
        interval = self.watchdog_interval
        task_status.started()
        if interval is None:
            log.debug("watchdog off: no socket, WATCHDOG_USEC or matching WATCHDOG_PID")
            return

        log.info("watchdog started, pinging every %.3f s", interval)
        try:
            while True:
                await self.watchdog()
                await trio.sleep(interval)
        finally:
            log.info("watchdog stopped")

    def _connect(self, address: str | bytes) -> socket.socket:
        # Connected, because Linux's poll() on an AF_UNIX datagram socket
        # waits for room in the receiver's queue only when it is connected.
        if self._socket is None:
            sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
            )
            try:
                sock.setblocking(False)
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            self._socket = sock
        return self._socket

    def close(self) -> None:
        """Close the socket; a later notification opens a new one."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _send_nowait(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.send(data)
    except BlockingIOError:
        return False
    return True


def _parse_address(notify_socket: str | None) -> str | bytes | None:
    if not notify_socket:
        return None
    if notify_socket.startswith("/"):
        return notify_socket
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    log.warning(
        "NOTIFY_SOCKET=%r is neither a path nor an abstract socket name;"
        " sd_notify notifications are off",
        notify_socket,
    )
    return None


def _positive_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("%s=%r is not a positive integer; ignoring it", name, raw)
        return None
    return value


def _first_name(state: str) -> str:
    return state.split("\n", 1)[0]


def _display(address: str | bytes) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode(errors="replace")
    return address
