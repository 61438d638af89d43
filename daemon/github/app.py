"""The GitHub App's private key and the JWT it signs.

Nothing here does I/O: :func:`load_private_key` parses bytes the caller
read, and :class:`AppAuth` signs JWTs and tracks the offset between the
local clock and GitHub's. The client (``daemon.github.client``) sends the
JWT and feeds GitHub's ``Date`` header back through
:meth:`AppAuth.correct_clock` when GitHub rejects the time claims.
"""

from __future__ import annotations

import email.utils
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    rsa,
    x448,
    x25519,
)
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from daemon.errors import KeyFormatError

__all__ = [
    "JWT_BACKDATE",
    "JWT_LIFETIME",
    "JWT_MIN_REMAINING",
    "AppAuth",
    "AppIdentity",
    "is_time_claim_rejection",
    "load_private_key",
]

log = logging.getLogger(__name__)

SECONDS = 1.0

# GitHub's rules for the App JWT are in "Generating a JSON Web Token (JWT)
# for a GitHub App" (docs.github.com/en/apps/creating-github-apps/
# authenticating-with-a-github-app/generating-a-json-web-token-jwt-for-a-github-app).
# It is signed with RS256, and `iat` is set 60 seconds in the past against
# clock drift. `exp` may be at most 10 minutes ahead. `iss` is the client ID
# (recommended) or the App ID.
JWT_BACKDATE = 60 * SECONDS
JWT_LIFETIME = 9 * 60 * SECONDS
# A signed JWT is reused until it has less than this left.
JWT_MIN_REMAINING = 60 * SECONDS

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")

# The PEM labels that are not a usable App key, with the name shown to the
# operator and the fix.
_WRONG_PEM_LABELS: dict[bytes, tuple[str, str]] = {
    b"OPENSSH PRIVATE KEY": (
        "an OpenSSH private key",
        "convert a copy with `ssh-keygen -p -m PEM -f COPY`, or download a new "
        "key from the App's settings page",
    ),
    b"ENCRYPTED PRIVATE KEY": (
        "an encrypted PKCS#8 private key",
        "store it decrypted (`openssl pkey -in FILE -out NEW.pem`)",
    ),
    b"EC PRIVATE KEY": (
        "an EC private key",
        "GitHub Apps sign with RSA: download the App's key from its settings page",
    ),
    b"DSA PRIVATE KEY": (
        "a DSA private key",
        "GitHub Apps sign with RSA: download the App's key from its settings page",
    ),
    b"PUBLIC KEY": (
        "a public key",
        "configure the private key file that GitHub generated for the App",
    ),
    b"RSA PUBLIC KEY": (
        "an RSA public key",
        "configure the private key file that GitHub generated for the App",
    ),
    b"CERTIFICATE": (
        "a certificate",
        "configure the private key file that GitHub generated for the App",
    ),
}

_EXPECTED = "an RSA private key in PEM ('BEGIN RSA PRIVATE KEY' or 'BEGIN PRIVATE KEY')"

# GitHub's 401 messages for the time claims name the claim, for example
# "'Expiration time' claim ('exp') must be a numeric value representing
# the future time at which the assertion expires".
_TIME_CLAIM_MESSAGE = re.compile(
    r"\('?(?:exp|iat)'?\)|expiration time|issued at", re.IGNORECASE
)


def _normalise_pem(data: bytes) -> bytes:
    text = data.strip()
    if len(text) >= 2 and text[:1] == text[-1:] and text[:1] in (b'"', b"'"):
        text = text[1:-1].strip()
    text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    # An environment file turns the key into one line with literal "\n".
    if b"\n" not in text and b"\\n" in text:
        text = text.replace(b"\\n", b"\n")
    return text + b"\n"


def _describe_unlabelled(data: bytes) -> str:
    if not data.strip():
        return "an empty file"
    if data.lstrip().startswith((b"ssh-rsa ", b"ssh-ed25519 ", b"ecdsa-sha2-")):
        return "an OpenSSH public key"
    if data[:1] == b"\x30":
        return "binary data (DER?), not PEM"
    try:
        data.decode("ascii")
    except UnicodeDecodeError:
        return "binary data, not PEM"
    return "text without a PEM 'BEGIN' line"


def _key_kind(key: object) -> str:
    kinds = (
        (ec.EllipticCurvePrivateKey, "EC"),
        (ed25519.Ed25519PrivateKey, "Ed25519"),
        (ed448.Ed448PrivateKey, "Ed448"),
        (dsa.DSAPrivateKey, "DSA"),
        (x25519.X25519PrivateKey, "X25519"),
        (x448.X448PrivateKey, "X448"),
    )
    for cls, name in kinds:
        if isinstance(key, cls):
            return name
    return type(key).__name__


