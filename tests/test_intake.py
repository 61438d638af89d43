"""The intake app over real HTTP on 127.0.0.1, served by ``serve_intake``."""

from __future__ import annotations

import json
import logging
import socket
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from daemon.delivery import Delivery
from daemon.errors import JournalError
from daemon.intake import (
    Admission,
    DeliverySink,
    IntakeSettings,
    MemorySink,
    Readiness,
    create_app,
    serve_intake,
)
from daemon.intake.signature import compute_signature

SECRET = b"intake test secret"
ROTATED_SECRET = b"intake rotated secret"
PATH = "/webhooks/github"
SMALL_CAP = 4096


class RecordingSink:
    """A sink that stores every delivery and returns ``admission``."""

    def __init__(self, admission: Admission = Admission.ACCEPTED) -> None:
        self.admission = admission
        self.deliveries: list[Delivery] = []

    async def admit(self, delivery: Delivery) -> Admission:
        self.deliveries.append(delivery)
        return self.admission


class FailingSink:
    async def admit(self, delivery: Delivery) -> Admission:
        raise JournalError(f"journal write failed for delivery {delivery.id!r}")


@dataclass
class Intake:
    url: str
    host: str
    port: int
    client: httpx.AsyncClient
    readiness: Readiness
    settings: list[IntakeSettings]
    sink: DeliverySink
    counter: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**9)))

    async def post(
        self,
        body: bytes,
        *,
        event: str | None = "push",
        delivery: str | None = None,
        secret: bytes | None = SECRET,
        signature: str | None = None,
        content_type: str = "application/json",
        path: str = PATH,
    ) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if event is not None:
            headers["X-GitHub-Event"] = event
        if delivery is None:
            delivery = f"delivery-{next(self.counter)}"
        if delivery:
            headers["X-GitHub-Delivery"] = delivery
        if signature is None and secret is not None:
            signature = compute_signature(secret, body)
        if signature is not None:
            headers["X-Hub-Signature-256"] = signature
        return await self.client.post(self.url + path, content=body, headers=headers)


StartIntake = Callable[..., Awaitable[Intake]]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
def start_intake(nursery: trio.Nursery, client: httpx.AsyncClient) -> StartIntake:
    async def start(
        *,
        sink: DeliverySink | None = None,
        settings: IntakeSettings | None = None,
        ready: bool = True,
    ) -> Intake:
        holder = [settings or IntakeSettings(secrets=(SECRET,))]
        readiness = Readiness()
        if ready:
            readiness.set("config_loaded", "credentials_accepted")
        sink = sink if sink is not None else RecordingSink()
        app = create_app(settings=lambda: holder[0], sink=sink, readiness=readiness)
        urls = await nursery.start(
            lambda task_status: serve_intake(
                app,
                binds=["127.0.0.1:0"],
                readiness=readiness,
                task_status=task_status,
            )
        )
        parsed = urllib.parse.urlsplit(urls[0])
        assert parsed.hostname is not None
        assert parsed.port is not None
        return Intake(
            url=urls[0],
            host=parsed.hostname,
            port=parsed.port,
            client=client,
            readiness=readiness,
            settings=holder,
            sink=sink,
        )

    return start


@pytest.fixture
async def intake(start_intake: StartIntake) -> Intake:
    return await start_intake()


def recorded(intake: Intake) -> list[Delivery]:
    assert isinstance(intake.sink, RecordingSink)
    return intake.sink.deliveries


def fixture_payloads(directory: Path) -> list[tuple[str, dict[str, Any]]]:
    payloads = []
    for path in sorted(directory.glob("*.json")):
        for payload in json.loads(path.read_text()):
            payloads.append((path.stem, payload))
    return payloads


def push_body() -> bytes:
    return json.dumps({"ref": "refs/heads/main", "installation": {"id": 7}}).encode()


async def raw_exchange(
    intake: Intake, head: bytes, body_parts: list[bytes]
) -> tuple[int, bytes]:
    """Send ``head`` and ``body_parts`` without ending the body.

    Return the response status and the bytes read up to the end of the
    response head. A server that waits for the rest of the body makes this
    raise trio.TooSlowError after 5 seconds.
    """
    stream = await trio.open_tcp_stream(intake.host, intake.port)
    async with stream:
        await stream.send_all(head)
        for part in body_parts:
            await stream.send_all(part)
        head_bytes = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head_bytes:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                head_bytes += chunk
    status_line = head_bytes.split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), head_bytes


