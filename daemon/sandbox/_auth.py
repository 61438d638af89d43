"""Installations and the access tokens the emulator mints for them.

The rules follow GitHub's "Create an installation access token for an app"
and "Authenticating as a GitHub App installation". A token lives for a
fixed time. It may be narrowed to some of the installation's repositories
and permissions but never widened. It stops working when it is revoked or
the App is uninstalled, and gets 403 while the installation is suspended.
"""

from __future__ import annotations

import base64
import logging
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon.sandbox._common import APIError, invalid, iso8601

__all__ = [
    "BAD_CREDENTIALS",
    "DEFAULT_PERMISSIONS",
    "NOT_ACCESSIBLE",
    "Installation",
    "Token",
    "TokenAuthority",
]

log = logging.getLogger(__name__)

DEFAULT_PERMISSIONS = {
    "checks": "write",
    "contents": "read",
    "issues": "write",
    "metadata": "read",
    "pull_requests": "write",
}

BAD_CREDENTIALS = "Bad credentials"
NOT_ACCESSIBLE = "Resource not accessible by integration"
SUSPENDED = "This installation has been suspended"
_REPO_NOT_IN_INSTALLATION = (
    "There is at least one repository that does not exist or is not "
    "accessible to the parent installation."
)
_PERMISSION_NOT_GRANTED = (
    "The permissions requested are not granted to this installation."
)

_LEVELS = {"read": 1, "write": 2, "admin": 3}
_TOKEN_ALPHABET = string.ascii_letters + string.digits
_TOKEN_LENGTH = 76


@dataclass(slots=True)
class Installation:
    """The App installed on one account.

    ``repositories`` is None when the installation reaches every
    repository of ``account``.
    """

    id: int
    account: str
    repositories: list[str] | None
    permissions: dict[str, str]
    suspended: bool = False

    def reaches(self, full_name: str) -> bool:
        """Return whether the installation was granted the repository."""
        if self.repositories is None:
            return full_name.split("/")[0] == self.account
        return full_name in self.repositories


@dataclass(slots=True)
class Token:
    """One minted installation token; ``expires_at`` is on the emulator's clock."""

    installation_id: int
    expires_at: float
    repositories: frozenset[str] | None
    permissions: dict[str, str]
    revoked: bool = False

    def allows(self, permission: str, level: str) -> bool:
        """Return whether the token was granted ``permission`` at ``level``."""
        granted = self.permissions.get(permission)
        return granted is not None and _LEVELS[granted] >= _LEVELS[level]


