"""Installation access tokens: the cache, its refresher, and mint errors.

GitHub mints a token with ``POST /app/installations/{id}/access_tokens``;
it expires an hour later ("Generating an installation access token for a
GitHub App", docs.github.com/en/apps/creating-github-apps/
authenticating-with-a-github-app/generating-an-installation-access-token-for-a-github-app).
:class:`TokenCache` keeps one token per installation and scope (the
repositories and permissions asked for), so that a busy installation costs
one mint per token lifetime. The cache does no HTTP itself: it calls the
``mint`` function it is given (``GitHubClient.mint_token``).

Expiry is tracked on the trio clock: a token's lifetime is measured against
the ``Date`` of the response that carried it, so a skewed local clock does not
shorten or stretch it, and tests can move time with ``autojump_clock``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NoReturn, Protocol

import trio

from daemon.errors import (
    GitHubError,
    GitHubUnavailable,
    InstallationNotFound,
    InstallationSuspended,
    PermissionNotGranted,
    RepositoryNotAccessible,
    TokenError,
)

__all__ = [
    "MintFunction",
    "Scope",
    "Token",
    "TokenCache",
    "TokenCacheStatistics",
    "classify_mint_failure",
]

log = logging.getLogger(__name__)

SECONDS = 1.0
MINUTES = 60 * SECONDS


@dataclass(frozen=True, slots=True)
class Scope:
    """The repositories and permissions a token is restricted to.

    ``repositories`` are names without the owner, sorted; None means every
    repository of the installation. ``permissions`` is sorted
    ``(name, level)`` pairs; None means every permission granted.
    """

    repositories: tuple[str, ...] | None = None
    permissions: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def of(
        cls,
        repositories: Sequence[str] | None = None,
        permissions: Mapping[str, str] | None = None,
    ) -> Scope:
        """Normalise a request's scope; an ``owner/`` prefix is dropped."""
        if isinstance(repositories, str):
            raise TypeError("repositories must be a sequence of names, not a str")
        repos = None
        if repositories is not None:
            repos = tuple(sorted({name.rsplit("/", 1)[-1] for name in repositories}))
        perms = None
        if permissions is not None:
            perms = tuple(sorted(permissions.items()))
        return cls(repositories=repos, permissions=perms)

    def request_body(self) -> dict[str, object] | None:
        """Return the JSON body for the mint request, None for no restriction."""
        body: dict[str, object] = {}
        if self.repositories is not None:
            body["repositories"] = list(self.repositories)
        if self.permissions is not None:
            body["permissions"] = dict(self.permissions)
        return body or None

    def describe(self) -> str:
        """Return the scope for log and error messages."""
        if self.repositories is None:
            repos = "all repositories"
        else:
            repos = "repositories " + ", ".join(self.repositories)
        if self.permissions is None:
            perms = "all permissions"
        else:
            perms = "permissions " + ", ".join(f"{k}={v}" for k, v in self.permissions)
        return f"{repos}; {perms}"


@dataclass(frozen=True, slots=True, repr=False)
class Token:
    """An installation access token; ``repr`` and ``str`` hide ``secret``.

    ``secret`` is opaque: any length and shape (GitHub's ``ghs_`` tokens
    have grown past 40 characters). ``deadline`` is the trio clock time
    at which GitHub stops accepting it; ``expires_at`` is GitHub's own
    timestamp, for messages.
    """

    installation_id: int
    secret: str = field(compare=True)
    expires_at: datetime
    deadline: float
    scope: Scope = Scope()
    permissions: Mapping[str, str] = field(default_factory=dict, compare=False)

    def remaining(self) -> float:
        """Return the seconds left before GitHub stops accepting the token."""
        return self.deadline - trio.current_time()

    def __repr__(self) -> str:
        return (
            f"Token(installation_id={self.installation_id!r}, "
            f"expires_at={self.expires_at.isoformat()!r}, secret='***')"
        )

    __str__ = __repr__


class MintFunction(Protocol):
    """Mint a token for one installation and scope (``GitHubClient.mint_token``)."""

    def __call__(self, installation_id: int, *, scope: Scope) -> Awaitable[Token]: ...