def request_head(intake: Intake, headers: dict[str, str]) -> bytes:
    lines = [f"POST {PATH} HTTP/1.1", f"Host: {intake.host}:{intake.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# Every real payload


async def test_fixture_payloads_accepted(
    intake: Intake, webhook_fixtures: Path
) -> None:
    payloads = fixture_payloads(webhook_fixtures)
    assert len(payloads) > 100

    expected = []
    for index, (event, payload) in enumerate(payloads):
        body = json.dumps(payload).encode()
        delivery_id = f"fixture-{index}"
        response = await intake.post(body, event=event, delivery=delivery_id)
        if event == "ping":
            assert response.status_code == 200, (event, index)
            assert response.json() == {"hook_id": payload["hook_id"]}
        else:
            assert response.status_code == 202, (event, index)
            assert response.json() == {"status": "accepted", "delivery": delivery_id}
            expected.append((delivery_id, event, payload, body))

    deliveries = recorded(intake)
    assert len(deliveries) == len(expected)
    for delivery, (delivery_id, event, payload, body) in zip(
        deliveries, expected, strict=True
    ):
        assert delivery.id == delivery_id
        assert delivery.event == event
        assert delivery.payload == payload
        assert delivery.body == body


async def test_fixture_payloads_changed_byte_rejected(
    intake: Intake, webhook_fixtures: Path
) -> None:
    for index, (event, payload) in enumerate(fixture_payloads(webhook_fixtures)):
        body = json.dumps(payload).encode()
        signature = compute_signature(SECRET, body)
        middle = len(body) // 2
        changed = body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1 :]
        response = await intake.post(changed, event=event, signature=signature)
        assert response.status_code == 401, (event, index)
    assert recorded(intake) == []


async def test_ping_not_sent_to_sink(intake: Intake) -> None:
    body = json.dumps({"zen": "Keep it simple.", "hook": {"id": 99}}).encode()
    response = await intake.post(body, event="ping")
    assert response.status_code == 200
    assert response.json() == {"hook_id": 99}
    assert recorded(intake) == []


async def test_accepted_delivery_fields(intake: Intake) -> None:
    body = push_body()
    response = await intake.post(body, delivery="abc-123")
    assert response.status_code == 202
    (delivery,) = recorded(intake)
    assert delivery.installation_id == 7
    assert delivery.content_type == "application/json"
    assert delivery.received_at > 0


# Signatures


async def test_signature_missing(intake: Intake) -> None:
    response = await intake.post(push_body(), secret=None)
    assert response.status_code == 401
    assert "missing X-Hub-Signature-256" in response.json()["error"]
    assert recorded(intake) == []


async def test_signature_sha1_only(intake: Intake) -> None:
    response = await intake.post(push_body(), signature="sha1=" + "0" * 40)
    assert response.status_code == 401
    assert recorded(intake) == []


async def test_signature_wrong_prefix(intake: Intake) -> None:
    body = push_body()
    digest = compute_signature(SECRET, body).removeprefix("sha256=")
    response = await intake.post(body, signature="sha512=" + digest)
    assert response.status_code == 401
    assert recorded(intake) == []


async def test_signature_uppercase_hex_rejected(intake: Intake) -> None:
    body = push_body()
    digest = compute_signature(SECRET, body).removeprefix("sha256=")
    response = await intake.post(body, signature="sha256=" + digest.upper())
    assert response.status_code == 401
    assert recorded(intake) == []


async def test_signature_wrong_length(intake: Intake) -> None:
    body = push_body()
    signature = compute_signature(SECRET, body)
    response = await intake.post(body, signature=signature[:-1])
    assert response.status_code == 401
    assert recorded(intake) == []


async def test_signature_wrong_secret(intake: Intake) -> None:
    response = await intake.post(push_body(), secret=b"not the secret")
    assert response.status_code == 401
    assert "does not match" in response.json()["error"]
    assert recorded(intake) == []


async def test_empty_body_unsigned(intake: Intake) -> None:
    response = await intake.post(b"", secret=None)
    assert response.status_code == 401
    assert recorded(intake) == []


