from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from daemon.errors import ConfigError
from daemon.listen import (
    InheritedFds,
    check_listening,
    inherited_fds,
    prepare_binds,
    resolve_binds,
    set_close_on_exec,
)

PID = 4242
REPO = Path(__file__).resolve().parent.parent


def _environ(**values: str) -> dict[str, str]:
    return {"PATH": "/usr/bin", **values}


# Parsing LISTEN_* ------------------------------------------------------------


def test_inherited_counts_from_three() -> None:
    environ = _environ(LISTEN_PID=str(PID), LISTEN_FDS="2")

    inherited = inherited_fds(environ, pid=PID)

    assert inherited.fds == (3, 4)
    assert inherited.names == ("unknown", "unknown")


def test_inherited_reads_names() -> None:
    environ = _environ(LISTEN_PID=str(PID), LISTEN_FDS="2", LISTEN_FDNAMES="http:admin")

    inherited = inherited_fds(environ, pid=PID)

    assert inherited.names == ("http", "admin")


def test_inherited_unsets_variables() -> None:
    environ = _environ(LISTEN_PID=str(PID), LISTEN_FDS="1", LISTEN_FDNAMES="http")

    inherited_fds(environ, pid=PID)

    assert environ == {"PATH": "/usr/bin"}


def test_inherited_keeps_variables_when_asked() -> None:
    environ = _environ(LISTEN_PID=str(PID), LISTEN_FDS="1")

    inherited_fds(environ, pid=PID, unset=False)

    assert environ["LISTEN_FDS"] == "1"


def test_inherited_ignores_other_pid(caplog: pytest.LogCaptureFixture) -> None:
    environ = _environ(LISTEN_PID=str(PID + 1), LISTEN_FDS="1")

    with caplog.at_level(logging.INFO, logger="daemon.listen"):
        inherited = inherited_fds(environ, pid=PID)

    assert inherited.fds == ()
    assert str(PID + 1) in caplog.text
    assert "LISTEN_PID" not in environ


def test_inherited_needs_listen_pid() -> None:
    inherited = inherited_fds(_environ(LISTEN_FDS="1"), pid=PID)

    assert inherited.fds == ()


def test_inherited_defaults_to_own_pid() -> None:
    environ = _environ(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")

    inherited = inherited_fds(environ)

    assert inherited.fds == (3,)


@pytest.mark.parametrize("value", ["", "two", "-1"])
def test_inherited_rejects_bad_count(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    environ = _environ(LISTEN_PID=str(PID), LISTEN_FDS=value)

    with caplog.at_level(logging.WARNING, logger="daemon.listen"):
        inherited = inherited_fds(environ, pid=PID)

    assert inherited.fds == ()
    assert repr(value) in caplog.text


def test_inherited_zero_count() -> None:
    environ = _environ(LISTEN_PID=str(PID), LISTEN_FDS="0")

    assert inherited_fds(environ, pid=PID).fds == ()


def test_inherited_drops_mismatched_names(caplog: pytest.LogCaptureFixture) -> None:
    environ = _environ(LISTEN_PID=str(PID), LISTEN_FDS="2", LISTEN_FDNAMES="http")

    with caplog.at_level(logging.WARNING, logger="daemon.listen"):
        inherited = inherited_fds(environ, pid=PID)

    assert inherited.names == ("unknown", "unknown")
    assert "'http'" in caplog.text


def test_inherited_fds_rejects_name_mismatch() -> None:
    with pytest.raises(ValueError, match=r"^names=\('a',\) does not match"):
        InheritedFds(fds=(3, 4), names=("a",))


# Resolving [server] listen ------------------------------------------------------


NONE = InheritedFds()
TWO = InheritedFds(fds=(3, 4), names=("http", "admin"))


def test_host_port_stays() -> None:
    binds = resolve_binds(["127.0.0.1:8080", "[::1]:8080"], inherited=NONE)

    assert binds == ["127.0.0.1:8080", "[::1]:8080"]


def test_fd_entry_passes_through() -> None:
    assert resolve_binds(["fd://4"], inherited=TWO) == ["fd://4"]


@pytest.mark.parametrize("entry", ["systemd", "fd://"])
def test_all_inherited_expands(entry: str) -> None:
    assert resolve_binds([entry], inherited=TWO) == ["fd://3", "fd://4"]


def test_fd_name_selects_descriptor() -> None:
    assert resolve_binds(["fd://admin"], inherited=TWO) == ["fd://4"]


def test_duplicates_collapse() -> None:
    binds = resolve_binds(["fd://3", "systemd", "fd://http"], inherited=TWO)

    assert binds == ["fd://3", "fd://4"]


def test_unused_inherited_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="daemon.listen"):
        resolve_binds(["fd://3"], inherited=TWO)

    assert "[4]" in caplog.text


def test_fd_without_inherited_names_socket_unit() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^\[server\] listen: 'fd://3': no sockets were inherited from"
        r" systemd; start ghappd through ghappd\.socket",
    ):
        resolve_binds(["fd://3"], inherited=NONE)


