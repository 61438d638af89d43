"""A local emulator of the GitHub REST endpoints and git smart HTTP ghappd uses.

The emulator is a quart-trio app served by hypercorn on 127.0.0.1. It
verifies the App's JWT with the App's public key, mints installation access
tokens, records check runs, comments, reviews and hook deliveries, and
serves bare repositories through ``git http-backend`` behind Basic auth that
accepts only the tokens it minted. Tests set its state up through the
methods below and read what clients did from its public attributes.

Responses follow GitHub's REST API, version 2022-11-28: the same status codes
and the same ``{"message", "documentation_url"}`` error bodies. Time comes
from the emulator's own clock, ``time.time() + clock_offset``: it stamps the
``Date`` header, checks JWT time claims and expires tokens, so a test moves
time by changing ``clock_offset`` or ``token_ttl``.

Only the CLI's ``sandbox`` command and the tests import this package.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from daemon.sandbox import _checks, _issues
from daemon.sandbox._auth import DEFAULT_PERMISSIONS, Installation, TokenAuthority
from daemon.sandbox._common import APIError, iso8601
from daemon.sandbox._deliveries import HookDeliveries, signature
from daemon.sandbox._jwt import JWTRejected, verify_app_jwt
from daemon.sandbox._records import Fault, RecordedRequest
from daemon.sandbox._repos import RepositoryStore, valid_full_name
from daemon.sandbox._routes import build_app

__all__ = [
    "DEFAULT_EVENTS",
    "DEFAULT_PERMISSIONS",
    "Emulator",
    "RecordedRequest",
    "generate_app_key",
]

log = logging.getLogger(__name__)

DEFAULT_EVENTS = ["check_run", "issue_comment", "pull_request", "push"]


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
        # The key is only read to take its public half, so the slow
        # consistency check of the private numbers is skipped.
        private = serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=True
        )
        public = private.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise TypeError("the App key must be an RSA key")
    return public


class Emulator:
    """The emulated GitHub: one App, its installations and repositories.

    ``public_key`` is the App's public key PEM, or its private key PEM from
    which the public key is taken. ``repos_root`` is the directory that
    contains the bare repositories as ``owner/name.git``. ``webhook_url`` and
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
        self.clock_offset = 0.0
        self.api_url = ""
        self.git_url = ""

        self.requests: list[RecordedRequest] = []
        self.check_runs: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, dict[str, Any]] = {}
        self.reviews: list[dict[str, Any]] = []
        self.repositories: dict[str, dict[str, Any]] = {}
        self.faults: list[Fault] = []

        self.public_key = _load_public_key(public_key)
        self.store = RepositoryStore(root=repos_root)
        self.ids = itertools.count(1)
        self.authority = TokenAuthority(clock=self.now, repositories=self.repositories)
        self.hooks = HookDeliveries(
            app_id=app_id,
            clock=self.now,
            next_id=lambda: next(self.ids),
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
        )
        self.check_suites: dict[tuple[str, str], int] = {}
        self.check_run_repository: dict[int, str] = {}
        self.comment_issue: dict[int, tuple[str, int]] = {}
        self._app: QuartTrio = build_app(self)

    # ------------------------------------------------------------------
    # Settings

    @property
    def token_ttl(self) -> float:
        """Seconds a newly minted token stays valid (3600 unless changed)."""
        return self.authority.token_ttl

    @token_ttl.setter
    def token_ttl(self, seconds: float) -> None:
        self.authority.token_ttl = seconds

    @property
    def webhook_url(self) -> str | None:
        """Where hook deliveries are POSTed; None sends nothing."""
        return self.hooks.webhook_url

    @webhook_url.setter
    def webhook_url(self, url: str | None) -> None:
        self.hooks.webhook_url = url

    @property
    def webhook_secret(self) -> bytes | None:
        """The secret deliveries are signed with; None sends them unsigned."""
        return self.hooks.webhook_secret

    @webhook_secret.setter
    def webhook_secret(self, secret: bytes | None) -> None:
        self.hooks.webhook_secret = secret

    @property
    def deliveries(self) -> list[dict[str, Any]]:
        """The hook deliveries ``GET /app/hook/deliveries`` lists."""
        return self.hooks.deliveries

    @property
    def redelivery_attempts(self) -> list[str | int]:
        """The delivery ids POSTed to ``/app/hook/deliveries/{id}/attempts``."""
        return self.hooks.redelivery_attempts

    @property
    def repos_root(self) -> Path:
        """The directory that contains the bare repositories."""
        return self.store.root

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

        Sets ``api_url`` and ``git_url`` and reports ``api_url`` through
        ``task_status`` once the socket is bound, so ``port=0`` picks a free
        port. Cancellation closes the listener and open connections.
        """
        config = Config()
        config.bind = [f"{host}:{port}"]
        config.include_date_header = False
        config.include_server_header = False
        config.graceful_timeout = 0.0
        config.accesslog = None
        # Through the stdlib logger, not hypercorn's own stderr handler, so
        # the "Running on" line follows the process's logging setup.
        config.errorlog = logging.getLogger("daemon.sandbox.hypercorn")

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn_serve, self._app, config))
            self.api_url = str(binds[0]).rstrip("/")
            self.git_url = f"{self.api_url}/git"
            log.info("sandbox GitHub serving at %s", self.api_url)
            task_status.started(self.api_url)

    # ------------------------------------------------------------------
    # Installations and tokens

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
        self.authority.installations[installation_id] = Installation(
            id=installation_id,
            account=account,
            repositories=None if repositories is None else list(repositories),
            permissions=dict(
                DEFAULT_PERMISSIONS if permissions is None else permissions
            ),
        )

    def suspend(self, installation_id: int) -> None:
        """Suspend an installation: its tokens, and requests for new ones, get 403."""
        self._installation(installation_id).suspended = True

    def unsuspend(self, installation_id: int) -> None:
        """Lift the suspension of an installation."""
        self._installation(installation_id).suspended = False

    def uninstall(self, installation_id: int) -> None:
        """Remove an installation and revoke every token minted for it."""
        self.authority.uninstall(installation_id)

    def revoke_token(self, token: str) -> None:
        """Revoke an installation token: it gets 401 from now on."""
        try:
            self.authority.tokens[token].revoked = True
        except KeyError:
            raise KeyError("no such token was minted") from None

    def tokens_for(self, installation_id: int) -> list[str]:
        """Return the tokens minted for an installation, oldest first."""
        return [
            value
            for value, token in self.authority.tokens.items()
            if token.installation_id == installation_id
        ]

    def _installation(self, installation_id: int) -> Installation:
        try:
            return self.authority.installations[installation_id]
        except KeyError:
            raise KeyError(f"no installation {installation_id!r}") from None

    # ------------------------------------------------------------------
    # Repositories

    def create_repository(
        self,
        full_name: str,
        files: Mapping[str, str | bytes],
        *,
        branch: str = "main",
        message: str = "Initial commit",
    ) -> str:
        """Create the bare repository ``full_name``; return its first commit sha.

        ``branch`` becomes the default branch. Raises ValueError for an
        invalid or existing name.
        """
        sha = self.store.create(full_name, files, branch=branch, message=message)
        owner, name = full_name.split("/")
        repo_id = next(self.ids)
        self.repositories[full_name] = {
            "id": repo_id,
            "node_id": f"R_{repo_id}",
            "name": name,
            "full_name": full_name,
            "private": True,
            "owner": {"login": owner, "id": 1, "type": "Organization"},
            "html_url": f"{self.api_url}/{full_name}",
            "clone_url": f"{self.git_url}/{full_name}.git",
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
        """Add a commit that writes ``files`` on ``branch``; return its sha.

        Files not named keep their content; a new branch starts from the
        default branch's tip.
        """
        return self.store.commit(full_name, files, branch=branch, message=message)

    def force_push(
        self,
        full_name: str,
        files: Mapping[str, str | bytes],
        *,
        branch: str,
        message: str = "Rewrite the last commit",
    ) -> str:
        """Replace the tip of ``branch``, prune the old commit, return the new sha.

        The new tip is the old tip's parent with ``files`` written over it,
        as ``git commit --amend`` makes it. ``refs/pull/*/head`` refs that
        pointed at the old tip move to the new one.
        """
        return self.store.force_push(full_name, files, branch=branch, message=message)

    def pull_ref(self, full_name: str, number: int, sha: str) -> None:
        """Set ``refs/pull/<number>/head`` of the repository to ``sha``."""
        self.store.pull_ref(full_name, number, sha)

    def resolve(self, full_name: str, ref: str) -> str | None:
        """Return the commit sha ``ref`` names in the repository, or None."""
        return self.store.resolve(full_name, ref)

    # ------------------------------------------------------------------
    # Faults

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
        on the request path, without the query string. ``body`` is sent as
        is when it is ``bytes`` or ``str``, as JSON otherwise, and as
        GitHub's error shape with the status's reason when None. ``delay``
        is the seconds the emulator waits before it responds. Faults match
        in the order they were injected, before authentication is checked,
        and the request is recorded with the injected status.
        """
        if times < 1:
            raise ValueError(f"invalid times {times!r}: must be >= 1")
        if delay < 0:
            raise ValueError(f"invalid delay {delay!r}: must be >= 0 seconds")
        self.faults.append(
            Fault(
                method=method.upper(),
                path=path,
                status=status,
                headers=dict(headers or {}),
                body=body,
                remaining=times,
                delay=delay,
            )
        )

    def take_fault(self, method: str, path: str) -> Fault | None:
        """Return the first fault matching a request and count it used."""
        for fault in self.faults:
            if fault.matches(method, path):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.faults.remove(fault)
                return fault
        return None

    # ------------------------------------------------------------------
    # Hook deliveries

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
        return self.hooks.add(
            guid=guid,
            event=event,
            action=action,
            installation_id=installation_id,
            status_code=status_code,
            payload=payload,
            delivered_at=delivered_at,
            redelivery=redelivery,
        )

    def sign(self, body: bytes) -> str:
        """Return the ``X-Hub-Signature-256`` of ``body`` with ``webhook_secret``."""
        if self.webhook_secret is None:
            raise ValueError("webhook_secret is not set")
        return signature(self.webhook_secret, body)

    async def send_webhook(
        self, *, event: str, payload: object, guid: str | None = None
    ) -> int:
        """Send a webhook delivery to ``webhook_url`` as GitHub sends one.

        The body is ``payload`` as JSON (as is when it is ``bytes``), signed
        with ``webhook_secret``, and the delivery is recorded so it can be
        listed and redelivered. Returns the receiver's status, or 0 when it
        could not be reached within 10 seconds.
        """
        return await self.hooks.send(event=event, payload=payload, guid=guid)

    # ------------------------------------------------------------------
    # Helpers the routes share

    def app_json(self) -> dict[str, Any]:
        """Return the App as ``GET /app`` shows it."""
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
            "installations_count": len(self.authority.installations),
        }

    def bot_user(self) -> dict[str, Any]:
        """Return the App's bot user, the author of its comments and reviews."""
        return {"login": f"{self.slug}[bot]", "id": self.app_id, "type": "Bot"}

    def installation_json(self, installation: Installation) -> dict[str, Any]:
        """Return an installation as ``GET /app/installations/{id}`` shows it."""
        return {
            "id": installation.id,
            "account": {
                "login": installation.account,
                "id": 1,
                "type": "Organization",
            },
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

    def verify_jwt(self, authorization: str) -> None:
        """Check an ``Authorization: Bearer <jwt>`` header; raise the 401 APIError."""
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise APIError(401, "Requires authentication")
        try:
            verify_app_jwt(
                credential,
                public_key=self.public_key,
                app_id=self.app_id,
                client_id=self.client_id,
                now=self.now(),
            )
        except JWTRejected as exc:
            log.info("App JWT rejected: %s", exc)
            raise APIError(401, str(exc)) from None

    async def create_check_run(self, full_name: str, body: object) -> dict[str, Any]:
        """Create a check run from a request body; return it as the API shows it."""
        run_id = next(self.ids)
        now = iso8601(self.now())
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
            "started_at": now,
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
            "app": self.app_json(),
            "pull_requests": [],
            "annotations": [],
        }

        run = _checks.apply_check_run(blank, body, now=now, creating=True)
        sha = run["head_sha"]
        if await self.store.resolve_async(full_name, sha) != sha:
            raise APIError(422, f"No commit found for SHA: {sha}")

        suite = self.check_suites.setdefault((full_name, sha), next(self.ids))
        run["check_suite"] = {"id": suite}
        self.check_runs[run_id] = run
        self.check_run_repository[run_id] = full_name
        log.info("check run %d created on %s", run_id, full_name)
        return _checks.public_view(run)

    def stored_check_run(self, full_name: str, run_id: int) -> dict[str, Any]:
        """Return the stored check run; 404 APIError if it is not in the repository."""
        if self.check_run_repository.get(run_id) != full_name:
            raise APIError(404, "Not Found")
        return self.check_runs[run_id]

    def create_comment(
        self, full_name: str, number: int, body: object
    ) -> dict[str, Any]:
        """Create an issue comment from a request body and return it."""
        text = _issues.comment_text(body)
        comment_id = next(self.ids)
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
            "user": self.bot_user(),
            "created_at": stamp,
            "updated_at": stamp,
            "author_association": "NONE",
            "performed_via_github_app": self.app_json(),
        }
        self.comments[comment_id] = comment
        self.comment_issue[comment_id] = (full_name, number)
        log.info("comment %d created on %s#%d", comment_id, full_name, number)
        return comment

    def stored_comment(self, full_name: str, comment_id: int) -> dict[str, Any]:
        """Return a stored comment; 404 APIError if it is not in the repository."""
        where = self.comment_issue.get(comment_id)
        if where is None or where[0] != full_name:
            raise APIError(404, "Not Found")
        return self.comments[comment_id]

    async def create_review(
        self, full_name: str, number: int, body: object
    ) -> dict[str, Any]:
        """Create a pull request review from a request body and return it.

        The stored review in ``reviews`` also carries the request's inline
        ``comments``. Without ``commit_id`` the review is on the commit
        ``refs/pull/<number>/head`` names, if any.
        """
        event, text, comments = _issues.review_request(body)
        assert isinstance(body, dict)
        commit_id = body.get("commit_id")
        if commit_id is None:
            commit_id = await self.store.resolve_async(
                full_name, f"refs/pull/{number}/head"
            )
        elif not isinstance(commit_id, str):
            raise APIError(422, f"Invalid commit_id {commit_id!r}")
        elif await self.store.resolve_async(full_name, commit_id) != commit_id:
            raise APIError(422, f"No commit found for SHA: {commit_id}")

        review_id = next(self.ids)
        review = {
            "id": review_id,
            "node_id": f"PRR_{review_id}",
            "user": self.bot_user(),
            "body": text,
            "state": _issues.REVIEW_STATES[event],
            "html_url": (
                f"{self.api_url}/{full_name}/pull/{number}"
                f"#pullrequestreview-{review_id}"
            ),
            "pull_request_url": f"{self.api_url}/repos/{full_name}/pulls/{number}",
            "commit_id": commit_id,
            "submitted_at": None if event is None else iso8601(self.now()),
            "author_association": "NONE",
        }
        self.reviews.append({**review, "comments": comments})
        log.info("review %d created on %s#%d", review_id, full_name, number)
        return review