def load_private_key(data: bytes, *, source: str) -> rsa.RSAPrivateKey:
    """Parse the App's RSA private key from PEM ``data`` read from ``source``.

    Accept PKCS#1 (``BEGIN RSA PRIVATE KEY``) and PKCS#8 (``BEGIN PRIVATE
    KEY``), with LF or CRLF line ends, surrounding whitespace or quotes, or
    as a single line with literal ``\\n`` sequences.

    Raise :class:`KeyFormatError` naming ``source`` and the format found for
    an OpenSSH, encrypted, non-RSA or unparsable key. No message contains
    any of the file's bytes beyond the PEM label.
    """
    pem = _normalise_pem(data)
    match = _PEM_BEGIN.search(pem)
    if match is None:
        found = _describe_unlabelled(data)
        raise KeyFormatError(
            f"private key file {source!r} contains {found}; expected {_EXPECTED}. "
            "Download the key from the GitHub App's settings page."
        )

    label = match.group(1)
    label_text = label.decode("ascii")
    if label in _WRONG_PEM_LABELS:
        found, fix = _WRONG_PEM_LABELS[label]
        raise KeyFormatError(
            f"private key file {source!r} contains {found} ('BEGIN {label_text}'); "
            f"expected {_EXPECTED}: {fix}"
        )
    if label not in (b"RSA PRIVATE KEY", b"PRIVATE KEY"):
        raise KeyFormatError(
            f"private key file {source!r} contains a PEM block 'BEGIN {label_text}'; "
            f"expected {_EXPECTED}"
        )
    if b"ENCRYPTED" in pem[match.end() : match.end() + 200]:
        # PKCS#1 with OpenSSL's legacy encryption headers (Proc-Type: 4,ENCRYPTED).
        raise KeyFormatError(
            f"private key file {source!r} contains an encrypted RSA private key "
            f"('BEGIN {label_text}' with Proc-Type ENCRYPTED); store it decrypted "
            "(`openssl rsa -in FILE -out NEW.pem`)"
        )

    kind = "PKCS#1" if label == b"RSA PRIVATE KEY" else "PKCS#8"
    try:
        key = load_pem_private_key(pem, password=None)
    except TypeError:
        raise KeyFormatError(
            f"private key file {source!r} contains an encrypted {kind} private key; "
            "store it decrypted (`openssl pkey -in FILE -out NEW.pem`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        # The parser's own message is dropped: it may quote the input.
        raise KeyFormatError(
            f"private key file {source!r} contains a 'BEGIN {label_text}' block "
            f"that is not a valid {kind} key ({type(exc).__name__}); the file is "
            "damaged or truncated: download the key again"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFormatError(
            f"private key file {source!r} contains a {kind} {_key_kind(key)} key, "
            "not RSA; "
            "GitHub Apps sign with RSA: download the App's key from its settings page"
        )
    return key


def is_time_claim_rejection(status_code: int, message: str) -> bool:
    """Tell whether a response rejects a JWT for its ``iat`` or ``exp`` claim."""
    return status_code == 401 and _TIME_CLAIM_MESSAGE.search(message) is not None


@dataclass(frozen=True, slots=True)
class AppIdentity:
    """The App as ``GET /app`` describes it."""

    id: int
    slug: str
    name: str
    client_id: str | None


class AppAuth:
    """Sign the App's JWTs, correcting for the offset of the local clock.

    ``clock`` returns Unix time in seconds (``time.time`` by default). The
    JWT is signed once and reused until it has less than
    :data:`JWT_MIN_REMAINING` left. Safe to call from several threads.
    """

    def __init__(
        self,
        *,
        app_id: int,
        private_key: rsa.RSAPrivateKey,
        client_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(app_id, bool) or not isinstance(app_id, int) or app_id <= 0:
            raise ValueError(f"app_id must be a positive int, got {app_id!r}")
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise TypeError(
                f"private_key must be an RSAPrivateKey, got {type(private_key)!r}"
            )
        self.app_id = app_id
        self.client_id = client_id or None
        self._key = private_key
        self._clock = clock
        self._offset = 0.0
        self._lock = threading.Lock()
        self._cached: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return (
            f"AppAuth(app_id={self.app_id!r}, client_id={self.client_id!r}, "
            f"clock_offset={self._offset!r})"
        )

    @property
    def issuer(self) -> str:
        """The ``iss`` claim: the client id if configured, else the App id."""
        return self.client_id if self.client_id is not None else str(self.app_id)

    @property
    def clock_offset(self) -> float:
        """Seconds added to the local clock to get GitHub's (0 until corrected)."""
        return self._offset

    def now(self) -> float:
        """Return GitHub's estimated Unix time in seconds."""
        return self._clock() + self._offset

    def claims(self) -> dict[str, int | str]:
        """Return fresh claims: ``iat`` 60 s back, ``exp`` 9 minutes ahead."""
        now = int(self.now())
        return {
            "iat": now - int(JWT_BACKDATE),
            "exp": now + int(JWT_LIFETIME),
            "iss": self.issuer,
        }

    def jwt(self) -> str:
        """Return a signed JWT with at least :data:`JWT_MIN_REMAINING` left."""
        with self._lock:
            if self._cached is not None:
                token, exp = self._cached
                if exp - self.now() >= JWT_MIN_REMAINING:
                    return token
            claims = self.claims()
            token = jwt.encode(claims, self._key, algorithm="RS256")
            self._cached = (token, int(claims["exp"]))
            return token

    def correct_clock(self, date_header: str | None) -> bool:
        """Take the clock offset from a response's ``Date`` header.

        Return True when the header parsed and the offset was stored (the
        cached JWT is then dropped, so the next :meth:`jwt` uses corrected
        claims); False when the header is missing or invalid.
        """
        if not date_header:
            return False
        try:
            server = email.utils.parsedate_to_datetime(date_header)
        except (TypeError, ValueError):
            return False
        if server.tzinfo is None:
            return False
        offset = server.timestamp() - self._clock()
        with self._lock:
            self._offset = offset
            self._cached = None
        log.info(
            "clock offset to GitHub set to %.0f s from its Date header %r",
            offset,
            date_header,
        )
        return True
