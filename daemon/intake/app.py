"""The quart-trio app: the webhook route and the health checks.

While ``max_concurrent_deliveries`` webhook POSTs are in progress, another
one gets 503 with ``Retry-After`` and ``Connection: close`` before its body
is read. Otherwise ``POST {webhook_path}`` checks a request in this order,
and the first failed check sets the response status:

1. a ``Content-Length`` over ``max_body_size``: 413, before the body is read
2. the body, read in chunks: 413 as soon as it passes ``max_body_size``,
   408 when it takes longer than ``body_timeout``
3. ``X-Hub-Signature-256`` over the raw body: 401
4. ``X-GitHub-Event`` and ``X-GitHub-Delivery`` present and well-formed: 400
5. the content type: 415; the body's UTF-8, JSON and object shape: 400

So nothing is parsed before the signature is verified, and a request with
a bad signature gets a 401 whatever else is wrong with it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from daemon import context
from daemon.delivery import Delivery
from daemon.errors import GhappdError
from daemon.intake.payload import (
    EVENT_HEADER,
    ID_HEADER,
    Rejection,
    decode_payload,
    hook_id,
    printable_id,
    validate_delivery_id,
    validate_event,
)
from daemon.intake.readiness import Readiness
from daemon.intake.settings import IntakeSettings
from daemon.intake.signature import (
    SIGNATURE_HEADER,
    SignatureStatus,
    verify_signature,
)
from daemon.intake.sink import Admission, DeliverySink

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_SIGNATURE_ERRORS = {
    SignatureStatus.MISSING: f"missing {SIGNATURE_HEADER} header",
    SignatureStatus.MALFORMED: (
        f"invalid {SIGNATURE_HEADER} header: expected sha256=<64 lowercase hex digits>"
    ),
    SignatureStatus.MISMATCH: f"{SIGNATURE_HEADER} does not match the body",
}
# Seconds between two log lines about webhook POSTs rejected at the limit,
# so a flood of rejections writes one line a second.
_REJECTION_LOG_INTERVAL = 1.0


def create_app(
    *,
    settings: Callable[[], IntakeSettings],
    sink: DeliverySink,
    readiness: Readiness,
) -> QuartTrio:
    """Build the intake app.

    ``settings`` is called once here and once per request, so a reload
    takes effect for the next delivery, including a new ``webhook_path``. Each verified
    delivery except ``ping`` goes to ``sink.admit``. ``GET /healthz``
    returns 200 while the loop runs. ``GET /readyz`` returns 200 when
    ``readiness.ready``, else 503 with the unmet flags and their reasons.
    Every error response is a JSON object ``{"error": message}``.
    """
    app = QuartTrio(__name__)
    # The webhook route enforces the size cap and the body timeout itself,
    # from the settings of each request, because Quart's own limits apply to
    # every route and cannot follow a reload.
    app.config["MAX_CONTENT_LENGTH"] = None
    app.config["BODY_TIMEOUT"] = None
    gate = _DeliveryGate()

    async def healthz() -> Response:
        return _json(200, {"status": "ok"})

    async def readyz() -> Response:
        if readiness.ready:
            return _json(200, {"status": "ready"})
        return _json(503, {"status": "not ready", "unmet": readiness.unmet()})

    async def route(path: str = "") -> Response:
        current = settings()
        request_path = request.path
        if request_path != current.webhook_path:
            if request_path in _HEALTH_PATHS:
                return _error(405, "method not allowed", {"Allow": "GET, HEAD"})
            return _error(404, "not found")
        if request.method != "POST":
            return _error(405, "method not allowed", {"Allow": "POST"})
        return await _receive_within_limit(current, sink, gate)

    app.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
    # The static rule for the webhook path at start-up spares werkzeug's
    # regex match of the catch-all rules, which serve the path after a reload.
    for rule in (settings().webhook_path, "/", "/<path:path>"):
        app.add_url_rule(
            rule,
            "route",
            route,
            methods=_ALL_METHODS,
            provide_automatic_options=False,
        )
    app.register_error_handler(HTTPException, _http_error)
    app.asgi_app = _ShieldClosingSend(app.asgi_app)  # type: ignore[method-assign]
    return app


_ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


class _ShieldClosingSend:
    """ASGI middleware that lets hypercorn close a ``Connection: close`` response.

    With hypercorn 0.18 and quart-trio 0.12, hypercorn closes the
    connection inside the app's last ``send``, after it has passed
    ``http.disconnect`` to the app. Quart's receiver then cancels the
    request's nursery, and the cancellation reaches hypercorn's
    ``send_eof`` before the socket is shut down. The connection then stays
    open until the client closes it, and hypercorn keeps reading the rest
    of the body, discarding it. Shielding that last ``send`` lets the close
    finish. Only responses that set ``Connection: close`` get the shield.
    The shielded ``send`` waits on the client socket only where hypercorn
    already shields its own writes.
    """

    def __init__(self, app: _ASGIApp) -> None:
        self._app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        closing = False

        async def send_closing(message: ASGISendEvent) -> None:
            nonlocal closing
            if message["type"] == "http.response.start":
                closing = (b"connection", b"close") in [
                    (name.lower(), value.lower()) for name, value in message["headers"]
                ]
            last = message["type"] == "http.response.body" and not message.get(
                "more_body", False
            )
            if closing and last:
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await self._app(scope, receive, send_closing)


class _DeliveryGate:
    """The count of webhook POSTs in progress, and the log of those rejected.

    The count is compared with the limit of each request's settings, so a
    reload takes effect for the next POST. Trio runs every request in one
    thread, and nothing awaits between the comparison and the increment, so
    a plain integer is safe.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.in_progress = 0
        self._clock = clock
        self._unlogged = 0
        self._last_remote = "-"
        self._logged_at = -math.inf

    def reject(self, *, limit: int, remote: str) -> None:
        """Count a rejected POST and log the count at most once a second."""
        self._unlogged += 1
        self._last_remote = remote
        self.log_due(limit=limit)

    def log_due(self, *, limit: int) -> None:
        """Log the rejections not yet logged, unless a line went out within 1 s.

        NOTE: rejections counted after the last line are logged only with the
        next rejection or the next finished POST a second or more later.
        """
        now = self._clock()
        if not self._unlogged or now - self._logged_at < _REJECTION_LOG_INTERVAL:
            return
        log.warning(
            "%d webhook POSTs rejected with 503 since the previous such line,"
            " the last from %s: %d in progress, limit %d"
            " ([server] max_concurrent_deliveries)",
            self._unlogged,
            self._last_remote,
            self.in_progress,
            limit,
        )
        self._unlogged = 0
        self._logged_at = now


