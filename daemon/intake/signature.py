"""The ``X-Hub-Signature-256`` check, as pure functions with no I/O.

GitHub signs each delivery with HMAC-SHA256 over the raw request body, keyed
by the webhook secret, and sends ``sha256=`` followed by the hex digest
(docs.github.com, "Validating webhook deliveries"). GitHub writes the digest
in lowercase, and :func:`parse_signature` accepts only that form: a header
with uppercase hex digits is treated as malformed, so there is exactly one
spelling of a valid signature.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Sequence

__all__ = [
    "SIGNATURE_HEADER",
    "SignatureStatus",
    "compute_signature",
    "parse_signature",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Hub-Signature-256"

_PREFIX = "sha256="
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class SignatureStatus(enum.Enum):
    """Outcome of a signature check; ``value`` is safe to log."""

    VALID = "valid"
    MISSING = "missing"
    MALFORMED = "malformed"
    MISMATCH = "mismatch"


def compute_signature(secret: bytes, body: bytes) -> str:
    """Return the ``X-Hub-Signature-256`` value GitHub sends for ``body``."""
    return _PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def parse_signature(header: str) -> bytes | None:
    """Return the 32-byte digest in a ``sha256=<64 lowercase hex>`` header.

    Return None when the value has another prefix (``sha1=`` included), the
    wrong length, or characters other than ``0-9a-f``. Surrounding
    whitespace is not stripped, because HTTP servers already remove it.
    """
    if not header.startswith(_PREFIX):
        return None
    hex_digest = header[len(_PREFIX) :]
    if _HEX_DIGEST.fullmatch(hex_digest) is None:
        return None
    return bytes.fromhex(hex_digest)


def verify_signature(
    header: str | None, body: bytes, secrets: Sequence[bytes]
) -> SignatureStatus:
    """Check ``header`` against the HMAC of ``body`` under each secret.

    ``body`` must be the raw bytes as received, before any decoding. Every
    non-empty secret is tried, so several secrets allow rotation. An empty
    secret never matches, and with no usable secret every signature is a
    ``MISMATCH``. Digests are compared with :func:`hmac.compare_digest`.
    """
    if header is None:
        return SignatureStatus.MISSING

    claimed = parse_signature(header)
    if claimed is None:
        return SignatureStatus.MALFORMED

    matched = False
    for secret in secrets:
        if not secret:
            continue
        expected = hmac.new(secret, body, hashlib.sha256).digest()
        # No early exit: the time taken does not depend on which secret matched.
        matched |= hmac.compare_digest(expected, claimed)
    return SignatureStatus.VALID if matched else SignatureStatus.MISMATCH
