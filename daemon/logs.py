"""Set up logging: journald's native protocol, JSON lines or console text.

Every record carries the context fields of :mod:`daemon.context`
(``DELIVERY_ID``, ``INSTALLATION_ID``, ``EVENT``, ``JOB``, ``REPOSITORY``)
and passes a redaction filter first, which replaces every secret the
daemon has loaded and anything shaped like a GitHub token or a JWT with
``[REDACTED]``, in the message, its arguments, the exception text and the
stack text.

The journal handler writes the native protocol described in systemd's
"Native Journal Protocol" document (systemd.io/JOURNAL_NATIVE_PROTOCOL):
one datagram per entry to ``/run/systemd/journal/socket``, and a sealed
memfd passed with ``SCM_RIGHTS`` for entries too large for a datagram.
"""

from __future__ import annotations

import array
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, TextIO

from daemon.context import current_fields

__all__ = [
    "JOURNAL_SOCKET",
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "ConsoleFormatter",
    "ContextFilter",
    "JournalHandler",
    "JsonFormatter",
    "LogFormat",
    "RedactingFilter",
    "choose_format",
    "configure_logging",
    "encode_journal_fields",
    "redact",
    "syslog_priority",
]

LogFormat = Literal["auto", "journal", "json", "console"]

REDACTED = "[REDACTED]"

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# GitHub's token prefixes (ghp_ classic personal, gho_ OAuth, ghu_
# user-to-server, ghs_ installation, ghr_ refresh, github_pat_ fine-grained),
# followed by any number of characters from an alphabet that includes ".",
# "-" and "_" because newer installation tokens embed a JWT. Then a JWT:
# three base64url segments, the first a JSON header, so it starts with "eyJ".
_TOKEN_PATTERN = re.compile(
    r"(?:gh[pousr]_|github_pat_)[A-Za-z0-9._-]+"
    r"|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Journal field names: upper-case letters, digits and "_", not starting
# with "_" (those are journald's trusted fields) or a digit, at most 64.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

# The attribute ContextFilter stores the context fields in.
_FIELDS_ATTRIBUTE = "ghappd_fields"

# Marks the handler configure_logging installed, so a second call replaces it.
_INSTALLED_ATTRIBUTE = "ghappd_installed"

# A datagram waits at most this long for room in journald's queue before
# the entry goes to stderr instead.
_SEND_TIMEOUT = 1.0

# The native protocol document recommends raising SO_SNDBUF; the kernel
# caps the value at net.core.wmem_max.
_SEND_BUFFER = 8 * 1024 * 1024

# Shorter secrets are not searched for in log text.
MIN_SECRET_LENGTH = 8

# Used when no memfd can be made: the MESSAGE is cut to this many bytes.
_TRUNCATED_MESSAGE = 48 * 1024


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace each of ``secrets`` and every token-shaped string with
    ``[REDACTED]``.

    Longer secrets are replaced first, so one that contains another is
    removed whole. Secrets shorter than :data:`MIN_SECRET_LENGTH` are
    skipped: they would match ordinary words, and the configuration
    rejects webhook secrets that short.
    """
    candidates = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
    for secret in sorted(candidates, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _TOKEN_PATTERN.sub(REDACTED, text)


def syslog_priority(levelno: int) -> int:
    """Return the syslog priority (0-7) for a :mod:`logging` level number."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class RedactingFilter(logging.Filter):
    """Redact secrets from a record's message, arguments and tracebacks.

    The record is changed in place: ``msg`` becomes the formatted,
    redacted message, ``args`` becomes ``None``, and ``exc_text`` and
    ``stack_info`` are formatted and redacted, so every handler after it
    gets only redacted text. ``secrets`` is called for every record and
    returns the secrets loaded at that moment. When it raises, the whole
    message and traceback are replaced, because nothing can tell which
    part is secret.
    """

    def __init__(self, *, secrets: Callable[[], Iterable[str]] | None) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            live = tuple(self._secrets()) if self._secrets is not None else ()
        except Exception as exc:
            # The error text can contain a secret too, so it is redacted
            # with the token pattern.
            error = redact(repr(exc))
            record.msg = f"{REDACTED} (listing the secrets to redact raised {error})"
            record.args = None
            record.exc_text = REDACTED if record.exc_info or record.exc_text else None
            record.stack_info = None
            return True

        record.msg = redact(_message(record), live)
        record.args = None
        exc_text = _exception_text(record)
        if exc_text:
            record.exc_text = redact(exc_text, live)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, live)
        return True


