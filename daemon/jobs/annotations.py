"""Turn workflow-command lines in a command's output into check-run annotations.

A command reports a problem the way GitHub Actions documents it in
"Workflow commands for GitHub Actions"::

    ::error file=app.py,line=10,endLine=12,col=5,endColumn=9,title=T::message

The parser follows the rules of the Actions runner's own parser
(``actions/runner``, ``src/Runner.Common/ActionCommand.cs``):

- leading whitespace is ignored, and the command information ends at the
  second ``::``;
- properties are separated by commas, and a property without ``=`` is
  ignored;
- command and property names are case-insensitive (the Actions docs say so);
- values are percent-unescaped: ``%25 %0D %0A %3A %2C`` in properties,
  ``%25 %0D %0A`` in the message.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

__all__ = ["Annotation", "ParsedAnnotations", "parse_annotations"]

Annotation = dict[str, str | int]

# Check-run annotation levels, from the workflow command that reports them.
_LEVELS = {"error": "failure", "warning": "warning", "notice": "notice"}

# GitHub's REST docs for check runs: a title is at most 255 characters and
# a message at most 64 KB.
_MAX_TITLE_CHARS = 255
_MAX_MESSAGE_BYTES = 64 * 1024

_PROPERTY_ESCAPES = {"%25": "%", "%0D": "\r", "%0A": "\n", "%3A": ":", "%2C": ","}
_DATA_ESCAPES = {"%25": "%", "%0D": "\r", "%0A": "\n"}
_PROPERTY_ESCAPE_RE = re.compile("|".join(_PROPERTY_ESCAPES))
_DATA_ESCAPE_RE = re.compile("|".join(_DATA_ESCAPES))
_DIGITS_RE = re.compile("[0-9]+")


@dataclass(frozen=True)
class ParsedAnnotations:
    """Annotations found in one output.

    ``annotations`` are check-run annotation objects ready for the REST
    API. ``unlocated`` are the commands without a usable file (none given,
    or a path outside the workspace): each has ``annotation_level``,
    ``message`` and, when given, ``title``, for a summary to mention.
    """

    annotations: list[Annotation] = field(default_factory=list)
    unlocated: list[Annotation] = field(default_factory=list)


def _unescape_property(value: str) -> str:
    # One pass, so "%250A" becomes "%0A" and not a line break.
    return _PROPERTY_ESCAPE_RE.sub(lambda match: _PROPERTY_ESCAPES[match[0]], value)


def _unescape_data(value: str) -> str:
    return _DATA_ESCAPE_RE.sub(lambda match: _DATA_ESCAPES[match[0]], value)


def _positive_int(value: str | None) -> int | None:
    if value is None or not _DIGITS_RE.fullmatch(value.strip()):
        return None
    number = int(value)
    return number if number >= 1 else None


def _truncate_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def _relative_path(file: str, workspace: str | None) -> str | None:
    """Return ``file`` relative to the workspace, or None if it leaves it."""
    path = file.strip()
    if workspace is not None:
        prefix = workspace.rstrip("/") + "/"
        if path.startswith(prefix):
            path = path[len(prefix) :]
    if not path or path.startswith("/") or "\0" in path:
        return None
    if ".." in PurePosixPath(path).parts:
        return None
    normalized = posixpath.normpath(path)
    if normalized == ".":
        return None
    return normalized


def _parse_line(line: str) -> tuple[str, dict[str, str], str] | None:
    """Split one workflow command into its name, properties and message."""
    text = line.lstrip()
    if not text.startswith("::"):
        return None
    end = text.find("::", 2)
    if end < 0:
        return None
    info = text[2:end]
    name, _, property_text = info.partition(" ")
    level = _LEVELS.get(name.lower())
    if level is None:
        return None

    properties: dict[str, str] = {}
    for item in property_text.strip().split(","):
        key, equals, value = item.partition("=")
        if equals and key and value:
            properties[key.strip().lower()] = _unescape_property(value)
    return level, properties, _unescape_data(text[end + 2 :])


def parse_annotations(
    output: str, *, workspace: str | None = None
) -> ParsedAnnotations:
    """Parse the ``::error``, ``::warning`` and ``::notice`` lines of ``output``.

    Each returned annotation has ``path`` (relative to the workspace, with
    ``./`` and the ``workspace`` prefix removed), ``start_line`` and
    ``end_line``, ``annotation_level`` (``failure``, ``warning`` or
    ``notice``), ``message`` and, when given, ``title``. Check runs require
    a line, so a command with a file but no valid ``line`` starts at line 1,
    and an ``endLine`` before ``line`` is ignored. ``start_column`` and
    ``end_column`` are included only when the annotation is on one line,
    because GitHub accepts columns only there. Titles are cut to 255
    characters and messages to 64 KB, GitHub's limits.

    Lines that are not such a command, or whose message is empty, are
    skipped. Nothing is raised for malformed input.
    """
    result = ParsedAnnotations()
    for line in output.splitlines():
        parsed = _parse_line(line)
        if parsed is None:
            continue
        level, properties, message = parsed
        if not message.strip():
            continue

        annotation: Annotation = {
            "annotation_level": level,
            "message": _truncate_utf8(message, _MAX_MESSAGE_BYTES),
        }
        title = properties.get("title")
        if title:
            annotation["title"] = title[:_MAX_TITLE_CHARS]

        file = properties.get("file")
        path = _relative_path(file, workspace) if file else None
        if path is None:
            result.unlocated.append(annotation)
            continue

        start_line = _positive_int(properties.get("line")) or 1
        end_line = _positive_int(properties.get("endline"))
        if end_line is None or end_line < start_line:
            end_line = start_line
        located: Annotation = {
            "path": path,
            "start_line": start_line,
            "end_line": end_line,
            **annotation,
        }

        start_column = _positive_int(properties.get("col"))
        end_column = _positive_int(properties.get("endcolumn"))
        if start_line == end_line and start_column is not None:
            located["start_column"] = start_column
            if end_column is not None and end_column >= start_column:
                located["end_column"] = end_column
        result.annotations.append(located)
    return result