async def test_empty_body_signed(intake: Intake) -> None:
    response = await intake.post(b"")
    assert response.status_code == 400
    assert recorded(intake) == []


async def test_non_utf8_body(intake: Intake) -> None:
    response = await intake.post(b'{"ref": "\xff\xfe"}')
    assert response.status_code == 400
    assert "UTF-8" in response.json()["error"]
    assert recorded(intake) == []


async def test_non_utf8_body_bad_signature(intake: Intake) -> None:
    response = await intake.post(b'{"ref": "\xff"}', secret=b"not the secret")
    assert response.status_code == 401


async def test_rotated_secret_accepted(start_intake: StartIntake) -> None:
    intake = await start_intake(
        settings=IntakeSettings(secrets=(SECRET, ROTATED_SECRET))
    )
    old = await intake.post(push_body(), secret=SECRET)
    new = await intake.post(push_body(), secret=ROTATED_SECRET)
    assert old.status_code == 202
    assert new.status_code == 202
    assert len(recorded(intake)) == 2


async def test_settings_swap_takes_effect(intake: Intake) -> None:
    before = await intake.post(push_body(), secret=ROTATED_SECRET)
    intake.settings[0] = replace(intake.settings[0], secrets=(ROTATED_SECRET,))
    after = await intake.post(push_body(), secret=ROTATED_SECRET)
    old_secret = await intake.post(push_body(), secret=SECRET)
    assert before.status_code == 401
    assert after.status_code == 202
    assert old_secret.status_code == 401


async def test_settings_swap_moves_path(intake: Intake) -> None:
    intake.settings[0] = replace(intake.settings[0], webhook_path="/hooks/new")
    old_path = await intake.post(push_body())
    new_path = await intake.post(push_body(), path="/hooks/new")
    assert old_path.status_code == 404
    assert new_path.status_code == 202


