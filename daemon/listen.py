"""Turn ``[server] listen`` into hypercorn binds, with systemd socket activation.

With ``ghappd.socket``, systemd opens the listening socket and passes it to
the daemon as an inherited file descriptor, described by ``LISTEN_PID``,
``LISTEN_FDS`` and ``LISTEN_FDNAMES`` (sd_listen_fds(3)). Connections that
arrive while the daemon restarts wait in that socket's kernel backlog.

Entries of ``listen``:

- ``"HOST:PORT"`` (``"[::1]:8080"`` for IPv6): hypercorn binds it itself.
- ``"fd://N"``: inherited descriptor ``N``; ``"fd://NAME"`` picks the
  descriptor whose ``FileDescriptorName=`` is ``NAME``.
- ``"systemd"`` or ``"fd://"``: every inherited descriptor.

hypercorn 0.18 accepts ``fd://N`` binds natively. ``Config._create_sockets``
wraps the descriptor in a socket without binding it, and
``hypercorn.trio.serve`` then serves it like any other bind.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass

from daemon.errors import ConfigError

__all__ = [
    "LISTEN_FDS_START",
    "InheritedFds",
    "check_listening",
    "inherited_fds",
    "prepare_binds",
    "resolve_binds",
    "set_close_on_exec",
]

log = logging.getLogger(__name__)

# sd_listen_fds(3): passed descriptors are numbered from SD_LISTEN_FDS_START.
LISTEN_FDS_START = 3

_ENVIRONMENT_NAMES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_ALL_INHERITED = ("systemd", "fd://")
_HINT = (
    "start ghappd through ghappd.socket (systemctl start ghappd.socket),"
    ' or listen on "HOST:PORT" instead'
)


@dataclass(frozen=True)
class InheritedFds:
    """Listening descriptors passed by systemd, with their names.

    ``names[i]`` is the ``FileDescriptorName=`` of ``fds[i]``, or
    ``"unknown"`` when systemd sent no names (and when ``names`` is left
    empty).
    """

    fds: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.names:
            object.__setattr__(self, "names", ("unknown",) * len(self.fds))
        elif len(self.names) != len(self.fds):
            raise ValueError(
                f"names={self.names!r} does not match fds={self.fds!r} one to one"
            )


def inherited_fds(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    unset: bool = True,
) -> InheritedFds:
    """Parse ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``.

    Follows sd_listen_fds(3): the descriptors count only when
    ``LISTEN_PID`` equals ``pid`` (default :func:`os.getpid`), because the
    variables may have leaked from a parent. With ``unset`` (the default)
    the three variables are removed from ``environ`` (default
    :data:`os.environ`) whatever they contained, so processes started
    later do not take the descriptors for theirs. Malformed values are
    logged and yield no descriptors; nothing is raised.
    """
    env = os.environ if environ is None else environ
    try:
        return _parse(env, os.getpid() if pid is None else pid)
    finally:
        if unset:
            for name in _ENVIRONMENT_NAMES:
                env.pop(name, None)


def _parse(env: MutableMapping[str, str], pid: int) -> InheritedFds:
    listen_pid = env.get("LISTEN_PID")
    listen_fds = env.get("LISTEN_FDS")
    if listen_pid is None or listen_fds is None:
        return InheritedFds()

    if listen_pid != str(pid):
        log.info(
            "ignoring LISTEN_FDS=%r, which is for process %r, not %d",
            listen_fds,
            listen_pid,
            pid,
        )
        return InheritedFds()

    try:
        count = int(listen_fds)
    except ValueError:
        count = -1
    if count < 0:
        log.warning("LISTEN_FDS=%r is not a number of descriptors", listen_fds)
        return InheritedFds()
    fds = tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + count))

    raw_names = env.get("LISTEN_FDNAMES")
    names = tuple(raw_names.split(":")) if raw_names is not None else ()
    if len(names) != count:
        if raw_names is not None:
            log.warning(
                "LISTEN_FDNAMES=%r names %d descriptors but LISTEN_FDS=%d;"
                " ignoring the names",
                raw_names,
                len(names),
                count,
            )
        names = ("unknown",) * count

    log.info("inherited %d listening sockets from systemd: %s", count, names)
    return InheritedFds(fds=fds, names=names)


def resolve_binds(listen: Sequence[str], *, inherited: InheritedFds) -> list[str]:
    """Return hypercorn ``bind`` strings for the ``listen`` entries.

    ``"HOST:PORT"`` entries are returned as given and ``fd://`` entries as
    ``"fd://N"``, in order and without duplicates. Raises
    :class:`~daemon.errors.ConfigError` listing every entry that is not a
    known form, names a descriptor that was not inherited, or requests
    inherited descriptors when there are none.
    """
    binds: list[str] = []
    errors: list[str] = []
    for entry in listen:
        try:
            resolved = _resolve_entry(entry, inherited)
        except ValueError as exc:
            errors.append(f"[server] listen: {entry!r}: {exc}")
            continue
        for bind in resolved:
            if bind not in binds:
                binds.append(bind)
    if errors:
        raise ConfigError(errors)

    unused = [fd for fd in inherited.fds if f"fd://{fd}" not in binds]
    if unused:
        log.warning(
            "inherited sockets %s are not in [server] listen and stay unused", unused
        )
    return binds


def _resolve_entry(entry: str, inherited: InheritedFds) -> list[str]:
    if entry in _ALL_INHERITED:
        if not inherited.fds:
            raise ValueError(f"no sockets were inherited from systemd; {_HINT}")
        return [f"fd://{fd}" for fd in inherited.fds]

    if entry.startswith("fd://"):
        return [f"fd://{_lookup_fd(entry[len('fd://') :], inherited)}"]

    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError('expected "HOST:PORT", "fd://N", "fd://NAME" or "systemd"')
    return [entry]


def _lookup_fd(key: str, inherited: InheritedFds) -> int:
    if not inherited.fds:
        raise ValueError(f"no sockets were inherited from systemd; {_HINT}")

    if key.isdigit():
        fd = int(key)
        if fd not in inherited.fds:
            raise ValueError(
                f"descriptor {fd} was not inherited;"
                f" systemd passed {list(inherited.fds)}"
            )
        return fd

    pairs = zip(inherited.fds, inherited.names, strict=True)
    matches = [fd for fd, name in pairs if name == key]
    if len(matches) != 1:
        raise ValueError(
            f"{len(matches)} inherited sockets are named {key!r}, expected one;"
            f" systemd passed names {list(inherited.names)}"
            " (FileDescriptorName= in the socket unit)"
        )
    return matches[0]


def check_listening(fds: Iterable[int]) -> None:
    """Check that each descriptor is a listening stream socket.

    Raises :class:`~daemon.errors.ConfigError` naming every descriptor
    that is closed, not a socket, not ``SOCK_STREAM`` or not listening
    (for example a ``ListenDatagram=`` or an ``Accept=yes`` connection).
    """
    errors = []
    for fd in fds:
        problem = _listening_problem(fd)
        if problem is not None:
            errors.append(
                f"[server] listen: fd://{fd}: {problem}; the socket unit needs"
                " ListenStream= and Accept=no"
            )
    if errors:
        raise ConfigError(errors)


def _listening_problem(fd: int) -> str | None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        return f"not an open socket ({exc.strerror})"
    with sock:
        if sock.type != socket.SOCK_STREAM:
            return f"socket type is {sock.type!r}, not SOCK_STREAM"
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "socket is not listening"
    return None


def set_close_on_exec(fds: Iterable[int]) -> None:
    """Mark descriptors close-on-exec, so job processes never inherit them.

    Call it for the inherited descriptors again once
    ``hypercorn.trio.serve`` has reported started: hypercorn 0.18's
    ``Config._create_sockets`` calls ``set_inheritable(True)`` on every
    socket it creates, ``fd://`` ones included. Raises :class:`OSError`
    for a closed descriptor.
    """
    for fd in fds:
        os.set_inheritable(fd, False)


def prepare_binds(
    listen: Sequence[str],
    *,
    environ: MutableMapping[str, str] | None = None,
    pid: int | None = None,
) -> tuple[list[str], InheritedFds]:
    """Read the inherited sockets and return hypercorn binds for ``listen``.

    Runs :func:`inherited_fds` (removing the ``LISTEN_*`` variables),
    :func:`check_listening` and :func:`set_close_on_exec` on the
    descriptors, then :func:`resolve_binds`. Returns the binds and the
    inherited descriptors, which the caller marks close-on-exec again
    after hypercorn has started. Raises
    :class:`~daemon.errors.ConfigError` as those functions do.
    """
    inherited = inherited_fds(environ, pid=pid)
    check_listening(inherited.fds)
    set_close_on_exec(inherited.fds)
    return resolve_binds(listen, inherited=inherited), inherited
