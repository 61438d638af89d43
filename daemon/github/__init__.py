"""GitHub App authentication, installation tokens and the REST client.

``app`` loads the private key and signs the App JWT, ``tokens`` caches
installation tokens, ``client`` sends requests with retries and rate-limit
handling, and ``ratelimit`` parses GitHub's rate-limit responses.
"""

from __future__ import annotations

from daemon.github.app import AppAuth, AppIdentity, load_private_key
from daemon.github.client import API_VERSION, DEFAULT_API_URL, GitHubClient
from daemon.github.ratelimit import RateLimit, parse_rate_limit
from daemon.github.tokens import Scope, Token, TokenCache, TokenCacheStatistics

__all__ = [
    "API_VERSION",
    "DEFAULT_API_URL",
    "AppAuth",
    "AppIdentity",
    "GitHubClient",
    "RateLimit",
    "Scope",
    "Token",
    "TokenCache",
    "TokenCacheStatistics",
    "load_private_key",
    "parse_rate_limit",
]