def test_systemd_without_inherited_fails() -> None:
    with pytest.raises(ConfigError, match=r"^\[server\] listen: 'systemd': no sock"):
        resolve_binds(["systemd"], inherited=NONE)


def test_fd_not_inherited_fails() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^\[server\] listen: 'fd://7': descriptor 7 was not inherited;"
        r" systemd passed \[3, 4\]$",
    ):
        resolve_binds(["fd://7"], inherited=TWO)


def test_unknown_fd_name_fails() -> None:
    with pytest.raises(ConfigError, match=r"^\[server\] listen: 'fd://web': 0 inh"):
        resolve_binds(["fd://web"], inherited=TWO)


@pytest.mark.parametrize("entry", ["localhost", ":8080", "host:http", "h:70000"])
def test_malformed_entry_fails(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"^\[server\] listen: .* expected"):
        resolve_binds([entry], inherited=NONE)


def test_every_bad_entry_is_listed() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_binds(["fd://3", "nonsense", "127.0.0.1:1"], inherited=NONE)

    assert len(info.value.errors) == 2


# Descriptor checks -------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_check_accepts_listener(listener: socket.socket) -> None:
    check_listening([listener.fileno()])


def test_check_rejects_datagram() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fd = sock.fileno()
        with pytest.raises(ConfigError, match=rf"^\[server\] listen: fd://{fd}: .*"):
            check_listening([fd])


def test_check_rejects_unlistened_stream() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        fd = sock.fileno()
        with pytest.raises(
            ConfigError, match=rf"^\[server\] listen: fd://{fd}: socket is not listen"
        ):
            check_listening([fd])


def test_check_rejects_regular_file(tmp_path: Path) -> None:
    with open(tmp_path / "file", "w") as file:
        fd = file.fileno()
        with pytest.raises(
            ConfigError, match=rf"^\[server\] listen: fd://{fd}: not an open socket"
        ):
            check_listening([fd])


def test_close_on_exec_set(listener: socket.socket) -> None:
    listener.set_inheritable(True)

    set_close_on_exec([listener.fileno()])

    assert not listener.get_inheritable()


def test_prepare_binds_without_systemd() -> None:
    environ = _environ()

    binds, inherited = prepare_binds(["127.0.0.1:8080"], environ=environ, pid=PID)

    assert binds == ["127.0.0.1:8080"]
    assert inherited == NONE


# A real inherited socket --------------------------------------------------------

# Puts the passed socket at fd 3 and sets LISTEN_PID to its own pid before
# exec'ing the server, the way systemd's service manager does.
_WRAPPER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""

# Serves a trivial ASGI app through hypercorn on the binds prepare_binds
# returns, and answers one request with what it saw.
_SERVER = """
import json, os, subprocess, sys
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from daemon.listen import prepare_binds, set_close_on_exec

binds, inherited = prepare_binds(["systemd"])
report = {
    "binds": binds,
    "names": list(inherited.names),
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
sealed = trio.Event()

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await sealed.wait()
    body = json.dumps(report).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

async def main():
    config = Config()
    config.bind = binds
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, app, config)
        set_close_on_exec(inherited.fds)
        report["inheritable"] = os.get_inheritable(3)
        child = subprocess.run(
            [sys.executable, "-c", "import os; os.fstat(3)"],
            close_fds=False, stderr=subprocess.DEVNULL,
        )
        report["child_sees_fd3"] = child.returncode == 0
        sealed.set()

trio.run(main)
"""


async def _read_response(stream: trio.SocketStream) -> bytes:
    chunks = []
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        if b"\r\n\r\n" in b"".join(chunks):
            head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(body) >= length:
                return b"".join(chunks)


async def test_inherited_socket_serves_request(listener: socket.socket) -> None:
    port = listener.getsockname()[1]

    # The request is sent before the server runs, so it waits in the
    # kernel backlog, as webhooks do while the daemon restarts.
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "PYTHONPATH": str(REPO),
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "http",
    }
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _WRAPPER, str(listener.fileno()), _SERVER],
        env=env,
        pass_fds=(listener.fileno(),),
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(30):
            response = await _read_response(stream)
    finally:
        process.terminate()
        with trio.fail_after(10):
            await process.wait()
        await stream.aclose()

    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    report = json.loads(body)
    assert report["binds"] == ["fd://3"]
    assert report["names"] == ["http"]
    assert report["env_left"] == []
    assert report["inheritable"] is False
    assert report["child_sees_fd3"] is False