class TokenAuthority:
    """The installations of one App and every token minted for them.

    ``clock`` returns the emulator's time in Unix seconds. ``repositories``
    maps the ``owner/name`` of each created repository to its REST
    representation, which carries the repository id.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        repositories: Mapping[str, dict[str, Any]],
    ) -> None:
        self.installations: dict[int, Installation] = {}
        self.tokens: dict[str, Token] = {}
        self.token_ttl = 3600.0
        self._clock = clock
        self._repositories = repositories

    def uninstall(self, installation_id: int) -> None:
        """Remove an installation and revoke every token minted for it."""
        if self.installations.pop(installation_id, None) is None:
            raise KeyError(f"no installation {installation_id!r}")
        for token in self.tokens.values():
            if token.installation_id == installation_id:
                token.revoked = True

    def mint(self, installation_id: int, body: object) -> dict[str, Any]:
        """Mint a token for a request body and return the 201 response body.

        Raises the APIError with GitHub's status: 404 for an unknown installation,
        403 for a suspended one, 422 for a repository or permission the
        installation was not granted.
        """
        installation = self.installations.get(installation_id)
        if installation is None:
            raise APIError(404, "Not Found")
        if installation.suspended:
            raise APIError(403, SUSPENDED)
        if not isinstance(body, dict):
            raise invalid(f"the body must be a JSON object, not {body!r}.")

        requested_scope = self._requested_scope(installation, body)
        if requested_scope is not None:
            scope: frozenset[str] | None = requested_scope
        elif installation.repositories is not None:
            scope = frozenset(installation.repositories)
        else:
            scope = None
        permissions = self._requested_permissions(installation, body)

        value = "ghs_" + "".join(
            secrets.choice(_TOKEN_ALPHABET) for _ in range(_TOKEN_LENGTH)
        )
        expires_at = self._clock() + self.token_ttl
        self.tokens[value] = Token(
            installation_id=installation_id,
            expires_at=expires_at,
            repositories=scope,
            permissions=permissions,
        )
        log.info("token minted for installation %d", installation_id)

        response: dict[str, Any] = {
            "token": value,
            "expires_at": iso8601(expires_at),
            "permissions": dict(permissions),
            "repository_selection": "all" if scope is None else "selected",
        }
        if scope is not None:
            response["repositories"] = [
                self._repositories[name]
                for name in sorted(scope)
                if name in self._repositories
            ]
        return response

    def _requested_scope(
        self, installation: Installation, body: dict[str, Any]
    ) -> frozenset[str] | None:
        names = body.get("repositories")
        ids = body.get("repository_ids")
        if names is None and ids is None:
            return None
        scope: set[str] = set()
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
            by_id = {repo["id"]: name for name, repo in self._repositories.items()}
            for repo_id in ids:
                if repo_id not in by_id:
                    raise APIError(422, _REPO_NOT_IN_INSTALLATION)
                scope.add(by_id[repo_id])
        for full_name in scope:
            if full_name not in self._repositories or not installation.reaches(
                full_name
            ):
                raise APIError(422, _REPO_NOT_IN_INSTALLATION)
        return frozenset(scope)

    def _requested_permissions(
        self, installation: Installation, body: dict[str, Any]
    ) -> dict[str, str]:
        requested = body.get("permissions")
        if requested is None:
            return dict(installation.permissions)
        if not isinstance(requested, dict):
            raise invalid("'permissions' must be an object.")
        for name, level in requested.items():
            granted = installation.permissions.get(name)
            if level not in _LEVELS or granted is None:
                raise APIError(422, _PERMISSION_NOT_GRANTED)
            if _LEVELS[level] > _LEVELS[granted]:
                raise APIError(422, _PERMISSION_NOT_GRANTED)
        return dict(requested)

    def valid_token(self, credential: str) -> Token | None:
        """Return the token if it was minted, is unexpired and unrevoked."""
        token = self.tokens.get(credential)
        if token is None or token.revoked or self._clock() >= token.expires_at:
            return None
        if token.installation_id not in self.installations:
            return None
        return token

    def revoke(self, authorization: str) -> Token:
        """Revoke the token an ``Authorization`` header carries; return it.

        This is GitHub's "Revoke an installation access token"
        (``DELETE /installation/token``), where the token authenticates its
        own revocation. Accepts ``token X`` and ``Bearer X``. Raises the
        APIError with GitHub's status: 401 ``Requires authentication``
        without a credential, 401 ``Bad credentials`` for a token that is
        unknown, expired or revoked already.
        """
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() not in {"token", "bearer"} or not credential:
            raise APIError(401, "Requires authentication")
        token = self.valid_token(credential.strip())
        if token is None:
            raise APIError(401, BAD_CREDENTIALS)
        token.revoked = True
        log.info("token of installation %d revoked", token.installation_id)
        return token

    def authorize(
        self,
        authorization: str,
        full_name: str,
        permission: str,
        level: str,
    ) -> Token:
        """Check an ``Authorization`` header for a repository API request.

        Accepts ``token X`` and ``Bearer X``. Raises the APIError with
        GitHub's status: 401 ``Bad credentials`` for a token that is unknown,
        expired or revoked, 403 while the installation is suspended, 404
        for a repository that does not exist, 403 ``Resource not accessible
        by integration`` when the token's repositories or permissions
        exclude the request.
        """
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() not in {"token", "bearer"} or not credential:
            raise APIError(401, "Requires authentication")
        token = self.valid_token(credential.strip())
        if token is None:
            raise APIError(401, BAD_CREDENTIALS)
        installation = self.installations[token.installation_id]
        if installation.suspended:
            raise APIError(403, SUSPENDED)
        if full_name not in self._repositories:
            raise APIError(404, "Not Found")
        if not self._in_scope(token, installation, full_name):
            raise APIError(403, NOT_ACCESSIBLE)
        if not token.allows(permission, level):
            raise APIError(403, NOT_ACCESSIBLE)
        return token

    def authorize_git(self, authorization: str, full_name: str) -> Token | None:
        """Return the token a git client's Basic ``Authorization`` carries.

        GitHub takes an installation token as the password of the user
        ``x-access-token``. Returns None unless that token is valid, its
        installation is active, and it may read the repository's contents.
        """
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except ValueError:
            return None
        user, _, secret = decoded.partition(":")
        if user != "x-access-token":
            return None
        token = self.valid_token(secret)
        if token is None:
            return None
        installation = self.installations[token.installation_id]
        if installation.suspended or not self._in_scope(token, installation, full_name):
            return None
        if not token.allows("contents", "read"):
            return None
        return token

    def _in_scope(
        self, token: Token, installation: Installation, full_name: str
    ) -> bool:
        if not installation.reaches(full_name):
            return False
        return token.repositories is None or full_name in token.repositories