async def _receive_within_limit(
    settings: IntakeSettings, sink: DeliverySink, gate: _DeliveryGate
) -> Response:
    # Quart 0.22 (quart/asgi.py, handle_messages) appends every body chunk
    # that hypercorn passes on to request.body, whether the handler reads
    # it or not, until the response ends the request. So this limit bounds
    # the memory held for bodies: at most max_concurrent_deliveries
    # requests, each buffering at most max_body_size bytes, and twice that
    # while `await request.body` copies a complete body out. A rejected POST
    # returns before awaiting anything, so Quart has buffered only what
    # arrived with the head, and the response frees it. After that response
    # hypercorn 0.18 passes no more of the body to the app. It closes the
    # connection once the response is sent, which _ShieldClosingSend makes
    # reliable for `Connection: close` responses.
    limit = settings.max_concurrent_deliveries
    if gate.in_progress >= limit:
        gate.reject(limit=limit, remote=request.remote_addr or "-")
        return _error(
            503,
            f"{limit} deliveries already in progress; retry later",
            {"Retry-After": str(settings.retry_after), "Connection": "close"},
        )

    gate.in_progress += 1
    try:
        return await _receive(settings, sink)
    finally:
        gate.in_progress -= 1
        gate.log_due(limit=limit)


async def _receive(settings: IntakeSettings, sink: DeliverySink) -> Response:
    headers = request.headers
    remote = request.remote_addr or "-"
    logged_id = printable_id(headers.get(ID_HEADER))

    try:
        body = await _read_body(settings)
    except Rejection as rejection:
        log.warning(
            "delivery %r from %s rejected: %s",
            logged_id,
            remote,
            rejection.message,
        )
        # The rest of the body is never read, so the connection cannot be reused.
        return _error(rejection.status, rejection.message, {"Connection": "close"})

    status = verify_signature(headers.get(SIGNATURE_HEADER), body, settings.secrets)
    if status is not SignatureStatus.VALID:
        log.warning(
            "delivery %r from %s rejected: signature %s",
            logged_id,
            remote,
            status.value,
        )
        return _error(401, _SIGNATURE_ERRORS[status])

    mimetype = request.mimetype
    try:
        event = validate_event(headers.get(EVENT_HEADER))
        delivery_id = validate_delivery_id(headers.get(ID_HEADER))
        payload = decode_payload(body, mimetype, request.mimetype_params)
    except Rejection as rejection:
        log.warning(
            "delivery %r from %s rejected: %s",
            logged_id,
            remote,
            rejection.message,
        )
        return _error(rejection.status, rejection.message)

    if event == "ping":
        hook = hook_id(payload)
        log.info("ping %s for hook %s received", delivery_id, hook)
        return _json(200, {"hook_id": hook})

    delivery = Delivery(
        id=delivery_id,
        event=event,
        payload=payload,
        body=body,
        received_at=time.time(),
        content_type=mimetype,
    )
    return await _admit(delivery, settings, sink)


