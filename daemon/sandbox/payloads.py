"""Webhook payloads for the emulator to send, made from captured GitHub ones.

``pull_request_opened.json`` beside this module is a ``pull_request``
delivery with action ``opened`` as GitHub sent it. The helper here fills it
in for an emulated repository, so ``ghappd sandbox`` and the tests send a
payload of GitHub's real shape that points at the emulator.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["pull_request_opened"]

_CAPTURED_REPOSITORY = "Codertocat/Hello-World"


def pull_request_opened(
    *,
    full_name: str,
    number: int,
    head_sha: str,
    installation_id: int,
    head_ref: str = "feature",
    base_ref: str = "main",
    base_sha: str | None = None,
    api_url: str | None = None,
    sender: str = "octocat",
    draft: bool = False,
) -> dict[str, Any]:
    """Return a ``pull_request.opened`` payload for ``full_name``'s PR ``number``.

    ``api_url`` replaces ``https://api.github.com`` and
    ``https://github.com`` in every URL of the payload; without it the URLs
    keep GitHub's hosts. ``base_sha`` defaults to ``head_sha``.
    """
    text = resources.files("daemon.sandbox").joinpath("pull_request_opened.json")
    raw = text.read_text(encoding="utf-8").replace(_CAPTURED_REPOSITORY, full_name)
    if api_url is not None:
        base = api_url.rstrip("/")
        raw = raw.replace("https://api.github.com", base)
        raw = raw.replace("https://github.com", base)
    payload: dict[str, Any] = json.loads(raw)

    owner, name = full_name.split("/")
    repository = payload["repository"]
    repository["name"] = name
    repository["full_name"] = full_name
    repository["owner"]["login"] = owner

    pull = payload["pull_request"]
    payload["number"] = number
    pull["number"] = number
    pull["draft"] = draft
    pull["head"].update(
        {"sha": head_sha, "ref": head_ref, "label": f"{owner}:{head_ref}"}
    )
    pull["head"]["repo"] = repository
    pull["base"].update(
        {
            "sha": base_sha or head_sha,
            "ref": base_ref,
            "label": f"{owner}:{base_ref}",
        }
    )
    pull["base"]["repo"] = repository
    pull["user"]["login"] = sender
    payload["sender"]["login"] = sender
    payload["installation"] = {
        "id": installation_id,
        "node_id": f"I_{installation_id}",
    }
    return payload