async def test_signature_warning_logged_once(
    intake: Intake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = push_body()
    signature = compute_signature(b"not the secret", body)
    response = await intake.post(body, delivery="evil-delivery-42", signature=signature)
    assert response.status_code == 401

    warnings = [
        record for record in caplog.records if record.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "evil-delivery-42" in message
    assert "127.0.0.1" in message
    assert signature.removeprefix("sha256=") not in message
    assert "refs/heads/main" not in message
    for record in caplog.records:
        assert signature.removeprefix("sha256=") not in record.getMessage()


# Headers


async def test_missing_event_header(intake: Intake) -> None:
    response = await intake.post(push_body(), event=None)
    assert response.status_code == 400
    assert "X-GitHub-Event" in response.json()["error"]
    assert recorded(intake) == []


async def test_missing_delivery_header(intake: Intake) -> None:
    response = await intake.post(push_body(), delivery="")
    assert response.status_code == 400
    assert "X-GitHub-Delivery" in response.json()["error"]
    assert recorded(intake) == []


async def test_missing_header_and_bad_signature(intake: Intake) -> None:
    response = await intake.post(push_body(), event=None, secret=b"not the secret")
    assert response.status_code == 401
    assert recorded(intake) == []


@pytest.mark.parametrize("event", ["Push", "pull-request", "push event", "a" * 65])
async def test_malformed_event_header(intake: Intake, event: str) -> None:
    response = await intake.post(push_body(), event=event)
    assert response.status_code == 400
    assert recorded(intake) == []


@pytest.mark.parametrize("delivery", ["with space", "x" * 129, "tab\there"])
async def test_malformed_delivery_header(intake: Intake, delivery: str) -> None:
    response = await intake.post(push_body(), delivery=delivery)
    assert response.status_code == 400
    assert recorded(intake) == []


# Content types and bodies


async def test_form_urlencoded_body(intake: Intake) -> None:
    payload = {"ref": "refs/heads/main", "note": "a&b=c ü"}
    body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
    response = await intake.post(body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 202
    (delivery,) = recorded(intake)
    assert delivery.payload == payload
    assert delivery.body == body
    assert delivery.content_type == "application/x-www-form-urlencoded"


async def test_form_without_payload_field(intake: Intake) -> None:
    response = await intake.post(
        b"other=1", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 400
    assert recorded(intake) == []


async def test_json_with_charset(intake: Intake) -> None:
    response = await intake.post(
        push_body(), content_type="application/json; charset=utf-8"
    )
    assert response.status_code == 202


async def test_json_with_other_charset(intake: Intake) -> None:
    response = await intake.post(
        push_body(), content_type="application/json; charset=latin-1"
    )
    assert response.status_code == 415


async def test_other_content_type(intake: Intake) -> None:
    response = await intake.post(push_body(), content_type="text/plain")
    assert response.status_code == 415
    assert recorded(intake) == []


async def test_invalid_json(intake: Intake) -> None:
    response = await intake.post(b'{"ref": ')
    assert response.status_code == 400
    assert recorded(intake) == []


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null"])
async def test_json_not_an_object(intake: Intake, body: bytes) -> None:
    response = await intake.post(body)
    assert response.status_code == 400
    assert recorded(intake) == []


# Body size


async def test_oversize_content_length_before_body(start_intake: StartIntake) -> None:
    settings = IntakeSettings(secrets=(SECRET,), max_body_size=SMALL_CAP)
    intake = await start_intake(settings=settings)
    head = request_head(
        intake,
        {
            "Content-Type": "application/json",
            "Content-Length": str(SMALL_CAP + 1),
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": "big-1",
        },
    )
    # No body byte is sent, so the 413 comes from the Content-Length alone.
    status, _ = await raw_exchange(intake, head, [])
    assert status == 413
    assert recorded(intake) == []


async def test_oversize_content_length_httpx(start_intake: StartIntake) -> None:
    settings = IntakeSettings(secrets=(SECRET,), max_body_size=SMALL_CAP)
    intake = await start_intake(settings=settings)
    body = b'{"pad": "' + b"x" * SMALL_CAP + b'"}'
    response = await intake.post(body)
    assert response.status_code == 413
    assert recorded(intake) == []


async def test_oversize_chunked_stream(start_intake: StartIntake) -> None:
    settings = IntakeSettings(secrets=(SECRET,), max_body_size=SMALL_CAP)
    intake = await start_intake(settings=settings)
    head = request_head(
        intake,
        {
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": "big-2",
        },
    )
    chunk = b"x" * 1024
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (SMALL_CAP // len(chunk) + 1)
    # The terminating zero-length chunk is never sent, so a 413 proves the
    # server stopped reading at the cap instead of waiting for the whole body.
    status, head_bytes = await raw_exchange(intake, head, parts)
    assert status == 413
    assert b"connection: close" in head_bytes.lower()
    assert recorded(intake) == []


async def test_chunked_stream_under_cap(intake: Intake) -> None:
    body = push_body()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": "chunked-1",
        "X-Hub-Signature-256": compute_signature(SECRET, body),
    }
    response = await intake.client.post(
        intake.url + PATH, content=chunks(), headers=headers
    )
    assert response.status_code == 202
    (delivery,) = recorded(intake)
    assert delivery.body == body


async def test_slow_body_times_out(start_intake: StartIntake) -> None:
    settings = IntakeSettings(secrets=(SECRET,), body_timeout=0.2)
    intake = await start_intake(settings=settings)
    head = request_head(
        intake,
        {
            "Content-Type": "application/json",
            "Content-Length": "100",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": "slow-1",
        },
    )
    status, _ = await raw_exchange(intake, head, [b'{"ref": '])
    assert status == 408
    assert recorded(intake) == []


# Sink results


async def test_duplicate_delivery(start_intake: StartIntake) -> None:
    send_channel, receive_channel = trio.open_memory_channel[Delivery](10)
    intake = await start_intake(sink=MemorySink(send_channel=send_channel))
    first = await intake.post(push_body(), delivery="dup-1")
    second = await intake.post(push_body(), delivery="dup-1")
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json() == {"status": "duplicate", "delivery": "dup-1"}
    assert receive_channel.receive_nowait().id == "dup-1"
    with pytest.raises(trio.WouldBlock):
        receive_channel.receive_nowait()


async def test_full_channel_then_retry(start_intake: StartIntake) -> None:
    send_channel, receive_channel = trio.open_memory_channel[Delivery](1)
    intake = await start_intake(sink=MemorySink(send_channel=send_channel))
    first = await intake.post(push_body(), delivery="full-1")
    rejected = await intake.post(push_body(), delivery="full-2")
    assert first.status_code == 202
    assert rejected.status_code == 503
    assert rejected.headers["Retry-After"] == "5"

    assert receive_channel.receive_nowait().id == "full-1"
    retried = await intake.post(push_body(), delivery="full-2")
    assert retried.status_code == 202
    assert receive_channel.receive_nowait().id == "full-2"


async def test_full_sink_retry_after_setting(start_intake: StartIntake) -> None:
    intake = await start_intake(
        sink=RecordingSink(Admission.FULL),
        settings=IntakeSettings(secrets=(SECRET,), retry_after=17),
    )
    response = await intake.post(push_body())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "17"


async def test_failing_sink_returns_503(
    start_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    intake = await start_intake(sink=FailingSink())
    response = await intake.post(push_body(), delivery="journal-1")
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    assert any("journal-1" in record.getMessage() for record in caplog.records)


# Routing and health


async def test_healthz(intake: Intake) -> None:
    response = await intake.client.get(intake.url + "/healthz")
    assert response.status_code == 200


async def test_readyz_not_ready_then_ready(start_intake: StartIntake) -> None:
    intake = await start_intake(ready=False)
    intake.readiness.set("config_loaded")
    intake.readiness.fail("credentials_accepted", "GitHub rejected the App JWT")
    before = await intake.client.get(intake.url + "/readyz")
    assert before.status_code == 503
    assert before.json()["unmet"] == {
        "credentials_accepted": "GitHub rejected the App JWT"
    }

    intake.readiness.set("credentials_accepted")
    after = await intake.client.get(intake.url + "/readyz")
    assert after.status_code == 200


async def test_listener_bound_set_by_server(intake: Intake) -> None:
    assert "listener_bound" not in intake.readiness.unmet()


async def test_unknown_path(intake: Intake) -> None:
    response = await intake.client.get(intake.url + "/nothing/here")
    assert response.status_code == 404


async def test_unknown_path_post(intake: Intake) -> None:
    response = await intake.post(push_body(), path="/webhooks/gitlab")
    assert response.status_code == 404
    assert recorded(intake) == []


async def test_webhook_wrong_method(intake: Intake) -> None:
    response = await intake.client.get(intake.url + PATH)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


async def test_healthz_wrong_method(intake: Intake) -> None:
    response = await intake.client.post(intake.url + "/healthz")
    assert response.status_code == 405


# MemorySink alone


def make_delivery(delivery_id: str) -> Delivery:
    return Delivery(
        id=delivery_id, event="push", payload={}, body=b"{}", received_at=0.0
    )


async def test_memory_sink_window(autojump_clock: trio.abc.Clock) -> None:
    send_channel, _receive_channel = trio.open_memory_channel[Delivery](10)
    sink = MemorySink(send_channel=send_channel, window=60.0)
    assert await sink.admit(make_delivery("a")) is Admission.ACCEPTED
    await trio.sleep(59)
    assert await sink.admit(make_delivery("a")) is Admission.DUPLICATE
    await trio.sleep(2)
    assert await sink.admit(make_delivery("a")) is Admission.ACCEPTED
    assert len(sink) == 1


async def test_memory_sink_size_cap() -> None:
    send_channel, _receive_channel = trio.open_memory_channel[Delivery](10)
    sink = MemorySink(send_channel=send_channel, max_entries=2)
    for delivery_id in ("a", "b", "c"):
        assert await sink.admit(make_delivery(delivery_id)) is Admission.ACCEPTED
    assert len(sink) == 2
    assert await sink.admit(make_delivery("c")) is Admission.DUPLICATE
    assert await sink.admit(make_delivery("a")) is Admission.ACCEPTED


async def test_memory_sink_full_not_remembered() -> None:
    send_channel, _receive_channel = trio.open_memory_channel[Delivery](0)
    sink = MemorySink(send_channel=send_channel)
    assert await sink.admit(make_delivery("a")) is Admission.FULL
    assert len(sink) == 0


async def test_memory_sink_closed_channel() -> None:
    send_channel, receive_channel = trio.open_memory_channel[Delivery](1)
    await receive_channel.aclose()
    sink = MemorySink(send_channel=send_channel)
    assert await sink.admit(make_delivery("a")) is Admission.FULL


def test_settings_repr_hides_secrets() -> None:
    settings = IntakeSettings(secrets=(SECRET,))
    assert SECRET.decode() not in repr(settings)
    assert "1 hidden" in repr(settings)


def test_settings_reject_health_path() -> None:
    with pytest.raises(ValueError, match=r"^webhook_path '/healthz' is taken"):
        IntakeSettings(secrets=(SECRET,), webhook_path="/healthz")


def test_readiness_unknown_flag() -> None:
    with pytest.raises(KeyError, match=r"unknown readiness flag 'disk_free'"):
        Readiness().set("disk_free")


# Serving


async def test_serve_on_inherited_fd(nursery: trio.Nursery) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # detach() hands the descriptor to hypercorn, as systemd's socket would be.
    fd = listener.detach()
    app = create_app(
        settings=lambda: IntakeSettings(secrets=(SECRET,)),
        sink=RecordingSink(),
        readiness=Readiness(),
    )
    urls = await nursery.start(
        lambda task_status: serve_intake(
            app, binds=[f"fd://{fd}"], task_status=task_status
        )
    )
    assert urls == [f"http://127.0.0.1:{port}"]
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{port}/healthz")
    assert response.status_code == 200


async def test_shutdown_trigger_stops_server(client: httpx.AsyncClient) -> None:
    readiness = Readiness()
    stop = trio.Event()
    app = create_app(
        settings=lambda: IntakeSettings(secrets=(SECRET,)),
        sink=RecordingSink(),
        readiness=readiness,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: serve_intake(
                    app,
                    binds=["127.0.0.1:0"],
                    shutdown_trigger=stop.wait,
                    readiness=readiness,
                    task_status=task_status,
                )
            )
            response = await client.get(urls[0] + "/healthz")
            assert response.status_code == 200
            stop.set()
    assert readiness.unmet()["listener_bound"] == "the intake has stopped"


async def test_hypercorn_logs_through_stdlib(
    start_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    intake = await start_intake()
    response = await intake.client.get(intake.url + "/healthz")
    assert response.status_code == 200

    server_logger = logging.getLogger("daemon.intake.hypercorn")
    assert server_logger.handlers == []
    assert server_logger.propagate
    server_records = [r for r in caplog.records if r.name == server_logger.name]
    assert any("Running on" in r.getMessage() for r in server_records)
    assert [r for r in caplog.records if r.name == "hypercorn.access"] == []


# Concurrent deliveries


LIMIT = 2


async def hold_post(intake: Intake) -> trio.SocketStream:
    """Send a POST with a wrong signature and all of its body but the last byte."""
    body = push_body()
    head = request_head(
        intake,
        {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": f"held-{next(intake.counter)}",
            "X-Hub-Signature-256": compute_signature(b"not the secret", body),
        },
    )
    stream = await trio.open_tcp_stream(intake.host, intake.port)
    await stream.send_all(head + body[:-1])
    return stream


async def read_head(stream: trio.SocketStream) -> bytes:
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            head += chunk
    return head


def status_of(head: bytes) -> int:
    return int(head.split(b"\r\n", 1)[0].split()[1])


async def finish_post(stream: trio.SocketStream) -> int:
    """Send the byte ``hold_post`` held back and return the response status."""
    async with stream:
        await stream.send_all(push_body()[-1:])
        return status_of(await read_head(stream))


def response_pending(stream: trio.SocketStream) -> bool:
    """Return whether no response byte has arrived on ``stream`` yet."""
    peek = socket.fromfd(stream.socket.fileno(), socket.AF_INET, socket.SOCK_STREAM)
    try:
        peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    finally:
        peek.close()
    return False


async def settle() -> None:
    # Lets the server handle every byte already sent on loopback.
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)


async def post_head_only(intake: Intake) -> tuple[int, bytes, bytes]:
    """Send a POST head that announces a body and send no body byte.

    Return the status, the response head and what follows until the server
    closes the connection.
    """
    head = request_head(
        intake,
        {
            "Content-Type": "application/json",
            "Content-Length": "100",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": f"over-{next(intake.counter)}",
        },
    )
    stream = await trio.open_tcp_stream(intake.host, intake.port)
    async with stream:
        await stream.send_all(head)
        response_head = await read_head(stream)
        rest = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                rest += chunk
    return status_of(response_head), response_head, rest


async def assert_limit_free(intake: Intake) -> None:
    """Assert that ``LIMIT`` POSTs fit in and one more is rejected."""
    held = [await hold_post(intake) for _ in range(LIMIT)]
    await settle()
    for stream in held:
        assert response_pending(stream)
    status, _, _ = await post_head_only(intake)
    assert status == 503
    for stream in held:
        assert await finish_post(stream) == 401


@pytest.fixture
async def limited(start_intake: StartIntake) -> Intake:
    return await start_intake(
        settings=IntakeSettings(secrets=(SECRET,), max_concurrent_deliveries=LIMIT)
    )


async def test_limit_rejects_before_body(
    limited: Intake, caplog: pytest.LogCaptureFixture
) -> None:
    held = [await hold_post(limited) for _ in range(LIMIT)]
    await settle()
    for stream in held:
        assert response_pending(stream)

    status, head, _ = await post_head_only(limited)
    assert status == 503
    assert b"retry-after: 5\r\n" in head.lower()
    assert b"connection: close\r\n" in head.lower()

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "127.0.0.1" in warnings[0].getMessage()
    assert "max_concurrent_deliveries" in warnings[0].getMessage()

    health = await limited.client.get(limited.url + "/healthz")
    assert health.status_code == 200

    for stream in held:
        assert await finish_post(stream) == 401
    accepted = await limited.post(push_body())
    assert accepted.status_code == 202


async def test_limit_follows_settings_swap(limited: Intake) -> None:
    held = [await hold_post(limited) for _ in range(LIMIT)]
    await settle()
    limited.settings[0] = replace(
        limited.settings[0], max_concurrent_deliveries=LIMIT + 1
    )
    held.append(await hold_post(limited))
    await settle()
    assert response_pending(held[-1])

    status, _, _ = await post_head_only(limited)
    assert status == 503
    for stream in held:
        assert await finish_post(stream) == 401


async def test_limit_free_after_failures(limited: Intake) -> None:
    bad_signature = await limited.post(push_body(), secret=b"not the secret")
    no_event = await limited.post(push_body(), event=None)
    assert bad_signature.status_code == 401
    assert no_event.status_code == 400
    await assert_limit_free(limited)


async def test_limit_free_after_rejections(limited: Intake) -> None:
    held = [await hold_post(limited) for _ in range(LIMIT)]
    await settle()
    for _ in range(3):
        status, _, _ = await post_head_only(limited)
        assert status == 503
    for stream in held:
        assert await finish_post(stream) == 401
    await assert_limit_free(limited)


async def test_limit_free_after_timeout(limited: Intake) -> None:
    limited.settings[0] = replace(limited.settings[0], body_timeout=0.2)
    held = [await hold_post(limited) for _ in range(LIMIT)]
    for stream in held:
        async with stream:
            assert status_of(await read_head(stream)) == 408
    limited.settings[0] = replace(limited.settings[0], body_timeout=10.0)
    await assert_limit_free(limited)


async def test_limit_free_after_disconnect(limited: Intake) -> None:
    held = [await hold_post(limited) for _ in range(LIMIT)]
    await settle()
    for stream in held:
        await stream.aclose()
    await settle()
    await assert_limit_free(limited)


def test_rejection_log_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    from daemon.intake.app import _DeliveryGate

    now = [100.0]
    gate = _DeliveryGate(clock=lambda: now[0])
    for _ in range(3):
        gate.reject(limit=LIMIT, remote="192.0.2.1")
    now[0] = 100.5
    gate.reject(limit=LIMIT, remote="192.0.2.2")
    gate.log_due(limit=LIMIT)
    now[0] = 101.0
    gate.log_due(limit=LIMIT)
    gate.log_due(limit=LIMIT)

    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("1 webhook POSTs rejected")
    assert "192.0.2.1" in lines[0]
    assert lines[1].startswith("3 webhook POSTs rejected")
    assert "192.0.2.2" in lines[1]


def test_settings_reject_zero_deliveries() -> None:
    with pytest.raises(ValueError, match=r"^max_concurrent_deliveries 0 must be"):
        IntakeSettings(secrets=(SECRET,), max_concurrent_deliveries=0)
