"""A Slack Web API of our own on 127.0.0.1: checks the bot token, records what was sent.

Speaks the methods the project uses (chat.postMessage, chat.update, chat.postEphemeral)
the way slack-sdk's WebClient calls them: POST /api/<method>, a Bearer token, a JSON or
form body; answers ``{"ok": false, "error": "invalid_auth"}`` to a wrong token, as Slack does.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

METHODS = {"chat.postMessage", "chat.update", "chat.postEphemeral", "auth.test"}


class FakeSlack:
    def __init__(self, token: str = "xoxb-test-token"):
        self.token = token
        self.calls: list[dict] = []
        self.refused: list[dict] = []
        self._lock = threading.Lock()
        self._ts = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]  # type: ignore[union-attr]
        return f"http://{host}:{port}/api/"

    def __enter__(self) -> FakeSlack:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                method = self.path.rsplit("/", 1)[-1]
                if "json" in (self.headers.get("Content-Type") or ""):
                    args = json.loads(raw or b"{}")
                else:
                    args = dict(parse_qsl(raw.decode()))
                    for key in ("blocks", "attachments"):
                        if isinstance(args.get(key), str):
                            args[key] = json.loads(args[key])
                self._answer(fake.handle(method, self.headers.get("Authorization"), args))

            def _answer(self, body: dict):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def handle(self, method: str, authorization: str | None, args: dict) -> dict:
        if authorization != f"Bearer {self.token}":
            with self._lock:
                self.refused.append({"method": method, "args": args})
            return {"ok": False, "error": "invalid_auth"}
        if method not in METHODS:
            return {"ok": False, "error": "unknown_method"}
        with self._lock:
            ts = f"{1_700_000_000 + next(self._ts)}.000100"
            if method == "chat.postMessage":
                args = {**args, "ts": ts}  # what Slack would answer, kept with the message
            self.calls.append({"method": method, "args": args})
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": ts}
        if method == "chat.update":
            return {"ok": True, "channel": args.get("channel"), "ts": args.get("ts")}
        return {"ok": True, "channel": args.get("channel"), "ts": ts, "message": args}

    def sent(self, method: str) -> list[dict]:
        with self._lock:
            return [c["args"] for c in self.calls if c["method"] == method]

    def wait_for(self, method: str, predicate=lambda args: True, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for args in self.sent(method):
                if predicate(args):
                    return args
            time.sleep(0.05)
        raise AssertionError(f"no {method} matching the test arrived within {timeout}s")
