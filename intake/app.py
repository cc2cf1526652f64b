"""The receiver's ASGI app: one endpoint per monitoring source, Slack interactivity, metrics.

Every alert request goes the same way: cap the body, authenticate, parse and plan the whole
request (``intake.mapping.plan``), and only then start runs. Any refusal (400/401/403/404/
413) therefore starts nothing. Starting runs is ``run_deployment(..., timeout=0,
idempotency_key=...)``; if the Prefect server is unreachable the answer is 503 and a retry is
safe, because the keys make it return the runs already started. Repeats and further alerts
for a model whose run is open are answered from memory (``intake.incidents``).

Errors are mapped to answers in one place (``exception_handlers``): a ``Refused`` is
answered with its status and message; anything else is logged with its traceback and
answered 400 (the request could not be read) or 503 (the receiver could not act; retrying
is safe), never with a 500 or the exception's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blocks import http_guard
from intake import sources
from intake._auth import (
    check_authorization,
    check_signature,
    check_timestamp,
    hmac_sha256_hex,
    verify_slack,
)
from intake.errors import (
    BadRequest,
    Forbidden,
    NotEnabled,
    Refused,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
)
from intake.incidents import Incidents
from intake.launch import DeploymentLauncher, Launcher, api_url
from intake.mapping import RunbookIndex, plan
from intake.metrics import IntakeMetrics
from intake.settings import IntakeSettings
from intake.slack import SlackReplies, decide, parse_click
from intake.sns import SnsEnvelope, SnsVerifier, check_sns_age
from intake.spool import Spool
from rollback_runbook.settings import state_dir
from rollback_runbook.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER

log = logging.getLogger("intake")

GENERIC_SIGNATURE = SIGNATURE_HEADER
GENERIC_TIMESTAMP = TIMESTAMP_HEADER

JSON = ("application/json",)
FORM = ("application/x-www-form-urlencoded",)
SNS_TYPES = ("text/plain", "application/json")  # SNS sends text/plain; charset=UTF-8


class TimedOut(Refused):
    """The client did not send the whole body within the body deadline."""

    status = 408
    outcome = "timed_out"


#: an absolute path in an error text (shown by /healthz as its last part only)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/])/(?:[^\s'\"/:,]+/)+([^\s'\"/:,]*)")


def without_paths(text: str, limit: int = 300) -> str:
    """``text`` with every absolute path cut to its file name, at most ``limit`` characters."""
    short = _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "/", text)
    return short if len(short) <= limit else short[: limit - 1] + "…"


def check_content_type(value: str | None, accepted: tuple[str, ...]) -> None:
    """The body's media type is one of ``accepted`` (or ``*/*+json`` for JSON), UTF-8
    (``blocks.http_guard``, shared with the model server)."""
    try:
        http_guard.check_content_type(value, accepted)
    except http_guard.Rejected as e:
        raise UnsupportedMediaType(e.message) from None


def unexpected(source: str, error: Exception) -> Refused:
    """The answer to an exception no check anticipated: logged in full, answered plainly.

    Errors of reading the input (values, encodings, nesting) are the request's fault: 400.
    Anything else is the receiver's: 503, which a sender retries (the idempotency keys make a
    retry safe). The answer never carries the exception's text.
    """
    log.error("%s request failed unexpectedly", source, exc_info=error)
    if isinstance(error, ValueError | TypeError | KeyError | IndexError | RecursionError):
        refusal: Refused = BadRequest("body", "the request could not be processed")
    else:
        refusal = Unavailable("the receiver could not process the request; retrying is safe")
    return refusal


async def answer_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    level = logging.ERROR if exc.status >= 500 else logging.WARNING
    source = getattr(request.state, "source", request.url.path)
    log.log(level, "%s request refused (%d): %s", source, exc.status, exc.message[:500])
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def last_resort(request: Request, exc: Exception) -> Response:
    """For errors outside the endpoints' own handling; never shows the exception."""
    log.error("%s failed unexpectedly", request.url.path, exc_info=exc)
    return JSONResponse({"error": "the receiver failed; retrying is safe"}, status_code=503)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) exceeds ``limit``,
    408 when it does not arrive within the body deadline (``blocks.http_guard``)."""
    try:
        return await http_guard.read_body(request, limit)
    except http_guard.Rejected as e:
        if e.status == 413:
            raise TooLarge(e.message) from None
        if e.status == 408:
            raise TimedOut(e.message) from None
        raise BadRequest(e.field or "body", e.message.removeprefix("Content-Length: ")) from None


class Intake:
    """The receiver's parts: settings, runbooks, launcher, SNS verifier, Slack replies."""

    def __init__(
        self,
        settings: IntakeSettings,
        launcher: Launcher,
        replies: SlackReplies | None = None,
    ):
        self.settings = settings
        self.index = RunbookIndex(settings.runbooks_dir, settings.runbooks_rescan_seconds)
        self.launcher = launcher
        self.metrics = IntakeMetrics()
        self.sns = SnsVerifier(settings.sns_ca_bundle, settings.sns_connect_to)
        self.replies = replies or SlackReplies()
        self._incidents: tuple[asyncio.AbstractEventLoop, Incidents] | None = None
        self.spool = Spool(state_dir() / "intake-spool") if settings.spool else None

    @property
    def incidents(self) -> Incidents:
        """The memory of started runs, one per event loop (its futures belong to a loop)."""
        loop = asyncio.get_running_loop()
        if self._incidents is None or self._incidents[0] is not loop:
            s = self.settings
            memory = Incidents(
                self.launcher,
                memory_seconds=s.memory_seconds,
                memory_size=s.memory_size,
                max_concurrent_starts=s.max_concurrent_starts,
                recheck_seconds=s.finished_recheck_seconds,
                join_wait_seconds=s.join_wait_seconds,
                spool=self.spool,
                answer_within=s.answer_within_seconds,
                storm_size=s.storm_size,
            )
            self._incidents = (loop, memory)
        return self._incidents[1]

    # -- shared path -----------------------------------------------------------------------

    async def handle(
        self,
        source: str,
        request: Request,
        work: Callable[[Request], Awaitable[Response]],
    ) -> Response:
        """Run ``work``; count and time the request; turn the unexpected into a refusal."""
        request.state.source = source
        started = time.perf_counter()
        outcome = "accepted"
        try:
            return await work(request)
        except Refused as e:
            outcome = e.outcome
            raise
        except Exception as e:
            refusal = unexpected(source, e)
            outcome = refusal.outcome
            raise refusal from None
        finally:
            self.metrics.requests.labels(source, outcome).inc()
            self.metrics.seconds.labels(source).observe(time.perf_counter() - started)

    async def start_runs(self, source: str, alerts: list[sources.Alert]) -> Response:
        """Plan the whole request, then start, find or attach one run per model."""
        planned, notes = plan(alerts, self.index.books())
        outcomes = await self.incidents.submit(planned)
        of = {id(o.planned): o for o in outcomes}
        body_alerts = []
        for note in notes:
            entry = note.as_json()
            if note.planned is not None:
                done = of[id(note.planned)]
                entry["flow_run_id"] = done.started.flow_run_id
                if note.outcome == "started":
                    note.outcome = entry["outcome"] = done.outcome
            body_alerts.append(entry)
            self.metrics.alerts.labels(source, note.outcome).inc()
            if note.outcome not in ("started", "grouped", "resolved", "duplicate", "attached"):
                log.warning(
                    "%s %s (%s): %s", source, note.alert.where, note.outcome, note.reason[:300]
                )
        return JSONResponse(
            {"runs": [o.as_json() for o in outcomes], "alerts": body_alerts}, status_code=202
        )

    # -- sources ---------------------------------------------------------------------------

    async def alertmanager(self, request: Request) -> Response:
        s = self.settings
        if s.alertmanager_token is None and not (
            s.alertmanager_username and s.alertmanager_password
        ):
            raise NotEnabled(
                "alertmanager intake is off: set RUNBOOK_INTAKE_ALERTMANAGER_TOKEN (bearer) "
                "or RUNBOOK_INTAKE_ALERTMANAGER_USERNAME/_PASSWORD (basic)"
            )
        check_authorization(
            request.headers.get("authorization"),
            realm="alertmanager",
            token=s.alertmanager_token,
            username=s.alertmanager_username,
            password=s.alertmanager_password,
        )
        check_content_type(request.headers.get("content-type"), JSON)
        body = await read_body(request, s.max_body_bytes)
        return await self.start_runs("alertmanager", sources.alertmanager(sources.load_json(body)))

    async def grafana(self, request: Request) -> Response:
        s = self.settings
        if s.grafana_token is None and s.grafana_hmac_secret is None:
            raise NotEnabled(
                "grafana intake is off: set RUNBOOK_INTAKE_GRAFANA_TOKEN (bearer) or "
                "RUNBOOK_INTAKE_GRAFANA_HMAC_SECRET (signature)"
            )
        signature = request.headers.get(s.grafana_signature_header)
        use_hmac = s.grafana_hmac_secret is not None and (
            signature is not None or s.grafana_token is None
        )
        if not use_hmac:
            check_authorization(
                request.headers.get("authorization"), realm="grafana", token=s.grafana_token
            )
        body = await read_body(request, s.max_body_bytes)
        if use_hmac:
            secret = s.grafana_hmac_secret
            if s.grafana_timestamp_header:
                ts = check_timestamp(
                    request.headers.get(s.grafana_timestamp_header),
                    s.grafana_timestamp_header,
                    s.replay_window,
                )
                expected = hmac_sha256_hex(secret, ts.encode(), b":", body)  # type: ignore[arg-type]
            else:
                expected = hmac_sha256_hex(secret, body)  # type: ignore[arg-type]
            check_signature(expected, signature, s.grafana_signature_header)
        check_content_type(request.headers.get("content-type"), JSON)
        return await self.start_runs("grafana", sources.grafana(sources.load_json(body)))

    async def generic(self, request: Request) -> Response:
        s = self.settings
        if s.generic_secret is None:
            raise NotEnabled("generic intake is off: set RUNBOOK_INTAKE_GENERIC_SECRET")
        if not request.headers.get(GENERIC_SIGNATURE):
            raise Unauthenticated(f"missing {GENERIC_SIGNATURE} header")
        ts = check_timestamp(
            request.headers.get(GENERIC_TIMESTAMP), GENERIC_TIMESTAMP, s.replay_window
        )
        body = await read_body(request, s.max_body_bytes)
        expected = hmac_sha256_hex(s.generic_secret, ts.encode(), b".", body)
        check_signature(expected, request.headers.get(GENERIC_SIGNATURE), GENERIC_SIGNATURE)
        check_content_type(request.headers.get("content-type"), JSON)
        return await self.start_runs("generic", sources.generic(sources.load_json(body)))

    async def cloudwatch(self, request: Request) -> Response:
        s = self.settings
        if not s.sns_topics:
            raise NotEnabled("SNS intake is off: set RUNBOOK_INTAKE_SNS_TOPICS (TopicArn list)")
        check_content_type(request.headers.get("content-type"), SNS_TYPES)
        body = await read_body(request, s.max_body_bytes)
        envelope = sources.validate(SnsEnvelope, sources.load_json(body))
        declared = request.headers.get("x-amz-sns-message-type")
        if declared is not None and declared != envelope.Type:
            raise BadRequest(
                "x-amz-sns-message-type", f"says {declared}, the body says {envelope.Type}"
            )
        if envelope.TopicArn not in s.sns_topics:
            raise Forbidden(
                f"TopicArn {envelope.TopicArn[:200]} is not accepted here", field="TopicArn"
            )
        check_sns_age(envelope.Timestamp, s.sns_max_age, s.replay_window)
        await self.sns.verify(envelope)
        if envelope.Type == "SubscriptionConfirmation":
            await self.sns.confirm(envelope)
            log.info("Confirmed the SNS subscription to %s", envelope.TopicArn)
            return JSONResponse({"confirmed": envelope.TopicArn}, status_code=200)
        if envelope.Type == "UnsubscribeConfirmation":
            log.warning("SNS topic %s unsubscribed this receiver", envelope.TopicArn)
            return JSONResponse({"ok": True}, status_code=200)
        return await self.start_runs("cloudwatch", sources.cloudwatch(envelope.Message))

    # -- Slack -----------------------------------------------------------------------------

    async def slack(self, request: Request) -> Response:
        s = self.settings
        if s.slack_signing_secret is None:
            raise NotEnabled("Slack interactivity is off: set SLACK_SIGNING_SECRET")
        check_content_type(request.headers.get("content-type"), FORM)
        body = await read_body(request, min(s.max_body_bytes, 256 * 1024))
        verify_slack(
            s.slack_signing_secret,
            request.headers.get("x-slack-request-timestamp"),
            request.headers.get("x-slack-signature"),
            body,
            window=300.0,
        )
        click = parse_click(body)
        if click is None:
            return JSONResponse({"ok": True, "ignored": "not a rollback approval action"})
        answer = await decide(click, self.index)
        self.metrics.clicks.labels(answer.outcome).inc()
        return JSONResponse(
            answer.as_json(), background=BackgroundTask(self.replies.after, click, answer)
        )


