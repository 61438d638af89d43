from __future__ import annotations

import array
import fcntl
import io
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import trio

from daemon import context
from daemon.errors import GitHubError
from daemon.logs import (
    REDACTED,
    JournalHandler,
    RedactingFilter,
    choose_format,
    configure_logging,
    encode_journal_fields,
    redact,
)

# An installation token of the newer, longer kind: ghs_ and 300 characters
# from the whole token alphabet, dots, dashes and underscores included.
TOKEN = "ghs_" + ("aB3.x-Y_9" * 34)[:300]
JWT = jwt.encode({"iss": "123456", "iat": 1, "exp": 2}, "k" * 32, algorithm="HS256")


def _parse_entry(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    position = 0
    while position < len(data):
        newline = data.index(b"\n", position)
        equals = data.find(b"=", position, newline)
        if equals != -1:
            fields[data[position:equals].decode()] = data[equals + 1 : newline].decode()
            position = newline + 1
            continue
        name = data[position:newline].decode()
        (length,) = struct.unpack("<Q", data[newline + 1 : newline + 9])
        start = newline + 9
        fields[name] = data[start : start + length].decode()
        assert data[start + length : start + length + 1] == b"\n"
        position = start + length + 1
    return fields


class _Journal:
    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock

    def receive_raw(self) -> tuple[bytes, list[int]]:
        data, ancillary, _, _ = self.sock.recvmsg(
            1 << 20, socket.CMSG_SPACE(array.array("i").itemsize)
        )
        fds = array.array("i")
        for level, kind, payload in ancillary:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(payload)
        return data, list(fds)

    def receive(self) -> dict[str, str]:
        data, fds = self.receive_raw()
        assert fds == []
        return _parse_entry(data)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[_Journal]:
    path = str(tmp_path / "journal")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield _Journal(path, sock)


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers = list(root.handlers)
    level = root.level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def journal_log(journal: _Journal, root_logger: logging.Logger) -> logging.Logger:
    configure_logging(
        format="journal",
        level="debug",
        journal_socket=journal.path,
        secrets=lambda: {"hunter2-webhook-secret"},
    )
    return logging.getLogger("ghappd.test")


# The journal protocol -----------------------------------------------------------


def test_journal_fields_named(journal: _Journal, journal_log: logging.Logger) -> None:
    journal_log.info("lane %s closed after %d jobs", "1234", 3)

    fields = journal.receive()
    assert fields["MESSAGE"] == "lane 1234 closed after 3 jobs"
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "ghappd"
    assert fields["CODE_FILE"] == __file__
    assert int(fields["CODE_LINE"]) > 0
    assert fields["CODE_FUNC"] == "test_journal_fields_named"
    assert fields["LOGGER"] == "ghappd.test"


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, "7"),
        (logging.INFO, "6"),
        (logging.WARNING, "4"),
        (logging.ERROR, "3"),
        (logging.CRITICAL, "2"),
    ],
)
def test_journal_priority_follows_level(
    journal: _Journal, journal_log: logging.Logger, level: int, priority: str
) -> None:
    journal_log.log(level, "something happened")

    assert journal.receive()["PRIORITY"] == priority


def test_multiline_uses_binary_form(
    journal: _Journal, journal_log: logging.Logger
) -> None:
    message = "clone failed:\nfatal: could not read\n= not a field"

    journal_log.warning("%s", message)

    data, _ = journal.receive_raw()
    encoded = message.encode()
    assert b"MESSAGE\n" + struct.pack("<Q", len(encoded)) + encoded + b"\n" in data
    assert b"MESSAGE=" not in data
    assert _parse_entry(data)["MESSAGE"] == message


def test_context_fields_inside_job(
    journal: _Journal, journal_log: logging.Logger
) -> None:
    with context.bind(
        delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958",
        installation_id=1234,
        event="pull_request",
        job="lint",
        repository="octo-org/hello",
    ):
        journal_log.info("job started")
    journal_log.info("outside any job")

    inside = journal.receive()
    assert inside["DELIVERY_ID"] == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert inside["INSTALLATION_ID"] == "1234"
    assert inside["EVENT"] == "pull_request"
    assert inside["JOB"] == "lint"
    assert inside["REPOSITORY"] == "octo-org/hello"
    outside = journal.receive()
    assert "DELIVERY_ID" not in outside
    assert "JOB" not in outside


async def test_context_reaches_child_tasks(
    journal: _Journal, journal_log: logging.Logger
) -> None:
    async def job() -> None:
        journal_log.info("from a child task")

    with context.bind(installation_id=99, job="test"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job)

    fields = journal.receive()
    assert fields["INSTALLATION_ID"] == "99"
    assert fields["JOB"] == "test"


def test_exception_in_message(journal: _Journal, journal_log: logging.Logger) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        journal_log.exception("checkout failed")

    fields = journal.receive()
    assert fields["MESSAGE"].startswith("checkout failed\nTraceback")
    assert fields["MESSAGE"].endswith("ValueError: boom")
    assert fields["EXCEPTION_TYPE"] == "ValueError"
    assert fields["PRIORITY"] == "3"


