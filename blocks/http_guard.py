"""One request-hardening layer for every HTTP surface of ours (receiver, model server, ...).

What a hostile client can send before any handler runs is checked here, once:

- ``parse_timestamp``: a signed Unix timestamp, ASCII digits only and at most 12 of them,
  read before any arithmetic (a 400-digit header is refused, not computed with).
- ``check_content_type``: the media type a route accepts (a cross-site form post to a JSON
  route is refused 415), UTF-8 only.
- ``read_body``: the body, refused 413 past a size cap (declared or streamed), 408 when it
  does not arrive within the body deadline.
- ``load_json``: RFC 8259 JSON, UTF-8, finite numbers, at most ``MAX_DEPTH`` levels deep (a
  body nested 1,000 deep is a 400, never a ``RecursionError``), integers of 64 bits at most,
  no lone surrogates; ``want=dict`` refuses any other top-level value.
- ``internal_error``: an error answer that names nothing internal, with an id to find the
  logged traceback by.
- ``BodyDeadline`` (ASGI middleware) and ``server_settings()``/``serve_config()``
  (uvicorn, with ``guarded_protocol``): a header-read timeout, a body-read deadline, a
  keep-alive timeout, a cap on incomplete request heads and a connection cap.

Every check raises ``Rejected`` (status and message); each app maps it to its own answer.
This module lives in ``blocks`` so that every layer above (the serving adapters' signing,
the model server, the receiver) can use it; it imports nothing of the project.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from typing import Any

log = logging.getLogger("runbook.http")

#: seconds since the epoch fit in 12 digits until the year 33658
MAX_TIMESTAMP_DIGITS = 12
#: no payload of ours nests deeper than a few levels
MAX_DEPTH = 32
#: seconds a client has to send a complete request head (request line and headers)
HEADER_TIMEOUT = 10.0
#: seconds a client has to send the whole body, counted from the request head
BODY_TIMEOUT = 30.0
#: idle seconds a kept-alive connection stays open between requests
KEEP_ALIVE_TIMEOUT = 5
#: bytes of an incomplete request head the parser keeps before refusing it
MAX_HEAD_BYTES = 64 * 1024

_UNIX_SECONDS = re.compile(rf"[0-9]{{1,{MAX_TIMESTAMP_DIGITS}}}")


class Rejected(Exception):
    """A request refused before it reached the work; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str, *, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


# -- headers -----------------------------------------------------------------------------


def parse_timestamp(value: str | None, header: str) -> int:
    """A Unix timestamp in seconds from ``header``, or ``Rejected(401)`` saying what is wrong.

    Only ASCII digits, at most ``MAX_TIMESTAMP_DIGITS`` of them, are read: ``1_0``, other
    scripts' digits, signs and hundreds of digits are refused before ``int`` sees them.
    """
    if not value:
        raise Rejected(401, f"missing {header} header")
    text = value.strip()
    if not _UNIX_SECONDS.fullmatch(text):
        raise Rejected(
            401,
            f"{header} is not a Unix timestamp in seconds (up to {MAX_TIMESTAMP_DIGITS} digits)",
        )
    return int(text)


def check_window(stamp: int, header: str, window: float, now: float | None = None) -> None:
    """``Rejected(403)`` unless ``stamp`` is within ``window`` seconds of now, either way."""
    now = time.time() if now is None else now
    if abs(now - stamp) > window:
        raise Rejected(
            403, f"{header} is {now - stamp:+.0f}s from now, outside the {window:g}s replay window"
        )


def check_content_type(value: str | None, accepted: tuple[str, ...]) -> None:
    """The body's media type is one of ``accepted`` (or ``*/*+json`` for JSON), UTF-8."""
    media, _, params = (value or "").partition(";")
    media = media.strip().lower()
    ok = media in accepted or ("application/json" in accepted and media.endswith("+json"))
    if not ok:
        raise Rejected(
            415,
            f"Content-Type {media[:80] or '(none)'!r} is not accepted here; send "
            + " or ".join(accepted),
        )
    for param in params.split(";"):
        name, _, arg = param.partition("=")
        if name.strip().lower() == "charset":
            charset = arg.strip().strip('"').lower()
            if charset not in ("utf-8", "utf8"):
                raise Rejected(415, f"charset {charset[:40]!r} is not accepted here; send UTF-8")


