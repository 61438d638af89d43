"""Validation of delivery headers and decoding of delivery bodies, with no I/O."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

__all__ = [
    "EVENT_HEADER",
    "FORM_TYPE",
    "ID_HEADER",
    "JSON_TYPE",
    "Rejection",
    "decode_payload",
    "hook_id",
    "printable_id",
    "validate_delivery_id",
    "validate_event",
]

EVENT_HEADER = "X-GitHub-Event"
ID_HEADER = "X-GitHub-Delivery"
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"

# GitHub's event names are lowercase words joined by underscores; the longest
# fixture name is 29 characters, so 64 leaves room for new events.
_EVENT = re.compile(r"[a-z_]{1,64}")
# GitHub sends a GUID (36 characters). Any visible ASCII up to 128 characters
# is accepted, so other senders' ids work, and the value is safe in a log line.
_DELIVERY_ID = re.compile(r"[\x21-\x7e]{1,128}")
_UTF8_NAMES = frozenset({"utf-8", "utf8"})
_MAX_FORM_FIELDS = 16
_MAX_LOGGED_ID = 128


class Rejection(Exception):
    """A request the intake rejects with the HTTP ``status``.

    ``message`` is sent to the client. It names the header or field at
    fault and contains no secret.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def validate_event(value: str | None) -> str:
    """Return the ``X-GitHub-Event`` value, or raise Rejection (400)."""
    if value is None:
        raise Rejection(400, f"missing {EVENT_HEADER} header")
    if _EVENT.fullmatch(value) is None:
        raise Rejection(
            400, f"invalid {EVENT_HEADER} header: expected 1 to 64 of a-z and '_'"
        )
    return value


def validate_delivery_id(value: str | None) -> str:
    """Return the ``X-GitHub-Delivery`` value, or raise Rejection (400)."""
    if value is None:
        raise Rejection(400, f"missing {ID_HEADER} header")
    if _DELIVERY_ID.fullmatch(value) is None:
        raise Rejection(
            400,
            f"invalid {ID_HEADER} header: expected 1 to 128 visible ASCII characters",
        )
    return value


def printable_id(value: str | None) -> str:
    """Return a header value cut to 128 characters for a log line, or ``"-"``.

    Log calls format the result with ``%r``, which escapes control
    characters, so a hostile value cannot forge a log line.
    """
    if value is None:
        return "-"
    return value[:_MAX_LOGGED_ID]


def decode_payload(
    body: bytes, mimetype: str, params: Mapping[str, str]
) -> dict[str, Any]:
    """Decode a delivery body into its JSON object.

    ``mimetype`` is the lowercased media type and ``params`` its parameters.
    ``application/json`` bodies are JSON; ``application/x-www-form-urlencoded``
    bodies carry the JSON in their single ``payload`` field (both are
    GitHub's content types, docs.github.com, "Configuring the GitHub
    Marketplace webhook"). Raise
    Rejection with 415 for another media type or a charset other than
    UTF-8, and with 400 for a body that is not UTF-8, not valid JSON, or
    not a JSON object.
    """
    charset = params.get("charset")
    if charset is not None and charset.lower() not in _UTF8_NAMES:
        raise Rejection(415, f"unsupported charset {charset!r}: send UTF-8")

    if mimetype == JSON_TYPE:
        text = _decode_utf8(body)
    elif mimetype == FORM_TYPE:
        text = _form_payload(_decode_utf8(body))
    else:
        raise Rejection(
            415,
            f"unsupported content type {mimetype!r}: send {JSON_TYPE} or {FORM_TYPE}",
        )

    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        # ValueError covers json.JSONDecodeError and integers too long to convert.
        raise Rejection(400, "invalid JSON in the request body") from None
    if not isinstance(document, dict):
        raise Rejection(
            400, f"the payload is a JSON {type(document).__name__}, not an object"
        )
    return document


def hook_id(payload: Mapping[str, Any]) -> int | None:
    """Return the webhook id of a ``ping`` payload (``hook_id`` or ``hook.id``)."""
    value = payload.get("hook_id")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    hook = payload.get("hook")
    if isinstance(hook, dict):
        value = hook.get("id")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _decode_utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejection(400, "the request body is not valid UTF-8") from None


def _form_payload(text: str) -> str:
    try:
        fields = urllib.parse.parse_qs(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            errors="strict",
            max_num_fields=_MAX_FORM_FIELDS,
        )
    except (ValueError, UnicodeDecodeError):
        raise Rejection(400, "invalid form-urlencoded body") from None
    values = fields.get("payload")
    if values is None:
        raise Rejection(400, "missing 'payload' field in the form-urlencoded body")
    if len(values) != 1:
        raise Rejection(400, "more than one 'payload' field in the form body")
    return values[0]