def test_large_entry_sent_in_sealed_memfd(journal: _Journal) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)
        limit = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    message = "x" * limit
    # A logger of its own keeps the large message out of pytest's capture.
    handler = JournalHandler(socket_path=journal.path)
    logger = logging.getLogger("ghappd.test.large")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        logger.info("%s", message)
    finally:
        logger.removeHandler(handler)
        handler.close()

    data, fds = journal.receive_raw()
    assert data == b""
    assert len(fds) == 1
    try:
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        content = os.pread(fds[0], os.fstat(fds[0]).st_size, 0)
    finally:
        os.close(fds[0])
    for seal in (
        fcntl.F_SEAL_SEAL,
        fcntl.F_SEAL_SHRINK,
        fcntl.F_SEAL_GROW,
        fcntl.F_SEAL_WRITE,
    ):
        assert seals & seal
    fields = _parse_entry(content)
    assert len(fields["MESSAGE"]) == limit
    assert fields["MESSAGE"] == message
    assert fields["LOGGER"] == "ghappd.test.large"


def test_journal_missing_falls_back(tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = JournalHandler(socket_path=str(tmp_path / "absent"), fallback=stream)
    logger = logging.getLogger("ghappd.test.fallback")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        logger.warning("journal is gone")
    finally:
        logger.removeHandler(handler)
        handler.close()

    output = stream.getvalue()
    assert "journal is gone" in output
    assert str(tmp_path / "absent") in output


def test_field_name_checked() -> None:
    with pytest.raises(ValueError, match=r"^journal field name '_PID' is invalid$"):
        encode_journal_fields({"_PID": "1"})


def test_field_name_lowercase_rejected() -> None:
    with pytest.raises(ValueError, match=r"^journal field name 'message' is inv"):
        encode_journal_fields({"message": "x"})


# Redaction ---------------------------------------------------------------------


def _assert_clean(text: str) -> None:
    assert TOKEN not in text
    assert TOKEN[:40] not in text
    assert JWT not in text
    assert JWT.split(".")[1] not in text
    assert "hunter2-webhook-secret" not in text
    assert REDACTED in text


def test_token_in_message_redacted(
    journal: _Journal, journal_log: logging.Logger
) -> None:
    journal_log.info("minted " + TOKEN + " and " + JWT)

    message = journal.receive()["MESSAGE"]
    _assert_clean(message)
    assert message == f"minted {REDACTED} and {REDACTED}"


def test_token_in_args_redacted(journal: _Journal, journal_log: logging.Logger) -> None:
    journal_log.info("token %s jwt %r secret %s", TOKEN, JWT, "hunter2-webhook-secret")

    message = journal.receive()["MESSAGE"]
    _assert_clean(message)
    assert message == f"token {REDACTED} jwt '{REDACTED}' secret {REDACTED}"


def test_token_in_exception_redacted(
    journal: _Journal, journal_log: logging.Logger
) -> None:
    try:
        raise GitHubError(f"POST failed for {TOKEN} with {JWT}", status_code=401)
    except GitHubError:
        journal_log.exception("minting a token failed")

    message = journal.receive()["MESSAGE"]
    _assert_clean(message)
    assert "GitHubError: POST failed for [REDACTED] with [REDACTED]" in message


def test_token_in_stack_redacted() -> None:
    record = logging.LogRecord(
        "ghappd.test", logging.INFO, __file__, 1, "here", None, None
    )
    record.stack_info = f"Stack (most recent call last):\n  mint({TOKEN!r})"

    RedactingFilter(secrets=None).filter(record)

    assert record.stack_info == f"Stack (most recent call last):\n  mint('{REDACTED}')"


def test_live_secrets_followed(journal: _Journal, root_logger: logging.Logger) -> None:
    loaded: set[str] = set()
    configure_logging(
        format="journal",
        level="info",
        journal_socket=journal.path,
        secrets=lambda: loaded,
    )
    log = logging.getLogger("ghappd.test")

    log.info("secret is %s", "s3cr3t-value")
    loaded.add("s3cr3t-value")
    log.info("secret is %s", "s3cr3t-value")

    assert journal.receive()["MESSAGE"] == "secret is s3cr3t-value"
    assert journal.receive()["MESSAGE"] == f"secret is {REDACTED}"


def test_failing_secrets_hide_message(
    journal: _Journal, root_logger: logging.Logger
) -> None:
    def broken() -> list[str]:
        raise RuntimeError(f"token store closed while holding {TOKEN}")

    configure_logging(
        format="journal", level="info", journal_socket=journal.path, secrets=broken
    )

    logging.getLogger("ghappd.test").info("value %s", "maybe-secret")

    message = journal.receive()["MESSAGE"]
    assert "maybe-secret" not in message
    assert message.startswith(REDACTED)
    assert "token store closed" in message
    assert TOKEN[:40] not in message


def test_redact_keeps_url_around_token() -> None:
    url = f"https://x-access-token:{TOKEN}@github.com/o/r.git"

    assert redact(url) == f"https://x-access-token:{REDACTED}@github.com/o/r.git"


@pytest.mark.parametrize(
    "token",
    [
        "ghp_" + "A" * 36,
        "gho_abc",
        "ghu_abc",
        "ghr_abc",
        "github_pat_11ABCDEFG_abcdefghijklmnop",
        "ghs_" + JWT,
    ],
)
def test_redact_token_prefixes(token: str) -> None:
    assert redact(f"Authorization: token {token}") == f"Authorization: token {REDACTED}"


def test_redact_leaves_plain_words() -> None:
    text = "ghs and eyJ are prefixes; sighs, highs and eyJx.y stay"

    assert redact(text) == text


def test_redact_longer_secret_first() -> None:
    assert redact("abc-long", ["abc", "abc-long"]) == REDACTED


# Format choice -----------------------------------------------------------------


def test_auto_picks_journal_on_matching_stream(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        status = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}

        assert choose_format("auto", environ=environ, stream=stream) == "journal"


def test_auto_ignores_other_stream(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        status = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino + 1}"}

        assert choose_format("auto", environ=environ, stream=stream) == "json"


def test_auto_ignores_malformed_stream(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        assert choose_format(
            "auto", environ={"JOURNAL_STREAM": "x"}, stream=stream
        ) == ("json")


def test_auto_picks_console_on_tty() -> None:
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as stream:
            assert choose_format("auto", environ={}, stream=stream) == "console"
    finally:
        os.close(leader)
        os.close(follower)


def test_auto_without_fileno_is_json() -> None:
    assert choose_format("auto", environ={}, stream=io.StringIO()) == "json"


def test_explicit_format_kept() -> None:
    assert choose_format("console", environ={}, stream=io.StringIO()) == "console"


# JSON and console output -------------------------------------------------------


def test_json_line_has_fields(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(format="json", level="info", stream=stream, secrets=None)

    with context.bind(delivery_id="d-1", installation_id=7):
        logging.getLogger("ghappd.test").warning("lane %s stuck\nsecond line", 7)

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["message"] == "lane 7 stuck\nsecond line"
    assert entry["level"] == "warning"
    assert entry["priority"] == 4
    assert entry["logger"] == "ghappd.test"
    assert entry["code_func"] == "test_json_line_has_fields"
    assert entry["delivery_id"] == "d-1"
    assert entry["installation_id"] == "7"
    assert entry["time"].endswith("+00:00")


def test_json_exception_redacted(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(format="json", level="info", stream=stream, secrets=None)

    try:
        raise RuntimeError(TOKEN)
    except RuntimeError:
        logging.getLogger("ghappd.test").exception("failed with %s", JWT)

    entry = json.loads(stream.getvalue())
    assert entry["message"] == f"failed with {REDACTED}"
    assert entry["exception_type"] == "RuntimeError"
    assert entry["exception"].endswith(f"RuntimeError: {REDACTED}")
    assert TOKEN[:40] not in stream.getvalue()


def test_console_appends_context(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(format="console", level="info", stream=stream, secrets=None)

    with context.bind(job="lint", repository="o/r"):
        logging.getLogger("ghappd.test").info("job %s finished", "lint")

    line = stream.getvalue().rstrip("\n")
    assert " INFO ghappd.test: job lint finished [job=lint repository=o/r]" in line


def test_console_level_filters(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(format="console", level="WARNING", stream=stream, secrets=None)

    logging.getLogger("ghappd.test").info("hidden")

    assert stream.getvalue() == ""


def test_configure_replaces_own_handler(root_logger: logging.Logger) -> None:
    first = configure_logging(format="json", level="info", stream=io.StringIO())
    second = configure_logging(format="json", level="info", stream=io.StringIO())

    assert first not in root_logger.handlers
    assert second in root_logger.handlers


def test_configure_rejects_level() -> None:
    with pytest.raises(ValueError, match=r"^log level 'loud' is invalid; use one of"):
        configure_logging(format="json", level="loud")


def test_configure_rejects_format() -> None:
    with pytest.raises(ValueError, match=r"^log format 'xml' is invalid"):
        configure_logging(format="xml", level="info")  # type: ignore[arg-type]


def test_configure_auto_uses_journal(
    journal: _Journal,
    root_logger: logging.Logger,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        status = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")

        handler = configure_logging(
            format="auto", level="info", journal_socket=journal.path, stream=stream
        )
        logging.getLogger("ghappd.test").info("to the journal")

    assert isinstance(handler, JournalHandler)
    assert journal.receive()["MESSAGE"] == "to the journal"
    assert (tmp_path / "stderr").read_text() == ""


def test_short_secret_not_redacted() -> None:
    assert redact("ghappd starting", ["s"]) == "ghappd starting"