def classify_mint_failure(
    installation_id: int, scope: Scope, error: GitHubError
) -> GitHubError:
    """Turn a failed mint response into the :class:`TokenError` that explains it.

    GitHub returns 404 for an unknown or uninstalled installation, 403
    "This installation has been suspended", and 422 when a repository is
    not in the installation or a permission was not granted. Any other
    error is returned unchanged.
    """
    status = error.status_code
    message = str(error)
    common = {
        "status_code": status,
        "installation_id": installation_id,
        "method": error.method,
        "path": error.path,
        "headers": error.headers,
    }
    if status == 404:
        return InstallationNotFound(
            f"GitHub has no installation {installation_id} of this App (404): it "
            "was uninstalled or the id is wrong; jobs for it cannot run until the "
            "App is installed again",
            **common,  # type: ignore[arg-type]
        )
    if status == 403 and "suspend" in message.lower():
        return InstallationSuspended(
            f"installation {installation_id} is suspended (403); an owner of the "
            "account must unsuspend the App in its installation settings before "
            "jobs can run",
            **common,  # type: ignore[arg-type]
        )
    if status == 422:
        lowered = message.lower()
        if "permission" in lowered:
            return PermissionNotGranted(
                f"installation {installation_id} has not granted the permissions "
                f"{dict(scope.permissions or ())!r} (422: {message}); ask less in "
                "the job's rule, or add them to the App and have the owner accept "
                "the new permissions",
                **common,  # type: ignore[arg-type]
            )
        if "repositor" in lowered:
            return RepositoryNotAccessible(
                f"installation {installation_id} does not include the "
                f"repositories {list(scope.repositories or ())!r} (422: {message}); "
                "the account owner must add them to the installation's repository "
                "access",
                **common,  # type: ignore[arg-type]
            )
    return error


@dataclass(slots=True)
class TokenCacheStatistics:
    """Counters of a :class:`TokenCache` since it was created."""

    cached: int
    mints: int
    mint_failures: int
    hits: int
    shared_waits: int
    refreshes: int
    evictions: int


@dataclass(slots=True)
class _Entry:
    token: Token
    last_used: float


@dataclass(slots=True, eq=False)
class _Flight:
    generation: int
    done: trio.Event = field(default_factory=trio.Event)
    token: Token | None = None
    error: BaseException | None = None


_Key = tuple[int, Scope]


