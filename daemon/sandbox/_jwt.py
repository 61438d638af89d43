"""Verification of an App's JSON Web Token, as GitHub checks it.

GitHub documents the claims in "Generating a JSON Web Token (JWT) for a
GitHub App". The token is signed with RS256, ``iat`` is not in the future,
``exp`` is no more than 10 minutes into the future, and ``iss`` is the
App's id or client id. GitHub tolerates 60 seconds of clock drift on
``iat``. The messages below are the ones GitHub's REST API returns for
each rejected claim.
"""

from __future__ import annotations

import math
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

__all__ = ["JWTRejected", "verify_app_jwt"]

MAX_EXPIRY_AHEAD = 600.0
IAT_DRIFT = 60.0

_UNDECODABLE = "A JSON web token could not be decoded"
_BAD_IAT = (
    "'Issued at' claim ('iat') must be an Integer representing the time "
    "that the assertion was issued"
)
_BAD_EXP = (
    "'Expiration time' claim ('exp') must be a numeric value representing "
    "the future time at which the assertion expires"
)
_EXP_TOO_FAR = "'Expiration time' claim ('exp') is too far in the future"
_BAD_ISS = "'Issuer' claim ('iss') must be an Integer"
_UNKNOWN_ISS = "Integration not found"


class JWTRejected(ValueError):
    """The JWT is invalid; the message is the one GitHub returns."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    return float(value)


def verify_app_jwt(
    token: str,
    *,
    public_key: RSAPublicKey,
    app_id: int,
    client_id: str,
    now: float,
) -> dict[str, Any]:
    """Verify an App JWT against ``now`` (Unix seconds) and return its claims.

    Raises JWTRejected for a bad signature, an algorithm other than RS256,
    or a time or issuer claim GitHub would reject.
    """
    try:
        header = jwt.get_unverified_header(token)
        if header.get("alg") != "RS256":
            raise JWTRejected(_UNDECODABLE)
        claims: dict[str, Any] = jwt.decode(
            token,
            public_key,
            algorithms=["RS256"],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_iss": False,
                "verify_aud": False,
                "verify_sub": False,
                "verify_jti": False,
            },
        )
    except jwt.PyJWTError:
        raise JWTRejected(_UNDECODABLE) from None

    iat = _number(claims.get("iat"))
    if iat is None or iat > now + IAT_DRIFT:
        raise JWTRejected(_BAD_IAT)
    exp = _number(claims.get("exp"))
    if exp is None or exp <= now:
        raise JWTRejected(_BAD_EXP)
    # NOTE: the limit is measured from the emulator's clock, as GitHub's
    # documentation words it ("no more than 10 minutes into the future").
    # The documented example sets iat 60 s back and exp 10 minutes ahead,
    # so a lifetime of up to 660 s is accepted.
    if exp - now > MAX_EXPIRY_AHEAD:
        raise JWTRejected(_EXP_TOO_FAR)

    iss = claims.get("iss")
    if isinstance(iss, bool) or not isinstance(iss, int | str):
        raise JWTRejected(_BAD_ISS)
    if str(iss) not in {str(app_id), client_id}:
        raise JWTRejected(_UNKNOWN_ISS)
    return claims
