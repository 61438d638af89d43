"""Issue comments and pull request reviews: request validation and bodies.

The shapes follow GitHub's "Create an issue comment" and "Create a review
for a pull request" (API version 2022-11-28). A comment body is at most
65536 characters. A review's ``event`` is APPROVE, REQUEST_CHANGES or
COMMENT, or missing for a pending review, and REQUEST_CHANGES needs a body.
"""

from __future__ import annotations

from typing import Any

from daemon.sandbox._common import APIError, invalid

__all__ = ["MAX_COMMENT_CHARS", "REVIEW_STATES", "comment_text", "review_request"]

MAX_COMMENT_CHARS = 65536

REVIEW_STATES: dict[str | None, str] = {
    None: "PENDING",
    "APPROVE": "APPROVED",
    "REQUEST_CHANGES": "CHANGES_REQUESTED",
    "COMMENT": "COMMENTED",
}


def _too_long(resource: str) -> APIError:
    return APIError(
        422,
        "Validation Failed",
        extra={
            "errors": [
                {
                    "resource": resource,
                    "code": "custom",
                    "field": "body",
                    "message": (
                        f"body is too long (maximum is {MAX_COMMENT_CHARS} characters)"
                    ),
                }
            ]
        },
    )


def comment_text(body: object) -> str:
    """Return the ``body`` of a comment request; raise the 422 APIError if invalid."""
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object, not {body!r}.")
    text = body.get("body")
    if not isinstance(text, str) or not text:
        raise invalid("'body' wasn't supplied.")
    if len(text) > MAX_COMMENT_CHARS:
        raise _too_long("IssueComment")
    return text


def _review_comment(index: int, item: object) -> dict[str, Any]:
    where = f"comments[{index}]"
    if not isinstance(item, dict):
        raise invalid(f"{where} must be an object, not {item!r}.")
    for key in ("path", "body"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise invalid(f"{where} is missing the required string {key!r}.")
    if "position" not in item and "line" not in item:
        raise invalid(f"{where} needs either 'position' or 'line'.")
    if "side" in item and item["side"] not in {"LEFT", "RIGHT"}:
        raise invalid(f"{where}.side must be LEFT or RIGHT, not {item['side']!r}.")
    return dict(item)


def review_request(body: object) -> tuple[str | None, str, list[dict[str, Any]]]:
    """Return a review request's event, body text and inline comments.

    Raises the 422 APIError GitHub returns for an unknown event, a missing
    body, or an inline comment without a path, body, or position or line.
    """
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object, not {body!r}.")
    event = body.get("event")
    if event not in REVIEW_STATES:
        raise invalid(
            f"'event' must be APPROVE, REQUEST_CHANGES or COMMENT, not {event!r}."
        )
    text = body.get("body", "")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise invalid(f"'body' must be a string, not {text!r}.")
    if len(text) > MAX_COMMENT_CHARS:
        raise _too_long("PullRequestReview")
    comments = body.get("comments", [])
    if not isinstance(comments, list):
        raise invalid("'comments' must be an array.")
    checked = [_review_comment(index, item) for index, item in enumerate(comments)]
    # NOTE: the REST reference requires a body for COMMENT too. A COMMENT
    # review with inline comments and no body is accepted here, as
    # github.com accepts it.
    needs_body = event == "REQUEST_CHANGES" or (event == "COMMENT" and not checked)
    if needs_body and not text:
        raise APIError(
            422,
            "Unprocessable Entity",
            extra={"errors": [f"Review body is required for event {event}."]},
        )
    return event, text, checked
