"""The receiver's ASGI app: one endpoint per monitoring source, Slack interactivity, metrics.

Every alert request goes the same way: cap the body, authenticate, parse and plan the whole
request (``intake.mapping.plan``), and only then start runs. Any refusal (400/401/403/404/
413) therefore starts nothing. Starting runs is ``run_deployment(..., timeout=0,
idempotency_key=...)``; if the Prefect server is unreachable the answer is 503 and a retry is
safe, because the keys make it return the runs already started.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from intake import sources
from intake._auth import (
    check_authorization,
    check_signature,
    check_timestamp,
    hmac_sha256_hex,
    verify_slack,
)
from intake.errors import BadRequest, Forbidden, NotEnabled, Refused, TooLarge, Unauthenticated
from intake.launch import DeploymentLauncher, Launcher, api_url
from intake.mapping import RunbookIndex, plan
from intake.metrics import IntakeMetrics
from intake.settings import IntakeSettings
from intake.slack import SlackReplies, decide, parse_click
from intake.sns import SnsEnvelope, SnsVerifier

log = logging.getLogger("intake")

GENERIC_SIGNATURE = "X-Rollback-Signature"
GENERIC_TIMESTAMP = "X-Rollback-Timestamp"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise TooLarge(f"body of {int(declared)} bytes exceeds the {limit}-byte limit")
        except ValueError:
            raise BadRequest("Content-Length", "not a number") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"body exceeds the {limit}-byte limit")
    return bytes(body)


class Intake:
    """The receiver's parts: settings, runbooks, launcher, SNS verifier, Slack replies."""

    def __init__(
        self,
        settings: IntakeSettings,
        launcher: Launcher,
        replies: SlackReplies | None = None,
    ):
        self.settings = settings
        self.index = RunbookIndex(settings.runbooks_dir)
        self.launcher = launcher
        self.metrics = IntakeMetrics()
        self.sns = SnsVerifier(settings.sns_ca_bundle, settings.sns_connect_to)
        self.replies = replies or SlackReplies()

    # -- shared path -----------------------------------------------------------------------

    async def handle(
        self,
        source: str,
        request: Request,
        work: Callable[[Request], Awaitable[Response]],
    ) -> Response:
        started = time.perf_counter()
        try:
            response = await work(request)
            self.metrics.requests.labels(source, "accepted").inc()
            return response
        except Refused as e:
            self.metrics.requests.labels(source, e.outcome).inc()
            level = logging.ERROR if e.status >= 500 else logging.WARNING
            log.log(level, "%s request refused (%d): %s", source, e.status, e.message)
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        finally:
            self.metrics.seconds.labels(source).observe(time.perf_counter() - started)

    async def start_runs(self, source: str, alerts: list[sources.Alert]) -> Response:
        planned, notes = plan(alerts, self.index.books())
        launched = await self.launcher.launch(planned)
        run_of = {id(s.planned): s.flow_run_id for s in launched}
        body_alerts = []
        for note in notes:
            entry = note.as_json()
            if note.planned is not None:
                entry["flow_run_id"] = run_of.get(id(note.planned))
            body_alerts.append(entry)
            self.metrics.alerts.labels(source, note.outcome).inc()
            if note.outcome not in ("started", "grouped", "resolved"):
                log.warning("%s %s (%s): %s", source, note.alert.where, note.outcome, note.reason)
        return JSONResponse(
            {"runs": [s.as_json() for s in launched], "alerts": body_alerts}, status_code=202
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
        return await self.start_runs("generic", sources.generic(sources.load_json(body)))

    async def cloudwatch(self, request: Request) -> Response:
        s = self.settings
        if not s.sns_topics:
            raise NotEnabled("SNS intake is off: set RUNBOOK_INTAKE_SNS_TOPICS (TopicArn list)")
        body = await read_body(request, s.max_body_bytes)
        envelope = sources.validate(SnsEnvelope, sources.load_json(body))
        declared = request.headers.get("x-amz-sns-message-type")
        if declared is not None and declared != envelope.Type:
            raise BadRequest(
                "x-amz-sns-message-type", f"says {declared}, the body says {envelope.Type}"
            )
        if envelope.TopicArn not in s.sns_topics:
            raise Forbidden(f"TopicArn {envelope.TopicArn} is not accepted here", field="TopicArn")
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
    intake = Intake(settings, launcher or DeploymentLauncher(settings.deployment), replies)

    def endpoint(source: str, work):
        async def route(request: Request) -> Response:
            return await intake.handle(source, request, work)

        return route

    async def healthz(request: Request) -> Response:
        books = intake.index.books()
        return JSONResponse(
            {"ok": True, "runbooks": sorted(books), "runbook_errors": intake.index.errors}
        )

    async def metrics(request: Request) -> Response:
        return Response(intake.metrics.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        opener = getattr(intake.launcher, "open", None)
        if opener is not None:
            await opener()
        try:
            yield
        finally:
            closer = getattr(intake.launcher, "close", None)
            if closer is not None:
                await closer()

    app = Starlette(
        lifespan=lifespan,
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
