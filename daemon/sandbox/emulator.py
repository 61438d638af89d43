"""A local emulator of the GitHub REST endpoints and git smart HTTP ghappd uses.

The emulator is a quart-trio app served by hypercorn on 127.0.0.1. It
verifies the App's JWT with the App's public key, mints installation access
tokens, records check runs, comments, reviews and hook deliveries, and
serves bare repositories through ``git http-backend`` behind Basic auth that
accepts only the tokens it minted. Tests set its state up through the
methods below and read what clients did from its public attributes.

Answers follow GitHub's REST API, version 2022-11-28: the same status codes
and the same ``{"message", "documentation_url"}`` error bodies. Time comes
from the emulator's own clock, ``time.time() + clock_offset``: it stamps the
``Date`` header, checks JWT time claims and expires tokens, so a test moves
time by changing ``clock_offset`` or ``token_ttl``.

Only the CLI's ``sandbox`` command and the tests import this package.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, g, request
from quart_trio import QuartTrio

from daemon.sandbox import _checks, _git_http
from daemon.sandbox._common import APIError, invalid, iso8601
from daemon.sandbox._jwt import JWTRejected, verify_app_jwt
from daemon.sandbox._repos import RepositoryStore, valid_full_name

__all__ = ["Emulator", "RecordedRequest", "generate_app_key"]

log = logging.getLogger(__name__)

DEFAULT_PERMISSIONS = {
    "checks": "write",
    "contents": "read",
    "issues": "write",
    "metadata": "read",
    "pull_requests": "write",
}
DEFAULT_EVENTS = ["check_run", "issue_comment", "pull_request", "push"]

_LEVELS = {"read": 1, "write": 2, "admin": 3}
_TOKEN_ALPHABET = string.ascii_letters + string.digits
_MAX_BODY = 100 * 1024 * 1024
_WEBHOOK_TIMEOUT = 10.0

_BAD_CREDENTIALS = "Bad credentials"
_NOT_ACCESSIBLE = "Resource not accessible by integration"
_SUSPENDED = "This installation has been suspended"
_REPO_NOT_IN_INSTALLATION = (
    "There is at least one repository that does not exist or is not "
    "accessible to the parent installation."
)
_PERMISSION_NOT_GRANTED = (
    "The permissions requested are not granted to this installation."
)


def generate_app_key() -> bytes:
    """Return a new 2048-bit RSA private key as PKCS#1 PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    try:
        public = serialization.load_pem_public_key(pem)
    except ValueError:
        private = serialization.load_pem_private_key(pem, password=None)
        public = private.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise TypeError("the App key must be an RSA key")
    return public


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the emulator answered.

    ``time`` is the emulator's clock in Unix seconds when the request
    arrived. ``installation_id`` is set when an installation token
    authenticated it. ``body`` is empty for git requests.
    """

    method: str
    path: str
    status: int
    installation_id: int | None
    time: float
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)

    def json(self) -> Any:
        """Return the request body decoded as JSON."""
        return json.loads(self.body)


@dataclass(slots=True)
class _Installation:
    id: int
    account: str
    repositories: list[str] | None
    permissions: dict[str, str]
    suspended: bool = False


@dataclass(slots=True)
class _Token:
    installation_id: int
    expires_at: float
    repositories: frozenset[str] | None
    permissions: dict[str, str]
    revoked: bool = False


@dataclass(slots=True)
class _Fault:
    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: object | None
    remaining: int
    delay: float


class Emulator:
    """The emulated GitHub: one App, its installations and repositories.

    ``public_key`` is the App's public key PEM, or its private key PEM from
    which the public key is taken. ``repos_root`` is the directory that
    holds the bare repositories as ``owner/name.git``. ``webhook_url`` and
    ``webhook_secret`` are where and how hook deliveries are sent; both may
    be set after construction.
    """

    def __init__(
        self,
        *,
        app_id: int,
        public_key: bytes,
        repos_root: Path,
        slug: str = "ghappd-sandbox",
        client_id: str | None = None,
        owner: str = "octo-org",
        webhook_url: str | None = None,
        webhook_secret: bytes | None = None,
    ) -> None:
        self.app_id = app_id
        self.slug = slug
        self.client_id = client_id or f"Iv23li{app_id:014d}"
        self.owner = owner
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.token_ttl = 3600.0
        self.clock_offset = 0.0
        self.api_url = ""
        self.git_url = ""

        self.requests: list[RecordedRequest] = []
        self.check_runs: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, dict[str, Any]] = {}
        self.reviews: list[dict[str, Any]] = []
        self.deliveries: list[dict[str, Any]] = []
        self.redelivery_attempts: list[str | int] = []
        self.repositories: dict[str, dict[str, Any]] = {}

        self._public_key = _load_public_key(public_key)
        self._store = RepositoryStore(root=repos_root)
        self._installations: dict[int, _Installation] = {}
        self._tokens: dict[str, _Token] = {}
        self._faults: list[_Fault] = []
        self._ids = itertools.count(1)
        self._check_suites: dict[tuple[str, str], int] = {}
        self._check_run_repo: dict[int, str] = {}
        self._comment_issue: dict[int, tuple[str, int]] = {}
        self._delivery_bodies: dict[int, bytes] = {}
        self._app = self._build_app()

    @property
    def repos_root(self) -> Path:
        """The directory that holds the bare repositories."""
        return self._store.root

    def now(self) -> float:
        """Return the emulator's clock: Unix seconds plus ``clock_offset``."""
        return time.time() + self.clock_offset

    # ------------------------------------------------------------------
    # Serving

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the emulator over HTTP until cancelled.

        Reports ``api_url`` through ``task_status`` once the socket is
        bound, so ``port=0`` picks a free port. Cancellation closes the
        listener and any open connection.
        """
        config = Config()
        config.bind = [f"{host}:{port}"]
        config.include_date_header = False
        config.include_server_header = False
        config.graceful_timeout = 0.1
        config.accesslog = None

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn_serve, self._app, config))
            self.api_url = str(binds[0]).rstrip("/")
            self.git_url = f"{self.api_url}/git"
            log.info("sandbox GitHub serving at %s", self.api_url)
            task_status.started(self.api_url)

    # ------------------------------------------------------------------
    # State that tests set up

    def add_installation(
        self,
        installation_id: int,
        *,
        account: str,
        repositories: list[str] | None = None,
        permissions: dict[str, str] | None = None,
    ) -> None:
        """Install the App on ``account``.

        ``repositories`` lists the ``owner/name`` repositories the
        installation may reach; None means every repository of ``account``.
        ``permissions`` replaces the default grant, ``DEFAULT_PERMISSIONS``.
        """
        for full_name in repositories or []:
            if not valid_full_name(full_name):
                raise ValueError(f"invalid repository name {full_name!r}")
        self._installations[installation_id] = _Installation(
            id=installation_id,
            account=account,
            repositories=None if repositories is None else list(repositories),
            permissions=dict(
                DEFAULT_PERMISSIONS if permissions is None else permissions
            ),
        )

    def suspend(self, installation_id: int) -> None:
        """Suspend an installation: its tokens and new tokens answer 403."""
        self._installation(installation_id).suspended = True

    def unsuspend(self, installation_id: int) -> None:
        """Lift the suspension of an installation."""
        self._installation(installation_id).suspended = False

    def uninstall(self, installation_id: int) -> None:
        """Remove an installation and revoke every token minted for it."""
        self._installations.pop(installation_id)
        for token in self._tokens.values():
            if token.installation_id == installation_id:
                token.revoked = True

    def revoke_token(self, token: str) -> None:
        """Revoke an installation token: it answers 401 from now on."""
        self._tokens[token].revoked = True

    def create_repository(
        self,
        full_name: str,
        files: Mapping[str, str | bytes],
        *,
        branch: str = "main",
        message: str = "Initial commit",
    ) -> str:
        """Create the bare repository ``full_name`` and return its first commit sha."""
        sha = self._store.create(full_name, files, branch=branch, message=message)
        owner, name = full_name.split("/")
        repo_id = next(self._ids)
        self.repositories[full_name] = {
            "id": repo_id,
            "node_id": f"R_{repo_id}",
            "name": name,
            "full_name": full_name,
            "private": True,
            "owner": {"login": owner, "id": 1, "type": "Organization"},
            "default_branch": branch,
        }
        return sha

    def commit(
        self,
        full_name: str,
        files: Mapping[str, str | bytes],
        *,
        branch: str = "main",
        message: str = "Update files",
    ) -> str:
        """Add a commit that writes ``files`` on ``branch``; return its sha."""
        return self._store.commit(full_name, files, branch=branch, message=message)

    def force_push(
        self,
        full_name: str,
        files: Mapping[str, str | bytes],
        *,
        branch: str,
        message: str = "Rewrite the last commit",
    ) -> str:
        """Replace the tip of ``branch`` and prune the old commit; return the new sha.

        See RepositoryStore.force_push for the tree the new tip gets and
        the ``refs/pull/*/head`` refs that move with it.
        """
        return self._store.force_push(full_name, files, branch=branch, message=message)

    def pull_ref(self, full_name: str, number: int, sha: str) -> None:
        """Set ``refs/pull/<number>/head`` of the repository to ``sha``."""
        self._store.pull_ref(full_name, number, sha)

    def resolve(self, full_name: str, ref: str) -> str | None:
        """Return the commit sha ``ref`` names in the repository, or None."""
        return self._store.resolve(full_name, ref)

    def inject(
        self,
        *,
        method: str,
        path: str,
        status: int,
        headers: dict[str, str] | None = None,
        body: object | None = None,
        times: int = 1,
        delay: float = 0.0,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status``.

        ``method`` is an HTTP method or ``*``; ``path`` is an fnmatch glob
        on the request path (no query string). ``body`` is sent as is when
        it is ``bytes`` or ``str``, as JSON otherwise, and as GitHub's error
        shape when None. ``delay`` is how many seconds pass before the
        answer. Faults match in the order they were injected, and they
        answer before authentication is checked.
        """
        if times < 1:
            raise ValueError(f"invalid times {times!r}: must be >= 1")
        self._faults.append(
            _Fault(
                method=method.upper(),
                path=path,
                status=status,
                headers=dict(headers or {}),
                body=body,
                remaining=times,
                delay=delay,
            )
        )

    def add_hook_delivery(
        self,
        *,
        guid: str,
        event: str,
        action: str | None,
        installation_id: int | None,
        status_code: int,
        payload: object,
        delivered_at: datetime | str | float | None = None,
        redelivery: bool = False,
    ) -> int:
        """Record a hook delivery as ``GET /app/hook/deliveries`` lists it.

        ``payload`` is a JSON value, or the raw ``bytes`` body that was
        sent. ``delivered_at`` is a datetime, an ISO 8601 string, or Unix
        seconds, and defaults to the emulator's clock. Returns the
        delivery's id.
        """
        delivery_id = next(self._ids)
        if delivered_at is None:
            stamp = iso8601(self.now())
        elif isinstance(delivered_at, datetime):
            stamp = iso8601(delivered_at.timestamp())
        elif isinstance(delivered_at, str):
            stamp = iso8601(datetime.fromisoformat(delivered_at).timestamp())
        else:
            stamp = iso8601(delivered_at)
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        repository = None
        if isinstance(payload, dict) and isinstance(payload.get("repository"), dict):
            repository = payload["repository"].get("id")
        self.deliveries.append(
            {
                "id": delivery_id,
                "guid": guid,
                "delivered_at": stamp,
                "redelivery": redelivery,
                "duration": 0.05,
                "status": "OK" if 200 <= status_code < 300 else f"HTTP {status_code}",
                "status_code": status_code,
                "event": event,
                "action": action,
                "installation_id": installation_id,
                "repository_id": repository,
            }
        )
        self._delivery_bodies[delivery_id] = body
        return delivery_id

    # ------------------------------------------------------------------
    # Internals shared by the routes

    def _installation(self, installation_id: int) -> _Installation:
        try:
            return self._installations[installation_id]
        except KeyError:
            raise KeyError(f"no installation {installation_id!r}") from None

    def _app_json(self) -> dict[str, Any]:
        return {
            "id": self.app_id,
            "slug": self.slug,
            "node_id": f"A_{self.app_id}",
            "client_id": self.client_id,
            "name": self.slug,
            "description": "A GitHub App served by the ghappd sandbox.",
            "external_url": self.api_url,
            "html_url": f"{self.api_url}/apps/{self.slug}",
            "owner": {"login": self.owner, "id": 1, "type": "Organization"},
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "permissions": dict(DEFAULT_PERMISSIONS),
            "events": list(DEFAULT_EVENTS),
            "installations_count": len(self._installations),
        }

    def _bot_user(self) -> dict[str, Any]:
        return {"login": f"{self.slug}[bot]", "id": self.app_id, "type": "Bot"}

    def _installation_json(self, installation: _Installation) -> dict[str, Any]:
        return {
            "id": installation.id,
            "account": {"login": installation.account, "id": 1, "type": "Organization"},
            "app_id": self.app_id,
            "app_slug": self.slug,
            "target_type": "Organization",
            "repository_selection": (
                "all" if installation.repositories is None else "selected"
            ),
            "permissions": dict(installation.permissions),
            "events": list(DEFAULT_EVENTS),
            "suspended_at": iso8601(self.now()) if installation.suspended else None,
            "access_tokens_url": (
                f"{self.api_url}/app/installations/{installation.id}/access_tokens"
            ),
        }

    def _reachable(self, installation: _Installation, full_name: str) -> bool:
        if installation.repositories is None:
            return full_name.split("/")[0] == installation.account
        return full_name in installation.repositories

    def _authenticate_app(self) -> None:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credential:
            raise APIError(
                401,
                "A JSON web token could not be decoded"
                if credential
                else "Requires authentication",
            )
        if credential.startswith("ghs_"):
            raise APIError(
                401,
                "A JSON web token could not be decoded",
            )
        try:
            verify_app_jwt(
                credential,
                public_key=self._public_key,
                app_id=self.app_id,
                client_id=self.client_id,
                now=self.now(),
            )
        except JWTRejected as exc:
            log.info("App JWT rejected: %s", exc)
            raise APIError(401, str(exc)) from None

    def _token(self, credential: str) -> _Token:
        token = self._tokens.get(credential)
        if token is None or token.revoked or self.now() >= token.expires_at:
            raise APIError(401, _BAD_CREDENTIALS)
        installation = self._installations.get(token.installation_id)
        if installation is None:
            raise APIError(401, _BAD_CREDENTIALS)
        g.installation_id = token.installation_id
        if installation.suspended:
            raise APIError(403, _SUSPENDED)
        return token

    def _authorize_repository(
        self, owner: str, repo: str, permission: str, level: str
    ) -> _Token:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() not in {"token", "bearer"} or not credential:
            raise APIError(401, "Requires authentication")
        token = self._token(credential)
        full_name = f"{owner}/{repo}"
        installation = self._installations[token.installation_id]
        if full_name not in self.repositories:
            raise APIError(404, "Not Found")
        in_scope = self._reachable(installation, full_name) and (
            token.repositories is None or full_name in token.repositories
        )
        if not in_scope:
            raise APIError(403, _NOT_ACCESSIBLE)
        granted = token.permissions.get(permission)
        if granted is None or _LEVELS[granted] < _LEVELS[level]:
            raise APIError(403, _NOT_ACCESSIBLE)
        return token

    async def _json_body(self) -> Any:
        data = await request.get_data(True, False, False)
        if not data:
            return {}
        try:
            return json.loads(data)
        except ValueError:
            raise APIError(400, "Problems parsing JSON") from None

    def _match_fault(self) -> _Fault | None:
        for fault in self._faults:
            method_matches = fault.method in {"*", request.method}
            if method_matches and fnmatch.fnmatchcase(request.path, fault.path):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    # ------------------------------------------------------------------
    # Tokens

    def _mint_token(self, installation_id: int, body: object) -> dict[str, Any]:
        installation = self._installations.get(installation_id)
        if installation is None:
            raise APIError(404, "Not Found")
        if installation.suspended:
            raise APIError(403, _SUSPENDED)
        if not isinstance(body, dict):
            raise invalid(f"the body must be a JSON object, not {body!r}.")

        scope: set[str] | None = None
        names = body.get("repositories")
        ids = body.get("repository_ids")
        if names is not None or ids is not None:
            scope = set()
            if names is not None:
                if not isinstance(names, list) or not all(
                    isinstance(name, str) for name in names
                ):
                    raise invalid("'repositories' must be an array of strings.")
                scope.update(f"{installation.account}/{name}" for name in names)
            if ids is not None:
                if not isinstance(ids, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in ids
                ):
                    raise invalid("'repository_ids' must be an array of integers.")
                by_id = {repo["id"]: name for name, repo in self.repositories.items()}
                for repo_id in ids:
                    if repo_id not in by_id:
                        raise APIError(422, _REPO_NOT_IN_INSTALLATION)
                    scope.add(by_id[repo_id])
            for full_name in scope:
                if full_name not in self.repositories or not self._reachable(
                    installation, full_name
                ):
                    raise APIError(422, _REPO_NOT_IN_INSTALLATION)
        elif installation.repositories is not None:
            scope = set(installation.repositories)

        permissions = dict(installation.permissions)
        requested = body.get("permissions")
        if requested is not None:
            if not isinstance(requested, dict):
                raise invalid("'permissions' must be an object.")
            for name, level in requested.items():
                granted = installation.permissions.get(name)
                if (
                    level not in _LEVELS
                    or granted is None
                    or _LEVELS[level] > _LEVELS[granted]
                ):
                    raise APIError(422, _PERMISSION_NOT_GRANTED)
            permissions = dict(requested)

        value = "ghs_" + "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(76))
        expires_at = self.now() + self.token_ttl
        explicit = scope is not None and (names is not None or ids is not None)
        self._tokens[value] = _Token(
            installation_id=installation_id,
            expires_at=expires_at,
            repositories=None if scope is None else frozenset(scope),
            permissions=permissions,
        )
        log.info("token minted for installation %d", installation_id)
        answer: dict[str, Any] = {
            "token": value,
            "expires_at": iso8601(expires_at),
            "permissions": permissions,
            "repository_selection": "selected" if scope is not None else "all",
        }
        if scope is not None and (explicit or installation.repositories is not None):
            answer["repositories"] = [
                self.repositories[name]
                for name in sorted(scope)
                if name in self.repositories
            ]
        return answer

    # ------------------------------------------------------------------
    # Check runs

    async def _check_run_exists(self, full_name: str, sha: str) -> bool:
        result = await trio.run_process(
            [
                "git",
                "--git-dir",
                str(self._store.path(full_name)),
                "cat-file",
                "-e",
                f"{sha}^{{commit}}",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return result.returncode == 0

    async def _create_check_run(self, full_name: str, body: object) -> dict[str, Any]:
        run_id = next(self._ids)
        url = f"{self.api_url}/repos/{full_name}/check-runs/{run_id}"
        html_url = f"{self.api_url}/{full_name}/runs/{run_id}"
        blank: dict[str, Any] = {
            "id": run_id,
            "node_id": f"CR_{run_id}",
            "head_sha": "",
            "external_id": "",
            "url": url,
            "html_url": html_url,
            "details_url": html_url,
            "status": "queued",
            "conclusion": None,
            "started_at": iso8601(self.now()),
            "completed_at": None,
            "output": {
                "title": None,
                "summary": None,
                "text": None,
                "annotations_count": 0,
                "annotations_url": f"{url}/annotations",
            },
            "name": "",
            "check_suite": {"id": 0},
            "app": self._app_json(),
            "pull_requests": [],
            "annotations": [],
        }
        run = _checks.apply_check_run(
            blank, body, now=iso8601(self.now()), creating=True
        )
        sha = run["head_sha"]
        if not await self._check_run_exists(full_name, sha):
            raise APIError(422, f"No commit found for SHA: {sha}")
        suite = self._check_suites.setdefault((full_name, sha), next(self._ids))
        run["check_suite"] = {"id": suite}
        self.check_runs[run_id] = run
        self._check_run_repo[run_id] = full_name
        log.info("check run %d created on %s", run_id, full_name)
        return _checks.public_view(run)

    def _stored_check_run(self, full_name: str, run_id: int) -> dict[str, Any]:
        if self._check_run_repo.get(run_id) != full_name:
            raise APIError(404, "Not Found")
        return self.check_runs[run_id]

    async def _list_check_runs(self, full_name: str, ref: str) -> dict[str, Any]:
        sha = self._store.resolve(full_name, ref)
        if sha is None:
            raise APIError(422, f"No commit found for SHA: {ref}")
        runs = [
            run
            for run_id, run in self.check_runs.items()
            if self._check_run_repo[run_id] == full_name and run["head_sha"] == sha
        ]
        args = request.args
        if "check_name" in args:
            runs = [run for run in runs if run["name"] == args["check_name"]]
        if "status" in args:
            runs = [run for run in runs if run["status"] == args["status"]]
        chosen = args.get("filter", "latest")
        if chosen not in {"latest", "all"}:
            raise invalid(f"'filter' must be latest or all, not {chosen!r}.")
        runs.sort(key=lambda run: run["id"], reverse=True)
        if chosen == "latest":
            seen: set[str] = set()
            latest = []
            for run in runs:
                if run["name"] not in seen:
                    seen.add(run["name"])
                    latest.append(run)
            runs = latest
        page = _page_slice(runs)
        return {
            "total_count": len(runs),
            "check_runs": [_checks.public_view(run) for run in page],
        }

    # ------------------------------------------------------------------
    # Issue comments and reviews

    def _new_comment(self, full_name: str, number: int, body: object) -> dict[str, Any]:
        text = _comment_body(body, required=True)
        comment_id = next(self._ids)
        stamp = iso8601(self.now())
        comment = {
            "id": comment_id,
            "node_id": f"IC_{comment_id}",
            "url": f"{self.api_url}/repos/{full_name}/issues/comments/{comment_id}",
            "html_url": (
                f"{self.api_url}/{full_name}/issues/{number}#issuecomment-{comment_id}"
            ),
            "issue_url": f"{self.api_url}/repos/{full_name}/issues/{number}",
            "body": text,
            "user": self._bot_user(),
            "created_at": stamp,
            "updated_at": stamp,
            "author_association": "NONE",
            "performed_via_github_app": self._app_json(),
        }
        self.comments[comment_id] = comment
        self._comment_issue[comment_id] = (full_name, number)
        log.info("comment %d created on %s#%d", comment_id, full_name, number)
        return comment

    def _update_comment(
        self, full_name: str, comment_id: int, body: object
    ) -> dict[str, Any]:
        where = self._comment_issue.get(comment_id)
        if where is None or where[0] != full_name:
            raise APIError(404, "Not Found")
        comment = self.comments[comment_id]
        comment["body"] = _comment_body(body, required=True)
        comment["updated_at"] = iso8601(self.now())
        return comment

    def _new_review(self, full_name: str, number: int, body: object) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise invalid(f"the body must be a JSON object, not {body!r}.")
        event = body.get("event")
        states = {
            None: "PENDING",
            "APPROVE": "APPROVED",
            "REQUEST_CHANGES": "CHANGES_REQUESTED",
            "COMMENT": "COMMENTED",
        }
        if event not in states:
            raise invalid(
                f"'event' must be APPROVE, REQUEST_CHANGES or COMMENT, not {event!r}."
            )
        text = _comment_body(body, required=False)
        comments = body.get("comments", [])
        if not isinstance(comments, list):
            raise invalid("'comments' must be an array.")
        for index, item in enumerate(comments):
            _review_comment(index, item)
        if event in {"REQUEST_CHANGES", "COMMENT"} and not text and not comments:
            raise APIError(
                422,
                "Unprocessable Entity",
                extra={"errors": [f"Body is required for event {event}."]},
            )
        commit_id = body.get("commit_id")
        if commit_id is None:
            commit_id = self._store.resolve(full_name, f"refs/pull/{number}/head")
        elif not isinstance(commit_id, str):
            raise invalid(f"'commit_id' must be a string, not {commit_id!r}.")

        review_id = next(self._ids)
        review = {
            "id": review_id,
            "node_id": f"PRR_{review_id}",
            "user": self._bot_user(),
            "body": text,
            "state": states[event],
            "html_url": (
                f"{self.api_url}/{full_name}/pull/{number}#pullrequestreview-{review_id}"
            ),
            "pull_request_url": f"{self.api_url}/repos/{full_name}/pulls/{number}",
            "commit_id": commit_id,
            "submitted_at": None if event is None else iso8601(self.now()),
            "author_association": "NONE",
        }
        self.reviews.append({**review, "comments": [dict(item) for item in comments]})
        log.info("review %d created on %s#%d", review_id, full_name, number)
        return review

    # ------------------------------------------------------------------
    # Hook deliveries

    def _list_deliveries(self) -> tuple[list[dict[str, Any]], str | None]:
        per_page = _per_page()
        ordered = sorted(
            self.deliveries,
            key=lambda item: (item["delivered_at"], item["id"]),
            reverse=True,
        )
        start = 0
        cursor = request.args.get("cursor")
        if cursor:
            ids = [item["id"] for item in ordered]
            try:
                start = ids.index(int(cursor.removeprefix("v1_"))) + 1
            except ValueError:
                raise APIError(422, f"Invalid cursor: {cursor!r}") from None
        page = ordered[start : start + per_page]
        next_link = None
        if start + per_page < len(ordered):
            query = urlencode({"per_page": per_page, "cursor": f"v1_{page[-1]['id']}"})
            next_link = f'<{self.api_url}/app/hook/deliveries?{query}>; rel="next"'
        return page, next_link

    async def _redeliver(self, delivery_id: int) -> None:
        original = next(
            (item for item in self.deliveries if item["id"] == delivery_id), None
        )
        if original is None:
            raise APIError(404, "Not Found")
        self.redelivery_attempts.append(delivery_id)
        body = self._delivery_bodies[delivery_id]
        status = await self._send_webhook(
            event=original["event"], guid=original["guid"], body=body
        )
        self.add_hook_delivery(
            guid=original["guid"],
            event=original["event"],
            action=original["action"],
            installation_id=original["installation_id"],
            status_code=status,
            payload=body,
            redelivery=True,
        )

    def sign(self, body: bytes) -> str:
        """Return ``X-Hub-Signature-256`` for ``body`` with ``webhook_secret``."""
        if self.webhook_secret is None:
            raise ValueError("webhook_secret is not set")
        digest = hmac.new(self.webhook_secret, body, hashlib.sha256).hexdigest()
        return f"sha256={digest}"

    async def send_webhook(
        self,
        *,
        event: str,
        payload: object,
        guid: str | None = None,
    ) -> int:
        """Send one webhook delivery to ``webhook_url`` as GitHub does.

        The body is ``payload`` as JSON (or as is when it is ``bytes``),
        signed with ``webhook_secret``. The delivery is recorded as a hook
        delivery, so it can be listed and redelivered. Returns the status
        the receiver answered, or 0 when it could not be reached.
        """
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        decoded = json.loads(body)
        guid = guid or secrets.token_hex(16)
        status = await self._send_webhook(event=event, guid=guid, body=body)
        installation = (
            decoded.get("installation") if isinstance(decoded, dict) else None
        )
        self.add_hook_delivery(
            guid=guid,
            event=event,
            action=decoded.get("action") if isinstance(decoded, dict) else None,
            installation_id=(
                installation.get("id") if isinstance(installation, dict) else None
            ),
            status_code=status,
            payload=body,
        )
        return status

    async def _send_webhook(self, *, event: str, guid: str, body: bytes) -> int:
        # The headers of a delivery are listed in GitHub's "Webhook events
        # and payloads", section "Delivery headers".
        if self.webhook_url is None:
            log.info("delivery %s not sent: webhook_url is not set", guid)
            return 0
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/sandbox",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": guid,
            "X-GitHub-Hook-ID": "1",
            "X-GitHub-Hook-Installation-Target-Type": "integration",
            "X-GitHub-Hook-Installation-Target-ID": str(self.app_id),
        }
        if self.webhook_secret is not None:
            headers["X-Hub-Signature-256"] = self.sign(body)
        try:
            async with httpx.AsyncClient(timeout=_WEBHOOK_TIMEOUT) as client:
                response = await client.post(
                    self.webhook_url, content=body, headers=headers
                )
        except httpx.HTTPError as exc:
            log.info("delivery %s to %s failed: %r", guid, self.webhook_url, exc)
            return 0
        log.info("delivery %s answered %d", guid, response.status_code)
        return response.status_code

    # ------------------------------------------------------------------
    # git smart HTTP

    def _authorize_git(self, full_name: str) -> None:
        challenge = {"WWW-Authenticate": 'Basic realm="GitHub"'}
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        rejected = APIError(401, "Invalid username or token.", headers=challenge)
        if scheme.lower() != "basic":
            raise rejected
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except ValueError:
            raise rejected from None
        user, _, secret = decoded.partition(":")
        if user != "x-access-token":
            raise rejected
        token = self._tokens.get(secret)
        if token is None or token.revoked or self.now() >= token.expires_at:
            raise rejected
        installation = self._installations.get(token.installation_id)
        if installation is None or installation.suspended:
            raise rejected
        g.installation_id = token.installation_id
        if not self._reachable(installation, full_name):
            raise rejected
        if token.repositories is not None and full_name not in token.repositories:
            raise rejected
        if "contents" not in token.permissions:
            raise rejected

    async def _git(self, owner: str, repo: str, rest: str) -> Response:
        if not repo.endswith(".git"):
            raise APIError(404, "Not Found")
        full_name = f"{owner}/{repo.removesuffix('.git')}"
        if not valid_full_name(full_name):
            raise APIError(404, "Not Found")
        service = request.args.get("service")
        if rest == "git-receive-pack" or service == "git-receive-pack":
            raise APIError(403, "Write access to repository not granted.")
        smart_refs = rest == "info/refs" and service == "git-upload-pack"
        upload = rest == "git-upload-pack" and request.method == "POST"
        if not smart_refs and not upload:
            raise APIError(404, "Not Found")
        self._authorize_git(full_name)
        if full_name not in self.repositories:
            raise APIError(404, "Repository not found.")

        body = await request.get_data(True, False, False)
        answer = await _git_http.run_http_backend(
            project_root=self._store.root,
            path_info=f"/{full_name}.git/{rest}",
            method=request.method,
            query_string=request.query_string.decode(),
            content_type=request.headers.get("Content-Type", ""),
            content_encoding=request.headers.get("Content-Encoding"),
            git_protocol=request.headers.get("Git-Protocol"),
            body=body,
        )
        return Response(answer.body, status=answer.status, headers=answer.headers)

    # ------------------------------------------------------------------
    # The app

    def _build_app(self) -> QuartTrio:
        app = QuartTrio(__name__)
        app.config["MAX_CONTENT_LENGTH"] = _MAX_BODY
        app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
        emulator = self

        @app.before_request
        async def _before() -> Response | None:
            g.arrived = emulator.now()
            g.installation_id = None
            fault = emulator._match_fault()
            if fault is None:
                return None
            if fault.delay:
                await trio.sleep(fault.delay)
            log.info(
                "injected %d for %s %s", fault.status, request.method, request.path
            )
            return _fault_response(fault)

        @app.after_request
        async def _after(response: Response) -> Response:
            response.headers["Date"] = formatdate(emulator.now(), usegmt=True)
            is_git = request.path.startswith("/git/")
            body = b"" if is_git else await request.get_data(True, False, False)
            emulator.requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.path,
                    status=response.status_code,
                    installation_id=g.get("installation_id"),
                    time=g.get("arrived", emulator.now()),
                    query=request.query_string.decode(),
                    headers=dict(request.headers),
                    body=body,
                )
            )
            return response

        @app.errorhandler(APIError)
        async def _api_error(error: APIError) -> Response:
            response = Response(
                json.dumps(error.body()),
                status=error.status,
                content_type="application/json; charset=utf-8",
            )
            response.headers.update(error.headers)
            return response

        @app.errorhandler(404)
        async def _not_found(error: Exception) -> Response:
            return await _api_error(APIError(404, "Not Found"))

        @app.errorhandler(405)
        async def _not_allowed(error: Exception) -> Response:
            return await _api_error(APIError(404, "Not Found"))

        @app.get("/app")
        async def _get_app() -> Any:
            emulator._authenticate_app()
            return emulator._app_json()

        @app.get("/app/installations")
        async def _list_installations() -> Any:
            emulator._authenticate_app()
            items = sorted(emulator._installations.values(), key=lambda i: i.id)
            return [emulator._installation_json(item) for item in items]

        @app.get("/app/installations/<int:installation_id>")
        async def _get_installation(installation_id: int) -> Any:
            emulator._authenticate_app()
            installation = emulator._installations.get(installation_id)
            if installation is None:
                raise APIError(404, "Not Found")
            return emulator._installation_json(installation)

        @app.post("/app/installations/<int:installation_id>/access_tokens")
        async def _access_tokens(installation_id: int) -> Any:
            emulator._authenticate_app()
            body = await emulator._json_body()
            return emulator._mint_token(installation_id, body), 201

        @app.get("/repos/<owner>/<repo>/installation")
        async def _repo_installation(owner: str, repo: str) -> Any:
            emulator._authenticate_app()
            full_name = f"{owner}/{repo}"
            for installation in emulator._installations.values():
                if full_name in emulator.repositories and emulator._reachable(
                    installation, full_name
                ):
                    return emulator._installation_json(installation)
            raise APIError(404, "Not Found")

        @app.get("/repos/<owner>/<repo>")
        async def _get_repo(owner: str, repo: str) -> Any:
            emulator._authorize_repository(owner, repo, "metadata", "read")
            return emulator.repositories[f"{owner}/{repo}"]

        @app.post("/repos/<owner>/<repo>/check-runs")
        async def _post_check_run(owner: str, repo: str) -> Any:
            emulator._authorize_repository(owner, repo, "checks", "write")
            body = await emulator._json_body()
            return await emulator._create_check_run(f"{owner}/{repo}", body), 201

        @app.get("/repos/<owner>/<repo>/check-runs/<int:run_id>")
        async def _get_check_run(owner: str, repo: str, run_id: int) -> Any:
            emulator._authorize_repository(owner, repo, "checks", "read")
            run = emulator._stored_check_run(f"{owner}/{repo}", run_id)
            return _checks.public_view(run)

        @app.patch("/repos/<owner>/<repo>/check-runs/<int:run_id>")
        async def _patch_check_run(owner: str, repo: str, run_id: int) -> Any:
            emulator._authorize_repository(owner, repo, "checks", "write")
            run = emulator._stored_check_run(f"{owner}/{repo}", run_id)
            body = await emulator._json_body()
            if isinstance(body, dict) and "head_sha" in body:
                raise invalid("'head_sha' cannot be changed.")
            updated = _checks.apply_check_run(
                run, body, now=iso8601(emulator.now()), creating=False
            )
            emulator.check_runs[run_id] = updated
            return _checks.public_view(updated)

        @app.get("/repos/<owner>/<repo>/check-runs/<int:run_id>/annotations")
        async def _get_annotations(owner: str, repo: str, run_id: int) -> Any:
            emulator._authorize_repository(owner, repo, "checks", "read")
            run = emulator._stored_check_run(f"{owner}/{repo}", run_id)
            return _page_slice(run["annotations"])

        @app.get("/repos/<owner>/<repo>/commits/<path:ref>/check-runs")
        async def _list_runs(owner: str, repo: str, ref: str) -> Any:
            emulator._authorize_repository(owner, repo, "checks", "read")
            return await emulator._list_check_runs(f"{owner}/{repo}", ref)

        @app.post("/repos/<owner>/<repo>/issues/<int:number>/comments")
        async def _post_comment(owner: str, repo: str, number: int) -> Any:
            _authorize_issue_write(emulator, owner, repo)
            body = await emulator._json_body()
            return emulator._new_comment(f"{owner}/{repo}", number, body), 201

        @app.get("/repos/<owner>/<repo>/issues/<int:number>/comments")
        async def _list_comments(owner: str, repo: str, number: int) -> Any:
            _authorize_issue_read(emulator, owner, repo)
            where = (f"{owner}/{repo}", number)
            items = [
                emulator.comments[comment_id]
                for comment_id, issue in sorted(emulator._comment_issue.items())
                if issue == where
            ]
            return _page_slice(items)

        @app.get("/repos/<owner>/<repo>/issues/comments/<int:comment_id>")
        async def _get_comment(owner: str, repo: str, comment_id: int) -> Any:
            _authorize_issue_read(emulator, owner, repo)
            where = emulator._comment_issue.get(comment_id)
            if where is None or where[0] != f"{owner}/{repo}":
                raise APIError(404, "Not Found")
            return emulator.comments[comment_id]

        @app.patch("/repos/<owner>/<repo>/issues/comments/<int:comment_id>")
        async def _patch_comment(owner: str, repo: str, comment_id: int) -> Any:
            _authorize_issue_write(emulator, owner, repo)
            body = await emulator._json_body()
            return emulator._update_comment(f"{owner}/{repo}", comment_id, body)

        @app.post("/repos/<owner>/<repo>/pulls/<int:number>/reviews")
        async def _post_review(owner: str, repo: str, number: int) -> Any:
            emulator._authorize_repository(owner, repo, "pull_requests", "write")
            body = await emulator._json_body()
            return emulator._new_review(f"{owner}/{repo}", number, body)

        @app.get("/app/hook/deliveries")
        async def _list_hook_deliveries() -> Any:
            emulator._authenticate_app()
            page, next_link = emulator._list_deliveries()
            headers = {"Link": next_link} if next_link else {}
            return page, 200, headers

        @app.get("/app/hook/deliveries/<int:delivery_id>")
        async def _get_hook_delivery(delivery_id: int) -> Any:
            emulator._authenticate_app()
            for item in emulator.deliveries:
                if item["id"] == delivery_id:
                    payload = json.loads(emulator._delivery_bodies[delivery_id])
                    return {
                        **item,
                        "url": emulator.webhook_url,
                        "request": {"headers": {}, "payload": payload},
                        "response": {"headers": {}, "payload": None},
                    }
            raise APIError(404, "Not Found")

        @app.post("/app/hook/deliveries/<int:delivery_id>/attempts")
        async def _redeliver(delivery_id: int) -> Any:
            emulator._authenticate_app()
            await emulator._redeliver(delivery_id)
            return {}, 202

        @app.route("/git/<owner>/<repo>/<path:rest>", methods=["GET", "POST"])
        async def _git(owner: str, repo: str, rest: str) -> Response:
            return await emulator._git(owner, repo, rest)

        return app


def _authorize_issue_write(emulator: Emulator, owner: str, repo: str) -> None:
    # Issue comments on a pull request are allowed with either the issues
    # or the pull_requests permission ("Create an issue comment").
    try:
        emulator._authorize_repository(owner, repo, "issues", "write")
    except APIError as exc:
        if exc.status != 403 or exc.message != _NOT_ACCESSIBLE:
            raise
        emulator._authorize_repository(owner, repo, "pull_requests", "write")


def _authorize_issue_read(emulator: Emulator, owner: str, repo: str) -> None:
    try:
        emulator._authorize_repository(owner, repo, "issues", "read")
    except APIError as exc:
        if exc.status != 403 or exc.message != _NOT_ACCESSIBLE:
            raise
        emulator._authorize_repository(owner, repo, "pull_requests", "read")


def _comment_body(body: object, *, required: bool) -> str:
    # GitHub caps a comment body at 65536 characters.
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object, not {body!r}.")
    text = body.get("body")
    if text is None and not required:
        return ""
    if not isinstance(text, str) or (required and not text):
        raise invalid("'body' wasn't supplied.")
    if len(text) > 65536:
        raise APIError(
            422,
            "Validation Failed",
            extra={
                "errors": [
                    {
                        "resource": "IssueComment",
                        "code": "custom",
                        "field": "body",
                        "message": "body is too long (maximum is 65536 characters)",
                    }
                ]
            },
        )
    return text


def _review_comment(index: int, item: object) -> None:
    where = f"comments[{index}]"
    if not isinstance(item, dict):
        raise invalid(f"{where} must be an object, not {item!r}.")
    for key in ("path", "body"):
        if not isinstance(item.get(key), str):
            raise invalid(f"{where} is missing the required string {key!r}.")
    if "position" not in item and "line" not in item:
        raise invalid(f"{where} needs either 'position' or 'line'.")


def _per_page() -> int:
    raw = request.args.get("per_page", "30")
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"'per_page' must be an integer, not {raw!r}.") from None
    return max(1, min(value, 100))


def _page_slice(items: list[Any]) -> list[Any]:
    per_page = _per_page()
    raw = request.args.get("page", "1")
    try:
        page = max(1, int(raw))
    except ValueError:
        raise invalid(f"'page' must be an integer, not {raw!r}.") from None
    start = (page - 1) * per_page
    return items[start : start + per_page]


def _fault_response(fault: _Fault) -> Response:
    if fault.body is None:
        try:
            reason = HTTPStatus(fault.status).phrase
        except ValueError:
            reason = "Error"
        data = json.dumps(APIError(fault.status, reason).body()).encode()
        content_type = "application/json; charset=utf-8"
    elif isinstance(fault.body, bytes | str):
        data = fault.body.encode() if isinstance(fault.body, str) else fault.body
        content_type = "text/plain; charset=utf-8"
    else:
        data = json.dumps(fault.body).encode()
        content_type = "application/json; charset=utf-8"
    response = Response(data, status=fault.status, content_type=content_type)
    response.headers.update(fault.headers)
    return response