async def _read_body(settings: IntakeSettings) -> bytes:
    limit = settings.max_body_size
    declared = request.content_length
    if declared is not None and declared > limit:
        raise Rejection(
            413,
            f"body of {declared} bytes is over the {limit}-byte cap"
            " ([server] max_body_size)",
        )

    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(settings.body_timeout) as scope:
        if declared is not None:
            # h11 stops the body at Content-Length, which is within the cap,
            # so awaiting it whole is bounded and saves a wake-up per chunk.
            chunks.append(await request.body)
        else:
            # Quart's Body yields what has arrived since the last iteration,
            # so a chunked body is dropped soon after it passes the cap.
            async for chunk in request.body:
                size += len(chunk)
                if size > limit:
                    raise Rejection(
                        413,
                        f"body is over the {limit}-byte cap ([server] max_body_size)",
                    )
                chunks.append(chunk)
    if scope.cancelled_caught:
        raise Rejection(
            408, f"body not received within {settings.body_timeout} seconds"
        )
    return b"".join(chunks)


async def _admit(
    delivery: Delivery, settings: IntakeSettings, sink: DeliverySink
) -> Response:
    with context.bind(
        delivery_id=delivery.id,
        event=delivery.event,
        installation_id=delivery.installation_id,
        repository=delivery.repository,
    ):
        try:
            admission = await sink.admit(delivery)
        except GhappdError:
            log.exception("delivery %s not admitted: the sink failed", delivery.id)
            return _error(
                503,
                "delivery not recorded; retry later",
                {"Retry-After": str(settings.retry_after)},
            )

        if admission is Admission.ACCEPTED:
            log.info(
                "delivery %s accepted: event %s, action %s, installation %s",
                delivery.id,
                delivery.event,
                delivery.action,
                delivery.installation_id,
            )
            return _json(202, {"status": "accepted", "delivery": delivery.id})

        if admission is Admission.DUPLICATE:
            log.info("delivery %s not queued again: duplicate", delivery.id)
            return _json(200, {"status": "duplicate", "delivery": delivery.id})

        log.warning(
            "delivery %s rejected: queue full, Retry-After %d s",
            delivery.id,
            settings.retry_after,
        )
        return _error(
            503,
            "queue full; retry later",
            {"Retry-After": str(settings.retry_after)},
        )


async def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    headers = {
        name: value
        for name, value in error.get_headers()
        if name.lower() not in {"content-type", "content-length"}
    }
    return _error(status, error.description or error.name, headers)


def _error(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return _json(status, {"error": message}, headers)


def _json(
    status: int, document: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        json.dumps(document),
        status=status,
        headers=dict(headers or {}),
        content_type="application/json",
    )
