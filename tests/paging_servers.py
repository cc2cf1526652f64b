"""Local servers of ours that speak PagerDuty's Events API v2 and Opsgenie's Alert API.

As documented by each: PagerDuty answers ``202 {"status": "success", "dedup_key": ...}``,
``400 {"status": "invalid event", "errors": [...]}`` for a bad event or routing key, and
``429`` when rate limited; a trigger with the dedup key of an open incident opens no second
one, a resolve closes it. Opsgenie wants ``Authorization: GenieKey <key>`` (else 401),
answers ``202 {"result": "Request will be processed", ...}``, ``422`` for an invalid
request, ``429`` when throttled; an alert with the alias of an open one only raises its
count, ``POST /v2/alerts/<alias>/close?identifierType=alias`` closes it. Both bind
127.0.0.1 on a free port; ``outage`` answers 503 and ``throttle`` 429 with Retry-After.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

PD_SEVERITIES = {"critical", "error", "warning", "info"}


class _Server:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.alerts: dict[str, dict[str, Any]] = {}  # key -> {"status", "count", "body"}
        self.outage = 0  # answer the next N requests 503
        self.throttle = 0  # answer the next N requests 429
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = None
                code, answer, headers = server.answer(self.path, dict(self.headers), body)
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, path, headers, body) -> tuple[int, dict, dict]:
        with self.lock:
            self.requests.append({"path": path, "headers": headers, "body": body})
            if self.outage:
                self.outage -= 1
                return 503, {"message": "service unavailable"}, {}
            if self.throttle:
                self.throttle -= 1
                return 429, {"message": "too many requests"}, {"Retry-After": "1"}
            return self.handle(path, headers, body)

    def handle(self, path, headers, body) -> tuple[int, dict, dict]:
        raise NotImplementedError

    def open_alerts(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {k: v for k, v in self.alerts.items() if v["status"] == "open"}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class FakePagerDuty(_Server):
    def __init__(self, routing_key: str = "R0UTINGKEY0123456789abcdef012345") -> None:
        super().__init__()
        self.routing_key = routing_key

    def handle(self, path, headers, body):
        if urlsplit(path).path != "/v2/enqueue":
            return 404, {"message": "not found"}, {}
        errors = []
        if not isinstance(body, dict):
            return 400, {"status": "invalid event", "message": "Event object is invalid",
                         "errors": ["Invalid JSON"]}, {}  # fmt: skip
        if body.get("routing_key") != self.routing_key:
            errors.append("Invalid routing key")
        action = body.get("event_action")
        if action not in ("trigger", "acknowledge", "resolve"):
            errors.append("'event_action' is invalid")
        key = body.get("dedup_key")
        if action == "trigger":
            payload = body.get("payload") or {}
            for name in ("summary", "source", "severity"):
                if not payload.get(name):
                    errors.append(f"'payload.{name}' is missing or blank")
            if payload.get("severity") and payload["severity"] not in PD_SEVERITIES:
                errors.append("'payload.severity' is invalid")
            if len(payload.get("summary") or "") > 1024:
                errors.append("'payload.summary' is too long")
        elif not key:
            errors.append("'dedup_key' is required for acknowledge and resolve")
        if errors:
            return 400, {"status": "invalid event", "message": "Event object is invalid",
                         "errors": errors}, {}  # fmt: skip
        key = key or uuid.uuid4().hex
        alert = self.alerts.get(key)
        if action == "trigger":
            if alert and alert["status"] == "open":
                alert["count"] += 1  # de-duplicated into the open incident
            else:
                self.alerts[key] = {"status": "open", "count": 1, "body": body}
        elif action == "resolve" and alert:
            alert["status"] = "resolved"
        return 202, {"status": "success", "message": "Event processed", "dedup_key": key}, {}


class FakeOpsgenie(_Server):
    def __init__(self, api_key: str = "0psgenie-key-0000-1111-2222") -> None:
        super().__init__()
        self.api_key = api_key

    def handle(self, path, headers, body):
        request_id = str(uuid.uuid4())
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        if auth != f"GenieKey {self.api_key}":
            return 401, {"message": "Could not authenticate", "took": 0.0,
                         "requestId": request_id}, {}  # fmt: skip
        parts = urlsplit(path)
        accepted = {"result": "Request will be processed", "took": 0.01, "requestId": request_id}
        if parts.path == "/v2/alerts":
            message = (body or {}).get("message")
            if not message or len(message) > 130:
                return 422, {"message": "Request body is not processable",
                             "errors": {"message": "required, at most 130 characters"},
                             "took": 0.0, "requestId": request_id}, {}  # fmt: skip
            alias = body.get("alias") or request_id
            alert = self.alerts.get(alias)
            if alert and alert["status"] == "open":
                alert["count"] += 1
            else:
                self.alerts[alias] = {"status": "open", "count": 1, "body": body}
            return 202, accepted, {}
        if parts.path.startswith("/v2/alerts/") and parts.path.endswith("/close"):
            identifier = unquote(parts.path[len("/v2/alerts/") : -len("/close")])
            kind = parse_qs(parts.query).get("identifierType", ["id"])[0]
            if kind == "alias" and identifier in self.alerts:
                self.alerts[identifier]["status"] = "closed"
            return 202, accepted, {}
        return 404, {"message": "not found", "took": 0.0, "requestId": request_id}, {}
