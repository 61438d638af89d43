"""Check-run bodies: GitHub's validation rules and how an update applies.

The rules are those of "Create a check run" and "Update a check run" in
GitHub's REST reference (API version 2022-11-28). A request carries at
most 50 annotations. ``output.summary`` and ``output.text`` are at most
65535 characters. A completed run needs a conclusion, and a
``conclusion`` sets the status to ``completed`` by itself.
"""

from __future__ import annotations

import copy
from typing import Any

from daemon.sandbox._common import invalid, parse_iso8601

__all__ = [
    "MAX_ANNOTATIONS",
    "MAX_OUTPUT_CHARS",
    "apply_check_run",
    "public_view",
    "select",
]

MAX_ANNOTATIONS = 50
MAX_OUTPUT_CHARS = 65535

_STATUSES = {"queued", "in_progress", "completed", "waiting", "requested", "pending"}
_CONCLUSIONS = {
    "action_required",
    "cancelled",
    "failure",
    "neutral",
    "success",
    "skipped",
    "stale",
    "timed_out",
}
_LEVELS = {"notice", "warning", "failure"}
_ANNOTATION_KEYS = {
    "path",
    "start_line",
    "end_line",
    "start_column",
    "end_column",
    "annotation_level",
    "message",
    "title",
    "raw_details",
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string(body: dict[str, Any], key: str, *, max_length: int | None = None) -> str:
    value = body[key]
    if not isinstance(value, str):
        raise invalid(f"{key!r} must be a string, not {value!r}.")
    if max_length is not None and len(value) > max_length:
        raise invalid(
            f"{key!r} is {len(value)} characters long; "
            f"the maximum is {max_length} characters."
        )
    return value


def _annotation(index: int, item: object) -> dict[str, Any]:
    where = f"output.annotations[{index}]"
    if not isinstance(item, dict):
        raise invalid(f"{where} must be an object, not {item!r}.")
    unknown = set(item) - _ANNOTATION_KEYS
    if unknown:
        raise invalid(f"{where} has unknown keys {sorted(unknown)!r}.")

    for key in ("path", "start_line", "end_line", "annotation_level", "message"):
        if key not in item:
            raise invalid(f"{where} is missing the required key {key!r}.")
    if not isinstance(item["path"], str) or not item["path"]:
        raise invalid(f"{where}.path must be a non-empty string.")
    for key in ("start_line", "end_line", "start_column", "end_column"):
        if key in item and not _is_int(item[key]):
            raise invalid(f"{where}.{key} must be an integer, not {item[key]!r}.")

    if item["end_line"] < item["start_line"]:
        raise invalid(f"{where}.end_line must not be less than start_line.")
    has_columns = "start_column" in item or "end_column" in item
    if has_columns and item["start_line"] != item["end_line"]:
        raise invalid(
            f"{where}: start_column and end_column are only allowed when "
            "start_line equals end_line."
        )

    if item["annotation_level"] not in _LEVELS:
        raise invalid(
            f"{where}.annotation_level must be one of notice, warning, failure, "
            f"not {item['annotation_level']!r}."
        )
    if not isinstance(item["message"], str):
        raise invalid(f"{where}.message must be a string.")
    return dict(item)


def _apply_output(
    output: dict[str, Any], value: object, *, creating: bool
) -> list[Any]:
    if not isinstance(value, dict):
        raise invalid(f"'output' must be an object, not {value!r}.")
    if creating:
        for key in ("title", "summary"):
            if key not in value:
                raise invalid(f"'output' is missing the required key {key!r}.")
    elif "summary" not in value:
        raise invalid("'output' is missing the required key 'summary'.")
    if "title" in value:
        output["title"] = _string(value, "title")
    output["summary"] = _string(value, "summary", max_length=MAX_OUTPUT_CHARS)
    if "text" in value:
        output["text"] = _string(value, "text", max_length=MAX_OUTPUT_CHARS)

    annotations = value.get("annotations", [])
    if not isinstance(annotations, list):
        raise invalid("'output.annotations' must be an array.")
    if len(annotations) > MAX_ANNOTATIONS:
        raise invalid(
            f"'output.annotations' has {len(annotations)} items; at most "
            f"{MAX_ANNOTATIONS} may be sent in one request, so send the rest "
            "in further updates."
        )
    return [_annotation(index, item) for index, item in enumerate(annotations)]


def apply_check_run(
    run: dict[str, Any], body: object, *, now: str, creating: bool
) -> dict[str, Any]:
    """Return ``run`` updated by a create or update request's JSON ``body``.

    ``run`` is the stored check run (with its ``annotations`` list); it is
    not changed. ``now`` is the ISO 8601 time that fills ``completed_at``
    when a request completes the run without one. Raises the 422 APIError
    that GitHub returns for an invalid body.
    """
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object, not {body!r}.")
    updated = copy.deepcopy(run)

    if creating:
        for key in ("name", "head_sha"):
            if key not in body:
                raise invalid(f"{key!r} wasn't supplied.")
        head_sha = _string(body, "head_sha")
        updated["head_sha"] = head_sha
    if "name" in body:
        name = _string(body, "name")
        if not name:
            raise invalid("'name' must not be empty.")
        updated["name"] = name
    for key in ("details_url", "external_id"):
        if key in body and body[key] is not None:
            updated[key] = _string(body, key)

    if "status" in body:
        status = body["status"]
        if status not in _STATUSES:
            raise invalid(f"'status' {status!r} is not one of {sorted(_STATUSES)!r}.")
        updated["status"] = status
    if "conclusion" in body and body["conclusion"] is not None:
        conclusion = body["conclusion"]
        if conclusion not in _CONCLUSIONS:
            raise invalid(
                f"'conclusion' {conclusion!r} is not one of {sorted(_CONCLUSIONS)!r}."
            )
        updated["conclusion"] = conclusion
        updated["status"] = "completed"
    if updated["status"] == "completed" and updated.get("conclusion") is None:
        raise invalid("'conclusion' is required when 'status' is 'completed'.")

    if "started_at" in body:
        updated["started_at"] = parse_iso8601(body["started_at"], "started_at")
    if "completed_at" in body:
        updated["completed_at"] = parse_iso8601(body["completed_at"], "completed_at")
    if updated["status"] == "completed" and updated.get("completed_at") is None:
        updated["completed_at"] = now

    if "output" in body:
        added = _apply_output(updated["output"], body["output"], creating=creating)
        updated["annotations"].extend(added)
        updated["output"]["annotations_count"] = len(updated["annotations"])
    if "actions" in body:
        actions = body["actions"]
        if not isinstance(actions, list) or len(actions) > 3:
            raise invalid("'actions' must be an array of at most 3 objects.")
    return updated


def public_view(run: dict[str, Any]) -> dict[str, Any]:
    """Return the check run as the REST API shows it, without ``annotations``."""
    return {key: value for key, value in run.items() if key != "annotations"}


def select(
    runs: list[dict[str, Any]],
    *,
    check_name: str | None,
    status: str | None,
    filter: str,
) -> list[dict[str, Any]]:
    """Return the runs of "List check runs for a Git reference", newest first.

    ``filter`` is ``latest`` (the newest run of each name) or ``all``.
    Raises the 422 APIError for another ``filter`` or ``status``.
    """
    if filter not in {"latest", "all"}:
        raise invalid(f"'filter' must be latest or all, not {filter!r}.")
    if status is not None and status not in {"queued", "in_progress", "completed"}:
        raise invalid(
            f"'status' must be queued, in_progress or completed, not {status!r}."
        )
    chosen = sorted(runs, key=lambda run: run["id"], reverse=True)
    if check_name is not None:
        chosen = [run for run in chosen if run["name"] == check_name]
    if status is not None:
        chosen = [run for run in chosen if run["status"] == status]
    if filter == "all":
        return chosen
    seen: set[str] = set()
    latest = []
    for run in chosen:
        if run["name"] not in seen:
            seen.add(run["name"])
            latest.append(run)
    return latest