class ContextFilter(logging.Filter):
    """Store :func:`daemon.context.current_fields` on each record.

    Filters run in the task that logged, where the context variables
    have their values; the fields then travel with the record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, _FIELDS_ATTRIBUTE):
            setattr(record, _FIELDS_ATTRIBUTE, current_fields())
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object on one line.

    Keys: ``time`` (UTC, ISO 8601), ``level``, ``priority``, ``logger``,
    ``message``, ``code_file``, ``code_line``, ``code_func``, the context
    fields in lower case, and ``exception`` / ``exception_type`` and
    ``stack`` when present.
    """

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "time": time.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "priority": syslog_priority(record.levelno),
            "logger": record.name,
            "message": _message(record),
            "code_file": record.pathname,
            "code_line": record.lineno,
            "code_func": record.funcName,
        }
        for name, value in _context_fields(record).items():
            entry[name.lower()] = value
        exc_text = _exception_text(record)
        if exc_text:
            entry["exception"] = exc_text
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception_type"] = _type_name(record.exc_info[0])
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    """Format a record as human-readable text with the context appended.

    For example ``2026-01-02 10:00:00,123 INFO daemon.lanes: lane closed
    [delivery_id=... job=lint]``, followed by the traceback, if any, on
    the next lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = (
            f"{self.formatTime(record)} {record.levelname} {record.name}:"
            f" {_message(record)}"
        )
        fields = _context_fields(record)
        if fields:
            pairs = " ".join(
                f"{name.lower()}={value}" for name, value in fields.items()
            )
            text += f" [{pairs}]"
        exc_text = _exception_text(record)
        if exc_text:
            text += "\n" + exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


class JournalHandler(logging.Handler):
    """Send records to journald over its native datagram protocol.

    Fields: ``MESSAGE`` (with the traceback appended), ``PRIORITY``,
    ``SYSLOG_IDENTIFIER``, ``CODE_FILE``, ``CODE_LINE``, ``CODE_FUNC``,
    ``LOGGER``, ``EXCEPTION_TYPE`` when there is an exception, and the
    context fields. When journald cannot be reached, or does not take a
    datagram within one second, the entry is written to ``fallback``
    (default :data:`sys.stderr`) in console format instead. :meth:`emit`
    raises nothing.
    """

    def __init__(
        self,
        *,
        socket_path: str = JOURNAL_SOCKET,
        identifier: str = "ghappd",
        fallback: TextIO | None = None,
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        self.socket_path = socket_path
        self.identifier = identifier
        self._fallback = fallback
        self._fallback_formatter = ConsoleFormatter()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.settimeout(_SEND_TIMEOUT)
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        """Return the journal fields for ``record``, in sending order."""
        message = _message(record)
        exc_text = _exception_text(record)
        if exc_text:
            message += "\n" + exc_text
        if record.stack_info:
            message += "\n" + record.stack_info
        fields = {
            "MESSAGE": message,
            "PRIORITY": str(syslog_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "CODE_FILE": record.pathname or "",
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName or "",
            "LOGGER": record.name,
        }
        if record.exc_info and record.exc_info[0] is not None:
            fields["EXCEPTION_TYPE"] = _type_name(record.exc_info[0])
        fields.update(_context_fields(record))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.fields(record)
            self._send(fields)
        except OSError as exc:
            self._write_fallback(record, exc)
        except Exception:
            self.handleError(record)

    def _send(self, fields: Mapping[str, str]) -> None:
        data = encode_journal_fields(fields)
        try:
            self._socket.sendto(data, self.socket_path)
            return
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise

        # The native protocol document: an entry too large for a datagram
        # goes in a sealed memfd, sent as the only content of an empty
        # datagram with SCM_RIGHTS.
        try:
            fd = _sealed_memfd(data)
        except OSError:
            self._socket.sendto(_truncated(fields), self.socket_path)
            return
        try:
            rights = array.array("i", [fd])
            self._socket.sendmsg(
                [],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)],
                0,
                self.socket_path,
            )
        finally:
            os.close(fd)

    def _write_fallback(self, record: logging.LogRecord, exc: OSError) -> None:
        stream = self._fallback if self._fallback is not None else sys.stderr
        try:
            stream.write(
                f"{self._fallback_formatter.format(record)}"
                f" (journald at {self.socket_path} failed: {exc.strerror})\n"
            )
            stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._socket.close()
        super().close()


def encode_journal_fields(fields: Mapping[str, str]) -> bytes:
    """Encode fields as one native-protocol journal entry.

    A value without a newline is sent as ``KEY=value\\n``. A value with a
    newline uses the binary-safe form: ``KEY\\n``, the value's length as a
    64-bit little-endian integer, the value, and ``\\n``. Raises
    :class:`ValueError` for a field name that is not upper-case letters,
    digits and underscores, starts with an underscore or a digit, or is
    longer than 64 characters.
    """
    parts = []
    for name, value in fields.items():
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"journal field name {name!r} is invalid")
        encoded = value.encode("utf-8", "backslashreplace")
        key = name.encode("ascii")
        if b"\n" in encoded:
            parts.append(
                key + b"\n" + struct.pack("<Q", len(encoded)) + encoded + b"\n"
            )
        else:
            parts.append(key + b"=" + encoded + b"\n")
    return b"".join(parts)


def _sealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("ghappd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        seals = (
            fcntl.F_SEAL_SHRINK
            | fcntl.F_SEAL_GROW
            | fcntl.F_SEAL_WRITE
            | fcntl.F_SEAL_SEAL
        )
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError:
        os.close(fd)
        raise
    return fd


def _truncated(fields: Mapping[str, str]) -> bytes:
    # NOTE: only reached when memfd_create or sealing fails (kernels before
    # 3.17, or a seccomp filter that denies memfd_create); the entry keeps
    # its first bytes and states how much was cut.
    message = fields["MESSAGE"].encode("utf-8", "backslashreplace")
    cut = len(message) - _TRUNCATED_MESSAGE
    head = message[:_TRUNCATED_MESSAGE].decode("utf-8", "ignore")
    shortened = dict(fields)
    shortened["MESSAGE"] = f"{head}\n[{cut} bytes cut: entry too large for journald]"
    return encode_journal_fields(shortened)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:
        # A format string that does not match its arguments; keep both.
        return f"{record.msg!s} {record.args!r}"


def _exception_text(record: logging.LogRecord) -> str | None:
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    return record.exc_text or None


def _context_fields(record: logging.LogRecord) -> dict[str, str]:
    fields = getattr(record, _FIELDS_ATTRIBUTE, None)
    if fields is None:
        return current_fields()
    return dict(fields)


def _type_name(exc_type: type[BaseException]) -> str:
    if exc_type.__module__ == "builtins":
        return exc_type.__qualname__
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


def choose_format(
    requested: LogFormat,
    *,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> Literal["journal", "json", "console"]:
    """Resolve ``"auto"`` to the format that fits where ``stream`` goes.

    systemd.exec(5): ``JOURNAL_STREAM`` is ``DEVICE:INODE`` of the stream
    connected to journald. When it matches the ``st_dev`` and ``st_ino``
    of stderr, stderr still goes to the journal (a shell redirect would
    change it). Then ``"journal"``; otherwise
    ``"console"`` on a terminal and ``"json"`` anywhere else. ``stream``
    defaults to :data:`sys.stderr`. Other values are returned as given.
    """
    if requested != "auto":
        return requested
    env = os.environ if environ is None else environ
    out = sys.stderr if stream is None else stream
    try:
        fd = out.fileno()
        status = os.fstat(fd)
    except (OSError, ValueError):
        return "json"

    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if (
        device.isdigit()
        and inode.isdigit()
        and (int(device), int(inode)) == (status.st_dev, status.st_ino)
    ):
        return "journal"
    return "console" if os.isatty(fd) else "json"


def configure_logging(
    *,
    format: LogFormat,
    level: str,
    journal_socket: str = JOURNAL_SOCKET,
    secrets: Callable[[], Iterable[str]] | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install one handler on the root logger and return it.

    ``format`` is resolved by :func:`choose_format`; ``level`` is a level
    name (``debug``, ``info``, ``warning``, ``error``, ``critical``, any
    case). The handler carries :class:`RedactingFilter` (with ``secrets``)
    and :class:`ContextFilter`. JSON and console output go to ``stream``
    (default :data:`sys.stderr`), journal entries to ``journal_socket``.
    Calling it again replaces the handler it installed before. Raises
    :class:`ValueError` for an unknown format or level.
    """
    levelno = _LEVELS.get(level.lower())
    if levelno is None:
        raise ValueError(
            f"log level {level!r} is invalid; use one of {', '.join(_LEVELS)}"
        )
    if format not in ("auto", "journal", "json", "console"):
        raise ValueError(
            f"log format {format!r} is invalid; use auto, journal, json or console"
        )

    out = sys.stderr if stream is None else stream
    chosen = choose_format(format, stream=out)
    handler: logging.Handler
    if chosen == "journal":
        handler = JournalHandler(socket_path=journal_socket, fallback=out)
    else:
        handler = logging.StreamHandler(out)
        if chosen == "json":
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(ConsoleFormatter())
    handler.addFilter(RedactingFilter(secrets=secrets))
    handler.addFilter(ContextFilter())
    setattr(handler, _INSTALLED_ATTRIBUTE, True)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _INSTALLED_ATTRIBUTE, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    return handler