# -- body --------------------------------------------------------------------------------


class BodyTimeout(Exception):
    """The client did not send the whole body within the body deadline."""


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a Starlette ``request``: 413 past ``limit`` bytes, 408 past the deadline."""
    declared = request.headers.get("content-length")
    if declared is not None:
        text = declared.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 15:
            raise Rejected(400, "Content-Length: not a number", field="Content-Length")
        if int(text) > limit:
            raise Rejected(413, f"body of {int(text)} bytes exceeds the {limit}-byte limit")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Rejected(413, f"body exceeds the {limit}-byte limit")
    except BodyTimeout:
        raise Rejected(408, "the body did not arrive in time") from None
    return bytes(body)


def load_json(body: bytes | str, where: str = "body", want: type | None = None) -> Any:
    """JSON as RFC 8259 exchanges it, or ``Rejected(400)`` naming what is wrong.

    UTF-8, finite numbers, strings encodable as UTF-8, integers of at most 64 bits, nested at
    most ``MAX_DEPTH`` levels; ``want`` (``dict`` or ``list``) is the top-level type required.
    """
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected(400, f"{where}: not UTF-8 (byte {e.start})", field=where) from None

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number JSON allows")

    def finite(text: str) -> float:
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(f"{text[:20]} is out of range for a number")
        return number

    def bounded_int(text: str) -> int:
        if len(text.lstrip("-")) > 20:
            raise ValueError("an integer is out of range (more than 64 bits)")
        return int(text)

    try:
        data = json.loads(
            body, parse_constant=refuse_constant, parse_float=finite, parse_int=bounded_int
        )
    except RecursionError:  # the parser's own guard: far deeper than MAX_DEPTH
        deep = f"{where}: nested deeper than {MAX_DEPTH} levels"
        raise Rejected(400, deep, field=where) from None
    except ValueError as e:
        raise Rejected(400, f"{where}: not valid JSON ({str(e)[:200]})", field=where) from None
    _check_values(data, where)
    if want is not None and not isinstance(data, want):
        kind = "a JSON object" if want is dict else f"JSON {want.__name__}"
        raise Rejected(400, f"{where}: expected {kind}, got {type(data).__name__}", field=where)
    return data


def _check_values(data: Any, where: str) -> None:
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise Rejected(400, f"{where}: nested deeper than {MAX_DEPTH} levels", field=where)
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key, where)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
            raise Rejected(400, f"{where}: an integer is out of range (more than 64 bits)")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Rejected(
            400,
            f"{where}: a string holds a lone surrogate (U+{ord(text[e.start]):04X}), not text",
            field=where,
        ) from None


# -- answers -----------------------------------------------------------------------------


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def internal_error(what: str, error: BaseException, logger: logging.Logger = log) -> dict:
    """Log ``error`` with a fresh id; return an answer body that names nothing internal."""
    error_id = new_error_id()
    logger.error("%s (error id %s)", what, error_id, exc_info=error)
    return {"error": f"{what}; the server log has the details", "error_id": error_id}


# -- connections -------------------------------------------------------------------------


class BodyDeadline:
    """ASGI middleware: a request's body must arrive within ``seconds`` of its head.

    ``receive`` raises ``BodyTimeout`` past the deadline (``read_body`` answers 408); the
    deadline ends when the last body chunk arrived, so waiting for a disconnect afterwards
    is not cut short. An app that lets ``BodyTimeout`` out gets a 408 answer here.
    """

    def __init__(self, app: Any, seconds: float = BODY_TIMEOUT):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False
        started = False

        async def guarded_receive() -> dict:
            nonlocal body_done
            if body_done:
                return await receive()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BodyTimeout
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                raise BodyTimeout from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except BodyTimeout:
            if started:
                raise
            body = json.dumps({"error": "the body did not arrive in time"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 408,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})


#: open connections at most; the next one is answered 503 and closed
MAX_CONNECTIONS = 1000

_REFUSED = (
    b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
)
_PROTOCOLS: dict[tuple[float, float, int], type] = {}


def guarded_protocol(
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> type:
    """uvicorn's h11 protocol with a header-read timeout, a body-read timeout and a cap on
    open connections (uvicorn's ``http=`` takes the class).

    uvicorn 0.5x has no header-read timeout: its keep-alive timer is armed only after a
    response, so a connection that sends half a request line and stops stays open for good
    (measured: 1,500 half-sent requests all still open after 30 s), and
    ``limit_concurrency`` answers 503 only once a whole request has arrived. Per connection:

    - ``header_timeout``: the request line and headers must arrive within it, from the
      connection's start or from the end of the previous response (keep-alive); else 408
      and closed;
    - ``body_timeout``: the body must arrive within it once the headers are in; else the
      connection is closed (the app sees a disconnect);
    - ``max_connections``: a connection beyond it gets a 503 and is closed at once.

    uvicorn and h11 are imported here, when a server is built, never by a light command.
    """
    key = (header_timeout, body_timeout, max_connections)
    if key not in _PROTOCOLS:
        _PROTOCOLS[key] = _make_protocol(*key)
    return _PROTOCOLS[key]


def _make_protocol(header_timeout: float, body_timeout: float, max_connections: int) -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def answer(status: int, reason: bytes, text: bytes) -> bytes:
        return _REFUSED % (status, reason, len(text), text)

    class GuardedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None
        _timed_state: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(answer(503, b"Service Unavailable", b"too many connections\n"))
                transport.close()
                return
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def _watch(self) -> None:
            """Arm the timer for what the client owes now: headers, a body, or nothing."""
            if self.transport is None or self.transport.is_closing():
                self._cancel()
                return
            state = self.conn.their_state
            if state is self._timed_state and self._read_timer is not None:
                return  # still owing the same thing: the deadline stands
            self._cancel()
            if state is h11.IDLE and self.timeout_keep_alive_task is None:
                # a new request is due (no keep-alive timer waiting for one): headers in time
                self._arm(state, header_timeout)
            elif state is h11.SEND_BODY:
                self._arm(state, body_timeout)

        def _arm(self, state: Any, seconds: float) -> None:
            self._timed_state = state
            self._read_timer = self.loop.call_later(seconds, self._expired, state)

        def _cancel(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer, self._timed_state = None, None

        def _expired(self, state: Any) -> None:
            self._read_timer, self._timed_state = None, None
            if self.transport.is_closing() or self.conn.their_state is not state:
                return
            if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(answer(408, b"Request Timeout", b"request headers too slow\n"))
            elif self.cycle is not None:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.logger.info("Closed a connection that sent its request too slowly")
            self.transport.close()

    return GuardedH11Protocol


def server_settings(
    *,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` that bound what a client
    holds: the guarded protocol, a keep-alive timeout, a cap on incomplete request heads."""
    return {
        "http": guarded_protocol(header_timeout, body_timeout, max_connections),
        "timeout_keep_alive": KEEP_ALIVE_TIMEOUT,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "server_header": False,
    }


def serve_config(
    app: Any,
    *,
    host: str,
    port: int,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    **options: Any,
) -> Any:
    """uvicorn's ``Config`` for ``app`` with ``server_settings``."""
    import uvicorn

    limits = server_settings(
        header_timeout=header_timeout, body_timeout=body_timeout, max_connections=max_connections
    )
    return uvicorn.Config(app, host=host, port=port, **{**limits, **options})


__all__ = [
    "BODY_TIMEOUT",
    "HEADER_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_DEPTH",
    "BodyDeadline",
    "BodyTimeout",
    "Rejected",
    "check_content_type",
    "check_window",
    "guarded_protocol",
    "internal_error",
    "load_json",
    "parse_timestamp",
    "read_body",
    "serve_config",
    "server_settings",
]
