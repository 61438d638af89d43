"""The App's private key, its JWT, and the start-up check against the emulator."""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fixtures_emulator import APP_ID

from daemon.errors import GitHubError, GitHubUnavailable, KeyFormatError
from daemon.github import AppAuth, GitHubClient, load_private_key
from daemon.github.app import is_time_claim_rejection
from daemon.sandbox import Emulator, generate_app_key

NOW = 1_800_000_000.0


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(
    key: object, fmt: serialization.PrivateFormat, password: bytes | None = None
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, fmt, encryption
    )


def _body_chunks(pem: bytes) -> list[str]:
    """Return 16-character pieces of the base64 body of a PEM or key file."""
    lines = [
        line
        for line in pem.decode("ascii", "replace").splitlines()
        if line and not line.startswith("-----") and ":" not in line
    ]
    body = "".join(lines)
    return [body[i : i + 16] for i in range(0, max(len(body) - 16, 1), 16)]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return _rsa_key()


# -- the JWT -----------------------------------------------------------------


def test_jwt_claims_verified_with_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = AppAuth(app_id=APP_ID, private_key=rsa_key, clock=FakeClock())
    token = auth.jwt()

    claims = jwt.decode(
        token,
        rsa_key.public_key(),
        algorithms=["RS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert claims["iat"] == int(NOW) - 60
    assert claims["exp"] == int(NOW) + 9 * 60
    assert claims["iss"] == str(APP_ID)


def test_jwt_issuer_is_client_id(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = AppAuth(
        app_id=APP_ID, private_key=rsa_key, client_id="Iv23liABC", clock=FakeClock()
    )
    claims = jwt.decode(
        auth.jwt(),
        rsa_key.public_key(),
        algorithms=["RS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["iss"] == "Iv23liABC"


def test_jwt_reused_until_a_minute_left(rsa_key: rsa.RSAPrivateKey) -> None:
    clock = FakeClock()
    auth = AppAuth(app_id=APP_ID, private_key=rsa_key, clock=clock)
    first = auth.jwt()

    clock.now += 8 * 60 - 1
    assert auth.jwt() == first

    clock.now += 2
    renewed = auth.jwt()
    assert renewed != first
    claims = jwt.decode(renewed, options={"verify_signature": False})
    assert claims["exp"] == int(clock.now) + 9 * 60


def test_jwt_uses_corrected_clock(rsa_key: rsa.RSAPrivateKey) -> None:
    clock = FakeClock()
    auth = AppAuth(app_id=APP_ID, private_key=rsa_key, clock=clock)
    auth.jwt()

    assert auth.correct_clock("Thu, 15 Jan 2027 08:10:00 GMT")
    claims = jwt.decode(auth.jwt(), options={"verify_signature": False})

    assert auth.clock_offset == pytest.approx(1_800_000_000 + 600 - NOW, abs=1)
    assert claims["iat"] == 1_800_000_600 - 60


def test_correct_clock_ignores_invalid_date(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = AppAuth(app_id=APP_ID, private_key=rsa_key, clock=FakeClock())
    assert not auth.correct_clock("yesterday")
    assert not auth.correct_clock(None)
    assert auth.clock_offset == 0.0


def test_app_auth_repr_hides_key(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = AppAuth(app_id=APP_ID, private_key=rsa_key)
    assert repr(auth) == "AppAuth(app_id=4242, client_id=None, clock_offset=0.0)"


@pytest.mark.parametrize(
    "message",
    [
        "'Expiration time' claim ('exp') must be a numeric value representing "
        "the future time at which the assertion expires",
        "'Issued at' claim ('iat') must be an Integer representing the time "
        "that the assertion was issued",
        "'Expiration time' claim ('exp') is too far in the future",
    ],
)
def test_time_claim_rejection_recognised(message: str) -> None:
    assert is_time_claim_rejection(401, message)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "A JSON web token could not be decoded"),
        (401, "'Issuer' claim ('iss') must be an Integer"),
        (403, "'Issued at' claim ('iat') must be an Integer"),
    ],
)
def test_other_rejections_not_time_claims(status: int, message: str) -> None:
    assert not is_time_claim_rejection(status, message)


# -- loading the key ---------------------------------------------------------


def _accepted_forms(key: rsa.RSAPrivateKey) -> dict[str, bytes]:
    pkcs1 = _pem(key, serialization.PrivateFormat.TraditionalOpenSSL)
    pkcs8 = _pem(key, serialization.PrivateFormat.PKCS8)
    return {
        "pkcs1": pkcs1,
        "pkcs8": pkcs8,
        "pkcs1_crlf": pkcs1.replace(b"\n", b"\r\n"),
        "pkcs8_crlf": pkcs8.replace(b"\n", b"\r\n"),
        "surrounding_whitespace": b"\n\n  " + pkcs1 + b"  \n\n",
        "literal_newlines": pkcs1.strip().replace(b"\n", b"\\n"),
        "literal_newlines_quoted": b'"' + pkcs8.strip().replace(b"\n", b"\\n") + b'"\n',
    }


@pytest.mark.parametrize(
    "form",
    [
        "pkcs1",
        "pkcs8",
        "pkcs1_crlf",
        "pkcs8_crlf",
        "surrounding_whitespace",
        "literal_newlines",
        "literal_newlines_quoted",
    ],
)
def test_key_loads(form: str, rsa_key: rsa.RSAPrivateKey) -> None:
    data = _accepted_forms(rsa_key)[form]
    loaded = load_private_key(data, source="key.pem")
    assert loaded.private_numbers() == rsa_key.private_numbers()


def test_emulator_key_loads() -> None:
    pem = generate_app_key()
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert load_private_key(pem, source="app.pem").key_size == 2048


def _rejected_files(key: rsa.RSAPrivateKey) -> dict[str, tuple[bytes, str]]:
    """Return file contents and the anchored message each must raise."""
    traditional = serialization.PrivateFormat.TraditionalOpenSSL
    pkcs1 = _pem(key, traditional)
    public = key.public_key()
    return {
        "openssh": (
            _pem(key, serialization.PrivateFormat.OpenSSH),
            r"contains an OpenSSH private key \('BEGIN OPENSSH PRIVATE KEY'\)",
        ),
        "openssh_ed25519": (
            _pem(
                ed25519.Ed25519PrivateKey.generate(),
                serialization.PrivateFormat.OpenSSH,
            ),
            r"contains an OpenSSH private key",
        ),
        "encrypted_pkcs8": (
            _pem(key, serialization.PrivateFormat.PKCS8, b"hunter22"),
            r"contains an encrypted PKCS#8 private key",
        ),
        "encrypted_pkcs1": (
            _pem(key, traditional, b"hunter22"),
            r"contains an encrypted RSA private key",
        ),
        "ec_pkcs8": (
            _pem(
                ec.generate_private_key(ec.SECP256R1()),
                serialization.PrivateFormat.PKCS8,
            ),
            r"contains a PKCS#8 EC key, not RSA",
        ),
        "ec_traditional": (
            _pem(ec.generate_private_key(ec.SECP256R1()), traditional),
            r"contains an EC private key \('BEGIN EC PRIVATE KEY'\)",
        ),
        "public_key": (
            public.public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            ),
            r"contains a public key",
        ),
        "openssh_public_key": (
            public.public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ),
            r"contains an OpenSSH public key",
        ),
        "truncated": (
            pkcs1[: len(pkcs1) // 2] + b"\n-----END RSA PRIVATE KEY-----\n",
            r"contains a 'BEGIN RSA PRIVATE KEY' block that is not a valid PKCS#1 key",
        ),
        "garbage_text": (
            b"this is not a key at all\n",
            r"contains text without a PEM 'BEGIN' line",
        ),
        "binary_der": (
            key.private_bytes(
                serialization.Encoding.DER, traditional, serialization.NoEncryption()
            ),
            r"contains binary data \(DER\?\), not PEM",
        ),
        "empty": (b"  \n", r"contains an empty file"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "openssh",
        "openssh_ed25519",
        "encrypted_pkcs8",
        "encrypted_pkcs1",
        "ec_pkcs8",
        "ec_traditional",
        "public_key",
        "openssh_public_key",
        "truncated",
        "garbage_text",
        "binary_der",
        "empty",
    ],
)
def test_key_rejected(case: str, rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    data, pattern = _rejected_files(rsa_key)[case]
    source = str(tmp_path / f"{case}.pem")

    with pytest.raises(
        KeyFormatError, match=rf"^private key file '{re.escape(source)}' {pattern}"
    ) as info:
        load_private_key(data, source=source)

    message = str(info.value)
    for chunk in _body_chunks(data):
        assert chunk not in message
    assert base64.b64encode(data[:24]).decode() not in message
    assert info.value.__cause__ is None


# -- GET /app against the emulator -------------------------------------------


@pytest.fixture
async def github(emulator: Emulator, app_key_pem: bytes) -> AsyncIterator[GitHubClient]:
    app = AppAuth(app_id=APP_ID, private_key=load_private_key(app_key_pem, source="k"))
    async with GitHubClient(api_url=emulator.api_url, app=app) as client:
        yield client


def _app_requests(emulator: Emulator) -> int:
    return sum(1 for r in emulator.requests if r.method == "GET" and r.path == "/app")


async def test_verify_app_returns_identity(github: GitHubClient) -> None:
    identity = await github.verify_app()
    assert identity.id == APP_ID
    assert identity.slug == "ghappd-sandbox"


async def test_verify_app_with_client_id(
    emulator: Emulator, app_key_pem: bytes
) -> None:
    app = AppAuth(
        app_id=APP_ID,
        private_key=load_private_key(app_key_pem, source="k"),
        client_id=emulator.client_id,
    )
    async with GitHubClient(api_url=emulator.api_url, app=app) as client:
        identity = await client.verify_app()
    assert identity.client_id == emulator.client_id


async def test_verify_app_wrong_app_id(emulator: Emulator, app_key_pem: bytes) -> None:
    app = AppAuth(app_id=9999, private_key=load_private_key(app_key_pem, source="k"))
    async with GitHubClient(api_url=emulator.api_url, app=app) as client:
        with pytest.raises(
            GitHubError,
            match=r"^GitHub knows no App with issuer '9999' .*check the App id",
        ):
            await client.verify_app()


async def test_verify_app_key_not_accepted(
    emulator: Emulator, rsa_key: rsa.RSAPrivateKey
) -> None:
    app = AppAuth(app_id=APP_ID, private_key=rsa_key)
    async with GitHubClient(api_url=emulator.api_url, app=app) as client:
        with pytest.raises(
            GitHubError,
            match=r"^GitHub did not accept the App JWT for issuer '4242' "
            r"\(.*could not be decoded\): the private key is not one of this App's "
            r"keys",
        ) as info:
            await client.verify_app()
    assert info.value.status_code == 401


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_verify_app_unreachable(
    autojump_clock: trio.abc.Clock, rsa_key: rsa.RSAPrivateKey
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    app = AppAuth(app_id=APP_ID, private_key=rsa_key)
    async with GitHubClient(api_url=url, app=app, max_attempts=2) as client:
        with pytest.raises(
            GitHubUnavailable,
            match=rf"^the App credentials could not be checked: GET /app to '{url}'"
            r" failed \(ConnectError: .+\) after 2 attempts; .*fix \[app\] api_url$",
        ):
            await client.verify_app()


@pytest.mark.parametrize("offset", [600.0, -600.0])
async def test_skewed_clock_recovers(
    emulator: Emulator, github: GitHubClient, offset: float
) -> None:
    emulator.clock_offset = offset

    identity = await github.verify_app()

    assert identity.id == APP_ID
    assert _app_requests(emulator) == 2
    assert [r.status for r in emulator.requests] == [401, 200]
    assert github.app.clock_offset == pytest.approx(offset, abs=2)


async def test_skew_corrected_once(emulator: Emulator, github: GitHubClient) -> None:
    emulator.inject(
        method="GET",
        path="/app",
        status=401,
        body={
            "message": "'Issued at' claim ('iat') must be an Integer representing "
            "the time that the assertion was issued"
        },
        times=2,
    )
    with pytest.raises(
        GitHubError,
        match=r"^GitHub returned 401 for GET /app: 'Issued at' claim .*"
        r"taken from GitHub's Date header\); check this host's clock$",
    ):
        await github.verify_app()
    assert _app_requests(emulator) == 2
