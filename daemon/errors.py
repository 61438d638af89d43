"""The exception tree for operational failures.

Programming mistakes raise builtin exceptions. Everything an operator can
act on derives from :class:`GhappdError`::

    GhappdError
    ├── ConfigError            the TOML file or a file it names is invalid
    ├── KeyFormatError         the private key file is not a usable RSA key
    ├── GitHubError            GitHub responded with an error (status_code)
    │   ├── RateLimited        a rate limit outlasted the configured wait
    │   └── TokenError         minting an installation token failed
    │       ├── InstallationNotFound
    │       ├── InstallationSuspended
    │       ├── RepositoryNotAccessible
    │       └── PermissionNotGranted
    ├── GitHubUnavailable      GitHub could not be reached after retries
    ├── WorkspaceError         a checkout failed
    │   └── CommitNotFound     the expected commit no longer exists
    └── JournalError           the journal file is unreadable or corrupt
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

__all__ = [
    "CommitNotFound",
    "ConfigError",
    "GhappdError",
    "GitHubError",
    "GitHubUnavailable",
    "InstallationNotFound",
    "InstallationSuspended",
    "JournalError",
    "KeyFormatError",
    "PermissionNotGranted",
    "RateLimited",
    "RepositoryNotAccessible",
    "TokenError",
    "WorkspaceError",
]


class GhappdError(Exception):
    """Base of every operational error ghappd raises."""


class ConfigError(GhappdError):
    """Invalid configuration; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class KeyFormatError(GhappdError):
    """The App's private key file cannot be used."""


class GitHubError(GhappdError):
    """GitHub responded to a request with an error status."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        installation_id: int | None = None,
        method: str | None = None,
        path: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.installation_id = installation_id
        self.method = method
        self.path = path
        self.headers = dict(headers or {})


class RateLimited(GitHubError):
    """A rate limit lasts longer than ``[github] max_rate_limit_wait``."""

    def __init__(
        self, message: str, *, limit: str, reset_at: datetime, **kwargs: object
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.limit = limit
        self.reset_at = reset_at


class TokenError(GitHubError):
    """Minting an installation access token failed."""


class InstallationNotFound(TokenError):
    """The App is not installed there (any more)."""


class InstallationSuspended(TokenError):
    """The installation is suspended until an ``unsuspend`` delivery."""


class RepositoryNotAccessible(TokenError):
    """A requested repository is not part of the installation."""


class PermissionNotGranted(TokenError):
    """A requested permission was not granted to the installation."""


class GitHubUnavailable(GhappdError):
    """GitHub could not be reached, or kept failing, after every retry."""


class WorkspaceError(GhappdError):
    """Preparing a job's workspace failed."""


class CommitNotFound(WorkspaceError):
    """The commit to check out no longer exists (for example force-pushed)."""


class JournalError(GhappdError):
    """The journal file cannot be opened, read or written."""