def create_app(
    settings: IntakeSettings | None = None,
    *,
    launcher: Launcher | None = None,
    replies: SlackReplies | None = None,
) -> Starlette:
    """The receiver; settings default to the environment, runs to ``run_deployment``."""
    settings = settings or IntakeSettings.from_env()
    if launcher is None and not api_url():
        log.error(
            "PREFECT_API_URL is not set: alerts and Slack clicks will be answered 503 until "
            "the receiver is restarted with it pointing at the Prefect server"
        )
    intake = Intake(
        settings,
        launcher or DeploymentLauncher(settings.deployment, settings.storm_deployment),
        replies,
    )

    def endpoint(source: str, work):
        async def route(request: Request) -> Response:
            return await intake.handle(source, request, work)

        return route

    real_launcher = launcher is None  # test doubles start nothing and need no server

    async def healthz(request: Request) -> Response:
        """Unauthenticated: what an operator's probe needs, no more (a broken runbook's
        reason without the machine's paths; the full error is in the receiver's log)."""
        books = intake.index.books()
        errors = {name: without_paths(text) for name, text in intake.index.errors.items()}
        if real_launcher and not api_url():
            return JSONResponse(
                {
                    "ok": False,
                    "status": "no_prefect_server",
                    "error": "PREFECT_API_URL is not set: every alert is answered 503 until "
                    "the receiver is restarted with it",
                    "runbooks": sorted(books),
                    "runbook_errors": errors,
                },
                status_code=503,
            )
        return JSONResponse(
            {
                "ok": True,
                "status": "degraded" if errors else "ok",
                "runbooks": sorted(books),
                "runbook_errors": errors,
            }
        )

    async def metrics(request: Request) -> Response:
        intake.metrics.starts_pending.set(intake.incidents.pending)
        return Response(intake.metrics.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await intake.launcher.open()
        books = intake.index.books()  # read the runbooks now, not during the first alert
        if intake.spool is not None:  # alerts answered by a receiver that died before their
            # runs existed: started now (the idempotency keys keep them one run each)
            pending = intake.spool.pending(books)
            keep = frozenset(item.key for item in pending)  # spooled: started as their storm
            storms = intake.spool.storms(settings.memory_seconds, keep)
            await intake.incidents.resume(pending, storms)
        try:
            yield
        finally:
            await intake.launcher.close()

    app = Starlette(
        lifespan=lifespan,
        middleware=[Middleware(http_guard.BodyDeadline)],  # a body must arrive within 30 s
        exception_handlers={Refused: answer_refusal, Exception: last_resort},
        routes=[
            Route(
                "/alerts/alertmanager",
                endpoint("alertmanager", intake.alertmanager),
                methods=["POST"],
            ),
            Route("/alerts/grafana", endpoint("grafana", intake.grafana), methods=["POST"]),
            Route(
                "/alerts/cloudwatch", endpoint("cloudwatch", intake.cloudwatch), methods=["POST"]
            ),
            Route("/alerts/generic", endpoint("generic", intake.generic), methods=["POST"]),
            Route("/slack/interactions", endpoint("slack", intake.slack), methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
    )
    app.state.intake = intake
    return app
