"""The pure ``X-Hub-Signature-256`` functions."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from daemon.intake.signature import (
    SignatureStatus,
    compute_signature,
    parse_signature,
    verify_signature,
)

# The test vector from docs.github.com, "Validating webhook deliveries".
SECRET = b"It's a Secret to Everybody"
BODY = b"Hello, World!"
GITHUB_SIGNATURE = (
    "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
)


def test_compute_matches_github_vector() -> None:
    assert compute_signature(SECRET, BODY) == GITHUB_SIGNATURE


def test_verify_github_vector() -> None:
    assert verify_signature(GITHUB_SIGNATURE, BODY, [SECRET]) is SignatureStatus.VALID


def test_compute_matches_hmac_sha256() -> None:
    expected = hmac.new(SECRET, BODY, hashlib.sha256).hexdigest()
    assert compute_signature(SECRET, BODY) == "sha256=" + expected


def test_compute_is_lowercase_hex() -> None:
    hex_digest = compute_signature(SECRET, BODY).removeprefix("sha256=")
    assert hex_digest == hex_digest.lower()
    assert len(hex_digest) == 64


def test_parse_returns_digest() -> None:
    digest = hmac.new(SECRET, BODY, hashlib.sha256).digest()
    assert parse_signature("sha256=" + digest.hex()) == digest


@pytest.mark.parametrize(
    "header",
    [
        "",
        "sha256=",
        "sha1=" + "a" * 40,
        "sha512=" + "a" * 64,
        "SHA256=" + "a" * 64,
        "sha256:" + "a" * 64,
        "sha256=" + "a" * 63,
        "sha256=" + "a" * 65,
        "sha256=" + "g" * 64,
        "sha256=" + "A" * 64,
        "sha256= " + "a" * 64,
        "sha256=" + "a" * 64 + " ",
        "sha256=" + "a" * 62 + "\n" + "a",
    ],
)
def test_parse_rejects_malformed(header: str) -> None:
    assert parse_signature(header) is None


def test_verify_valid() -> None:
    header = compute_signature(SECRET, BODY)
    assert verify_signature(header, BODY, [SECRET]) is SignatureStatus.VALID


def test_verify_missing() -> None:
    assert verify_signature(None, BODY, [SECRET]) is SignatureStatus.MISSING


def test_verify_malformed() -> None:
    header = "sha1=" + hmac.new(SECRET, BODY, hashlib.sha1).hexdigest()
    assert verify_signature(header, BODY, [SECRET]) is SignatureStatus.MALFORMED


def test_verify_uppercase_hex_is_malformed() -> None:
    header = "sha256=" + compute_signature(SECRET, BODY).removeprefix("sha256=").upper()
    assert verify_signature(header, BODY, [SECRET]) is SignatureStatus.MALFORMED


def test_verify_changed_body_mismatches() -> None:
    header = compute_signature(SECRET, BODY)
    changed = b"Hello, World?"
    assert verify_signature(header, changed, [SECRET]) is SignatureStatus.MISMATCH


def test_verify_wrong_secret_mismatches() -> None:
    header = compute_signature(b"another secret", BODY)
    assert verify_signature(header, BODY, [SECRET]) is SignatureStatus.MISMATCH


def test_verify_rotated_secret() -> None:
    new_secret = b"rotated secret"
    header = compute_signature(new_secret, BODY)
    assert verify_signature(header, BODY, [SECRET, new_secret]) is SignatureStatus.VALID


def test_verify_no_secrets_mismatches() -> None:
    header = compute_signature(SECRET, BODY)
    assert verify_signature(header, BODY, []) is SignatureStatus.MISMATCH


def test_verify_empty_secret_never_matches() -> None:
    header = compute_signature(b"", BODY)
    assert verify_signature(header, BODY, [b""]) is SignatureStatus.MISMATCH


def test_verify_empty_body() -> None:
    header = compute_signature(SECRET, b"")
    assert verify_signature(header, b"", [SECRET]) is SignatureStatus.VALID
