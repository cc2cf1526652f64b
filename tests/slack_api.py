"""A Slack Web API of our own on 127.0.0.1 that can fail on demand.

Speaks what the notifiers use, the way slack-sdk's WebClient calls it (POST /api/<method>,
a Bearer token, a JSON or form body): chat.postMessage (with thread_ts and metadata),
chat.update, conversations.history and conversations.replies (metadata only with
``include_all_metadata``), auth.test. Channels are known by name (``#ml``) and by id.

Faults, each for the next request(s) to chosen methods:
``fail_next(n, status)`` answers HTTP 5xx; ``rate_limit_next(n, retry_after)`` answers 429
with Retry-After; ``hold()`` carries a post out and then keeps the answer back until
``release()`` (the client times out after Slack posted); ``down()``/``up()`` close and
reopen the port (connection refused meanwhile).
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

POST = "chat.postMessage"


@dataclass
class Fault:
    methods: tuple[str, ...]
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    at: float  # time.monotonic() when it arrived
    status: int = 200


class SlackAPI:
    def __init__(self, token: str = "xoxb-test-token") -> None:
        self.token = token
        self.calls: list[Call] = []
        self.messages: dict[str, list[dict[str, Any]]] = {}  # channel id -> messages, in order
        self._names: dict[str, str] = {}
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._last_us = 0
        self._holding: tuple[str, ...] = ()
        self._release = threading.Event()
        self.held = threading.Event()  # set once a held request has been carried out
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api/"

    def __enter__(self) -> SlackAPI:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.down()

    def up(self) -> None:
        """Listen (again, on the same port after ``down()``)."""
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), _handler(self))
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def down(self) -> None:
        """Close the port: clients get connection refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)

    # -- faults --------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503, methods: tuple[str, ...] = (POST,)) -> None:
        body = b"<html>upstream unavailable</html>"
        with self._lock:
            self._faults += [Fault(methods, status, {"Content-Type": "text/html"}, body)] * n

    def rate_limit_next(
        self, n: int = 1, retry_after: int = 1, methods: tuple[str, ...] = (POST,)
    ) -> None:
        body = json.dumps({"ok": False, "error": "ratelimited"}).encode()
        headers = {"Retry-After": str(retry_after), "Content-Type": "application/json"}
        with self._lock:
            self._faults += [Fault(methods, 429, headers, body)] * n

    def hold(self, methods: tuple[str, ...] = (POST,)) -> None:
        """Carry requests out, then keep their answers back until ``release()``."""
        self._release.clear()
        self.held.clear()
        self._holding = methods

    def release(self) -> None:
        self._holding = ()
        self._release.set()

    # -- what arrived --------------------------------------------------------------------

    def channel_id(self, name_or_id: str) -> str:
        with self._lock:
            return self._cid(name_or_id)

    def posted(self, channel: str) -> list[dict[str, Any]]:
        """Messages in ``channel`` (name or id), oldest first."""
        with self._lock:
            return list(self.messages.get(self._cid(channel), []))

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    # -- the Web API ---------------------------------------------------------------------

    def answer(self, method: str, authorization: str | None, args: dict) -> tuple[int, dict, bytes]:
        """(status, headers, body) for one request."""
        with self._lock:
            call = Call(method, args, time.monotonic())
            self.calls.append(call)
            fault = next((f for f in self._faults if method in f.methods), None)
            if fault is not None:
                self._faults.remove(fault)
                call.status = fault.status
                return fault.status, fault.headers, fault.body
            if authorization != f"Bearer {self.token}":
                return _json({"ok": False, "error": "invalid_auth"})
            handler = getattr(self, "_" + method.replace(".", "_"), None)
            if handler is None:
                return _json({"ok": False, "error": "unknown_method"})
            return _json(handler(args))

    def _cid(self, name_or_id: str) -> str:
        if not name_or_id.startswith("#"):
            return name_or_id
        return self._names.setdefault(name_or_id, f"C{zlib.crc32(name_or_id.encode()):08X}")

    def _auth_test(self, args: dict) -> dict:
        return {"ok": True, "user_id": "U0BOT", "team_id": "T0TEAM"}

    def _chat_postMessage(self, args: dict) -> dict:
        channel = self._cid(args.get("channel") or "")
        if not args.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        history = self.messages.setdefault(channel, [])
        thread = args.get("thread_ts")
        if thread and not any(m["ts"] == thread and not m.get("thread_ts") for m in history):
            return {"ok": False, "error": "thread_not_found"}  # stricter than Slack: roots only
        ts = self._next_ts()
        message = {
            "type": "message",
            "ts": ts,
            "text": args.get("text", ""),
            "blocks": _maybe_json(args.get("blocks")) or [],
            "thread_ts": thread,
            "metadata": _maybe_json(args.get("metadata")),
        }
        history.append(message)
        return {"ok": True, "channel": channel, "ts": ts, "message": message}

    def _next_ts(self) -> str:
        """Slack's ts: the posting time in microseconds, unique in the workspace."""
        self._last_us = max(int(time.time() * 1e6), self._last_us + 1)
        return f"{self._last_us // 1_000_000}.{self._last_us % 1_000_000:06d}"

    def _chat_postEphemeral(self, args: dict) -> dict:
        if not args.get("user"):
            return {"ok": False, "error": "user_not_in_channel"}
        return {"ok": True, "message_ts": self._next_ts()}

    def _chat_update(self, args: dict) -> dict:
        channel = self._cid(args.get("channel") or "")
        for m in self.messages.get(channel, []):
            if m["ts"] == args.get("ts"):
                m["text"] = args.get("text", m["text"])
                m["blocks"] = _maybe_json(args.get("blocks")) or m["blocks"]
                return {"ok": True, "channel": channel, "ts": m["ts"]}
        return {"ok": False, "error": "message_not_found"}

    def _conversations_history(self, args: dict) -> dict:
        channel = args.get("channel") or ""
        if channel not in self.messages and self._cid(channel) not in self.messages:
            return {"ok": False, "error": "channel_not_found"}
        oldest = float(args.get("oldest") or 0)
        roots = [
            m
            for m in self.messages[self._cid(channel)]
            if not m.get("thread_ts") and float(m["ts"]) > oldest
        ]
        return self._page(list(reversed(roots)), args)

    def _conversations_replies(self, args: dict) -> dict:
        history = self.messages.get(self._cid(args.get("channel") or ""))
        if history is None:
            return {"ok": False, "error": "channel_not_found"}
        root = args.get("ts")
        thread = [m for m in history if m["ts"] == root or m.get("thread_ts") == root]
        if not thread:
            return {"ok": False, "error": "thread_not_found"}
        return self._page(thread, args)

    def _page(self, messages: list[dict], args: dict) -> dict:
        start = int(args.get("cursor") or 0)
        limit = int(args.get("limit") or 100)
        page = messages[start : start + limit]
        if not _truthy(args.get("include_all_metadata")):
            page = [{k: v for k, v in m.items() if k != "metadata"} for m in page]
        more = start + limit < len(messages)
        return {
            "ok": True,
            "messages": page,
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }


def _json(body: dict) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(body).encode()


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def _truthy(value: Any) -> bool:
    return value in (True, 1, "1", "true", "True")


def _handler(api: SlackAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            parts = urlsplit(self.path)
            method = parts.path.rsplit("/", 1)[-1]
            args: dict[str, Any] = dict(parse_qsl(parts.query))
            if "json" in (self.headers.get("Content-Type") or ""):
                args.update(json.loads(raw or b"{}"))
            else:
                args.update(parse_qsl(raw.decode()))
            status, headers, body = api.answer(method, self.headers.get("Authorization"), args)
            if method in api._holding:
                api.held.set()
                api._release.wait(30)
            try:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up waiting: as with Slack, the post stands
                pass

        do_GET = do_POST

    return Handler