class TokenCache:
    """Cache installation tokens per installation and scope.

    ``mint`` performs the HTTP request. ``safety_margin`` (seconds): a token
    with less than this left counts as expired. The refresher renews the
    tokens of active installations once they have less than
    ``refresh_ahead`` seconds of use left, drops every token unused for
    ``idle_timeout`` seconds, and drops expired tokens of inactive
    installations. It wakes at least every ``refresh_interval`` seconds.
    """

    def __init__(
        self,
        *,
        mint: MintFunction,
        safety_margin: float = 1 * MINUTES,
        refresh_ahead: float = 15 * MINUTES,
        idle_timeout: float = 60 * MINUTES,
        refresh_interval: float = 1 * MINUTES,
    ) -> None:
        for name, value in (
            ("safety_margin", safety_margin),
            ("refresh_ahead", refresh_ahead),
            ("idle_timeout", idle_timeout),
            ("refresh_interval", refresh_interval),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self._mint = mint
        self.safety_margin = safety_margin
        self.refresh_ahead = refresh_ahead
        self.idle_timeout = idle_timeout
        self.refresh_interval = max(refresh_interval, 1 * SECONDS)
        self._entries: dict[_Key, _Entry] = {}
        self._flights: dict[_Key, _Flight] = {}
        self._generation: dict[int, int] = {}
        self._suspended: set[int] = set()
        self._stats = TokenCacheStatistics(0, 0, 0, 0, 0, 0, 0)

    def secrets(self) -> list[str]:
        """Return the secret of every cached token, for the log redaction filter."""
        return [entry.token.secret for entry in self._entries.values()]

    def statistics(self) -> TokenCacheStatistics:
        """Return the counters, with ``cached`` the number of tokens held now."""
        self._stats.cached = len(self._entries)
        return TokenCacheStatistics(
            self._stats.cached,
            self._stats.mints,
            self._stats.mint_failures,
            self._stats.hits,
            self._stats.shared_waits,
            self._stats.refreshes,
            self._stats.evictions,
        )

    def _usable_for(self, token: Token) -> float:
        return token.remaining() - self.safety_margin

    async def get(
        self,
        installation_id: int,
        *,
        valid_for: float,
        repositories: Sequence[str] | None = None,
        permissions: Mapping[str, str] | None = None,
    ) -> Token:
        """Return a token for the installation that stays valid ``valid_for`` s.

        The cached token is returned when it has ``valid_for`` plus the
        safety margin left. Otherwise a new one is minted, and concurrent
        callers for the same installation and scope share that one request.

        Raise the :class:`TokenError` subclass that explains a refused mint
        (at once, without a request, for an installation remembered as
        suspended), :class:`TokenError` when even a fresh token expires too
        soon, :class:`GitHubUnavailable` or :class:`RateLimited` from the
        client. Cancelling a caller that leads a mint hands the mint over to
        one of the callers still waiting.
        """
        if not (math.isfinite(valid_for) and valid_for >= 0):
            raise ValueError(
                f"valid_for must be a finite number >= 0, got {valid_for!r}"
            )
        scope = Scope.of(repositories, permissions)
        key = (installation_id, scope)

        while True:
            self._raise_if_suspended(installation_id)
            entry = self._entries.get(key)
            if entry is not None and self._usable_for(entry.token) >= valid_for:
                entry.last_used = trio.current_time()
                self._stats.hits += 1
                return entry.token

            flight = self._flights.get(key)
            if flight is None:
                token = await self._lead_flight(key)
            else:
                self._stats.shared_waits += 1
                await flight.done.wait()
                if flight.error is not None:
                    raise flight.error
                if flight.token is None or flight.generation != self._gen(
                    installation_id
                ):
                    # The leader was cancelled, or the installation was
                    # forgotten meanwhile: look again.
                    continue
                token = flight.token

            if self._usable_for(token) < valid_for:
                raise TokenError(
                    f"GitHub issued installation {installation_id} a token valid "
                    f"for {token.remaining():.0f} s, less than the {valid_for:.0f} s "
                    f"requested plus the {self.safety_margin:.0f} s safety margin; "
                    "shorten the job's timeout to under the token lifetime",
                    installation_id=installation_id,
                )
            entry = self._entries.get(key)
            if entry is not None and entry.token is token:
                entry.last_used = trio.current_time()
            return token

    def _gen(self, installation_id: int) -> int:
        return self._generation.get(installation_id, 0)

    def _raise_if_suspended(self, installation_id: int) -> None:
        if installation_id in self._suspended:
            raise InstallationSuspended(
                f"installation {installation_id} is suspended; an owner of the "
                "account must unsuspend the App before jobs can run (no token is "
                "requested until GitHub reports the installation unsuspended)",
                installation_id=installation_id,
            )

    async def _lead_flight(self, key: _Key, *, last_used: float | None = None) -> Token:
        installation_id, scope = key
        flight = _Flight(generation=self._gen(installation_id))
        self._flights[key] = flight
        try:
            token = await self._mint(installation_id, scope=scope)
        except InstallationSuspended as exc:
            self._suspended.add(installation_id)
            self._drop_installation(installation_id)
            flight.error = exc
            self._stats.mint_failures += 1
            raise
        except (GitHubError, GitHubUnavailable) as exc:
            flight.error = exc
            self._stats.mint_failures += 1
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

        self._stats.mints += 1
        flight.token = token
        if flight.generation == self._gen(installation_id):
            # A renewal keeps the old token's last use, so that renewals alone
            # never keep a token from going idle.
            if last_used is None:
                last_used = trio.current_time()
            self._entries[key] = _Entry(token=token, last_used=last_used)
        log.info(
            "minted token for installation %s (%s), valid %.0f s until %s",
            installation_id,
            scope.describe(),
            token.remaining(),
            token.expires_at.isoformat(),
        )
        return token

    def evict(self, token: Token, *, reason: str = "GitHub rejected it") -> bool:
        """Drop ``token`` from the cache if it is still the cached one.

        Call this when GitHub returns 401 for a token the cache trusts, or
        before the token is revoked. ``reason`` goes into the log record.
        Return True if it was dropped.
        """
        key = (token.installation_id, token.scope)
        entry = self._entries.get(key)
        if entry is None or entry.token is not token:
            return False
        del self._entries[key]
        self._stats.evictions += 1
        log.info(
            "dropped token for installation %s, valid until %s, because %s",
            token.installation_id,
            token.expires_at.isoformat(),
            reason,
        )
        return True

    def _drop_installation(self, installation_id: int) -> int:
        keys = [key for key in self._entries if key[0] == installation_id]
        for key in keys:
            del self._entries[key]
        return len(keys)

    def forget(self, installation_id: int, *, suspended: bool = False) -> None:
        """Drop every cached token of the installation.

        A mint in flight still returns its token to the waiting callers, but
        that token is not cached. With ``suspended=True`` the installation is
        remembered as suspended, and :meth:`get` raises
        :class:`InstallationSuspended` without a request until
        :meth:`unsuspended`. A mint that GitHub rejects as suspended has the
        same effect.
        """
        self._generation[installation_id] = self._gen(installation_id) + 1
        dropped = self._drop_installation(installation_id)
        if suspended:
            self._suspended.add(installation_id)
        log.info(
            "forgot %d tokens of installation %s (suspended: %s)",
            dropped,
            installation_id,
            installation_id in self._suspended,
        )

    def unsuspended(self, installation_id: int) -> None:
        """Clear the suspension remembered for the installation."""
        if installation_id in self._suspended:
            self._suspended.discard(installation_id)
            log.info("installation %s unsuspended", installation_id)

    def is_suspended(self, installation_id: int) -> bool:
        """Tell whether the installation is remembered as suspended."""
        return installation_id in self._suspended

    async def refresh_once(self, active: Iterable[int]) -> None:
        """Renew the active installations' tokens that are due; drop idle ones.

        A failed renewal is logged and the old token kept while it lasts;
        nothing is raised for it.
        """
        active_ids = set(active)
        now = trio.current_time()
        due: list[_Key] = []
        for key, entry in list(self._entries.items()):
            installation_id = key[0]
            idle = now - entry.last_used
            expired = self._usable_for(entry.token) <= 0
            if idle >= self.idle_timeout or (
                expired and installation_id not in active_ids
            ):
                del self._entries[key]
                log.info(
                    "dropped token of installation %s (%s) unused for %.0f s",
                    installation_id,
                    key[1].describe(),
                    idle,
                )
            elif (
                installation_id in active_ids
                and self._usable_for(entry.token) < self.refresh_ahead
            ):
                due.append(key)

        if not due:
            return
        async with trio.open_nursery() as nursery:
            for key in due:
                nursery.start_soon(self._renew, key)

    async def _renew(self, key: _Key) -> None:
        installation_id, scope = key
        if key in self._flights:
            return
        previous = self._entries.get(key)
        self._stats.refreshes += 1
        try:
            await self._lead_flight(
                key, last_used=previous.last_used if previous is not None else None
            )
        except InstallationNotFound as exc:
            self._drop_installation(installation_id)
            log.warning(
                "renewing the token of installation %s failed, tokens dropped: %s",
                installation_id,
                exc,
            )
        except (GitHubError, GitHubUnavailable) as exc:
            log.warning(
                "renewing the token of installation %s (%s) failed: %s",
                installation_id,
                scope.describe(),
                exc,
            )

    def _next_wakeup(self, active: set[int]) -> float:
        wait = self.refresh_interval
        for (installation_id, _scope), entry in self._entries.items():
            if installation_id in active:
                due_in = self._usable_for(entry.token) - self.refresh_ahead
                wait = min(wait, due_in)
        return max(wait, 1 * SECONDS)

    async def run_refresher(
        self,
        *,
        active: Callable[[], Iterable[int]],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Renew tokens before active installations need them, until cancelled.

        ``active`` returns the ids of installations with work queued or
        running; it is called on every wake-up. Start it with
        ``await nursery.start(cache.run_refresher, active=...)``. It never
        returns; failures of single renewals are logged, not raised.
        """
        log.info(
            "token refresher started (renews %.0f s ahead, drops after %.0f s idle)",
            self.refresh_ahead,
            self.idle_timeout,
        )
        task_status.started()
        try:
            while True:
                current = set(active())
                await self.refresh_once(current)
                await trio.sleep(self._next_wakeup(current))
        finally:
            log.info("token refresher stopped")
