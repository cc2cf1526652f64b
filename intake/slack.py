"""Approve or reject a paused rollback run from the Slack buttons the flow posted.

Slack waits 3 seconds for an answer, so the request does only the checks and the resume
(a few calls to the Prefect server); the message is updated after the answer is sent. The
checks mirror the flow's own (``check_decision``): the flow stays the authority and would
ignore a decision that does not count, but refusing here means a stray click has no side
effect at all. A click on an unknown, finished or expired run is answered to the clicker
only (an ephemeral message) and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qs
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from intake.errors import BadRequest
from intake.mapping import RunbookIndex
from intake.sources import load_json, validate
from rollback_runbook.escape import mrkdwn

log = logging.getLogger("intake")

APPROVE, REJECT = "rollback_approve", "rollback_reject"


@dataclass(frozen=True)
class Click:
    user: str
    user_name: str | None
    decision: str  # approve | reject
    flow_run_id: UUID
    model: str
    incident: str | None
    channel: str | None
    message_ts: str | None
    blocks: list[dict[str, Any]] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _User(_Strict):
    id: str = Field(min_length=1, max_length=64)
    username: str | None = None
    name: str | None = None


class _Action(_Strict):
    action_id: str | None = None
    value: str | None = None


class _Container(_Strict):
    channel_id: str | None = None
    message_ts: str | None = None


class _Channel(_Strict):
    id: str | None = None


class _Message(_Strict):
    ts: str | None = None
    blocks: list[dict[str, Any]] | None = None


class _BlockActions(_Strict):
    """The fields of Slack's ``block_actions`` payload that an approval click uses."""

    type: Literal["block_actions"]
    user: _User
    actions: list[_Action]
    container: _Container = Field(default_factory=_Container)
    channel: _Channel = Field(default_factory=_Channel)
    message: _Message = Field(default_factory=_Message)


class _ButtonValue(_Strict):
    """What the flow put in the button's ``value`` (see flows/steps/approval)."""

    flow_run_id: UUID = Field(strict=False)
    model: str = Field(min_length=1, max_length=200)
    incident: str | None = Field(default=None, max_length=200)


def parse_click(body: bytes) -> Click | None:
    """The approval click in a ``block_actions`` payload; None for any other interaction."""
    try:
        form = parse_qs(body.decode("utf-8"), strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("body", "not UTF-8 form data") from None
    if "payload" not in form:
        raise BadRequest("payload", "required form field is missing")
    payload = load_json(form["payload"][0], "payload")
    if not isinstance(payload, dict):
        raise BadRequest("payload", "expected a JSON object")
    if payload.get("type") != "block_actions":
        return None
    click = validate(_BlockActions, payload, "payload")
    action = next((a for a in click.actions if a.action_id in (APPROVE, REJECT)), None)
    if action is None:
        return None
    if not action.value:
        raise BadRequest("payload.actions[].value", "expected the JSON the flow posted")
    value = load_json(action.value, "payload.actions[].value")
    if not isinstance(value, dict):
        raise BadRequest("payload.actions[].value", "expected the JSON the flow posted")
    button = validate(_ButtonValue, value, "payload.actions[].value")
    return Click(
        user=click.user.id,
        user_name=click.user.username or click.user.name,
        decision="approve" if action.action_id == APPROVE else "reject",
        flow_run_id=button.flow_run_id,
        model=button.model,
        incident=button.incident,
        channel=click.container.channel_id or click.channel.id,
        message_ts=click.container.message_ts or click.message.ts,
        blocks=click.message.blocks,
    )


#: a whole Slack user id (``\Z``, not ``$``, which lets a trailing newline through)
_SLACK_ID_RE = re.compile(r"\A[UW][A-Z0-9]{1,30}\Z")


def mention(identity: str) -> str:
    """``<@U123>`` for a Slack user id; anything else (an e-mail) as escaped text."""
    return f"<@{identity}>" if _SLACK_ID_RE.fullmatch(identity) else mrkdwn(identity)


@dataclass
class Answer:
    ok: bool
    outcome: str  # approved | rejected | not_approver | requester | unknown_run | ...
    text: str
    role: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "outcome": self.outcome, "text": self.text}


def _requester(parameters: dict[str, Any]) -> str | None:
    trigger = parameters.get("trigger")
    if isinstance(trigger, dict) and trigger.get("requested_by"):
        return str(trigger["requested_by"])
    return parameters.get("requested_by") or None


def _runbook_param_matches(value: Any, model: str) -> bool:
    from pathlib import PurePath

    return isinstance(value, str) and model in (value, PurePath(value).stem)


async def decide(click: Click, index: RunbookIndex) -> Answer:
    """Check the click against the run and the runbook; resume the run if it counts."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from intake.launch import api_url

    book = index.get(click.model)
    if book is None:
        shown = mrkdwn(click.model, formatting=False).replace("`", "'")
        return Answer(False, "unknown_model", f"No runbook for model `{shown}`: ignored.")
    if not api_url():
        return Answer(False, "unavailable", "The receiver has no Prefect server (PREFECT_API_URL).")
    try:
        async with get_client() as client:
            try:
                run = await client.read_flow_run(click.flow_run_id)
            except ObjectNotFound:
                return Answer(
                    False,
                    "unknown_run",
                    f"Rollback run `{click.flow_run_id}` does not exist: ignored.",
                )
            # what the flow will see: a signed decision is channel slack, an unsigned one ui
            proof = _sign(click)
            refusal = _refusal(click, book, run, channel="slack" if proof else "ui")
            if refusal is None:
                refusal = await _incident_refusal(client, click, book, run)
            if refusal is not None:
                return refusal
            return await _resume(client, click, book.approval.role_of(click.user) or "", proof)
    except httpx.HTTPError as e:
        return Answer(False, "unavailable", f"Prefect is unreachable ({type(e).__name__}); retry.")


def _sign(click: Click) -> str:
    """The proof the receiver vouches for the click with (Slack's request signature was
    checked, so the user id is Slack's word); empty without an approval secret."""
    from rollback_runbook.approvals import sign_decision

    return sign_decision(str(click.flow_run_id), click.user, click.decision, "slack")


#: how a person decides through each channel, for a refusal that names the way that counts
_HOW = {"cli": "`runbook approve`", "ui": "the paused run's form in the Prefect UI"}


def _channel_refusal(click: Click, book, run, channel: str | None) -> Answer | None:
    """The flow's ``check_decision`` ignores a decision from a channel the run's environment
    does not accept (``approval_channels``): such a click is refused, the run left waiting."""
    from flows.config import RunbookError

    env = str(run.parameters.get("environment") or "production")
    try:
        accepted = book.environment(env).approval_channels
    except RunbookError:
        shown = mrkdwn(env, formatting=False).replace("`", "'")
        return Answer(
            False,
            "unknown_run",
            f"Run `{mrkdwn(run.name, formatting=False)}` is for environment `{shown}`, which "
            f"the runbook of {mrkdwn(click.model)} does not have: ignored.",
        )
    if not accepted:
        return None
    if channel is None:
        channel = "slack" if _sign(click) else "ui"
    if channel in accepted:
        return None
    ways = " or ".join(_HOW[c] for c in accepted if c in _HOW)
    why = (
        f"Slack decisions do not count in {mrkdwn(env)} for {mrkdwn(click.model)}"
        if channel == "slack"
        else f"this receiver has no approval secret (RUNBOOK_APPROVAL_SECRET), so a Slack "
        f"click would count as a decision via the Prefect UI, which {mrkdwn(env)} does not "
        f"accept for {mrkdwn(click.model)}"
    )
    return Answer(
        False,
        "channel_refused",
        f"{why} (this environment accepts {', '.join(accepted)}): decide with {ways}. "
        "Your click changed nothing; the run is still waiting.",
    )


def _refusal(click: Click, book, run, channel: str | None = None) -> Answer | None:
    """Why the click does not count, as the flow would judge it; None if it counts.

    ``channel`` is the one the flow will record for the click (``slack`` when the receiver
    signs it, else ``ui``); None: found out here."""
    if not _runbook_param_matches(run.parameters.get("runbook"), click.model):
        return Answer(
            False,
            "unknown_run",
            f"Run `{mrkdwn(run.name, formatting=False)}` is not a rollback of "
            f"`{mrkdwn(click.model, formatting=False)}`: ignored.",
        )
    state = run.state
    if state is None or not state.is_paused():
        name = state.name if state else "unknown"
        if state is not None and state.is_final():
            text = f"This rollback already finished ({name}); your click changed nothing."
            return Answer(False, "finished", text)
        text = (
            f"This rollback is no longer waiting for a decision ({name}): it was decided "
            "already or its approval timed out. Your click changed nothing."
        )
        return Answer(False, "not_waiting", text)
    expires = state.state_details.pause_timeout
    if expires is not None and expires <= datetime.now(UTC):
        return Answer(
            False,
            "expired",
            f"The approval window closed at {expires:%H:%M:%S} UTC; your click changed nothing.",
        )
    if (refused := _channel_refusal(click, book, run, channel)) is not None:
        return refused
    if book.approval.role_of(click.user) is None:
        return Answer(
            False,
            "not_approver",
            f"{mention(click.user)} is not an approver for {mrkdwn(click.model)}; ask one of: "
            + ", ".join(mention(i) for ids in book.approval.approvers.values() for i in ids),
        )
    if book.approval.two_person_rule and _requester(run.parameters) == click.user:
        return Answer(
            False,
            "requester",
            f"{mention(click.user)} asked for this rollback; under the two-person rule someone "
            "else must decide.",
        )
    return None


async def _incident_refusal(client, click: Click, book, run) -> Answer | None:
    """The button's incident must be this very run's: a button of one incident never
    resumes another's run. The run records its incident as a flow run input
    (``flows.steps.run_binding``); a run that did not is checked against the journal."""
    import json

    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    from flows.steps.run_binding import INCIDENT_INPUT_KEY

    shown = mrkdwn(click.incident or "none", formatting=False)
    if not click.incident:
        return Answer(
            False,
            "incident_mismatch",
            "This button names no incident, so it cannot be matched to its run: decide in "
            "the Prefect UI. Your click changed nothing.",
        )
    try:
        recorded = json.loads(await client.read_flow_run_input(run.id, INCIDENT_INPUT_KEY))
        why = "the run handles another incident" if recorded != click.incident else None
    except (ObjectNotFound, PrefectHTTPStatusError) as e:
        if isinstance(e, PrefectHTTPStatusError) and e.response.status_code != 404:
            raise
        why = await asyncio.to_thread(_journal_says, click, book, run)
    except ValueError:  # not JSON: not what the flow wrote
        why = "the run's record of its incident is unreadable"
    if why == "unavailable":
        return Answer(
            False,
            "unavailable",
            f"Could not read incident `{shown}` to check your click; retry.",
        )
    if why is not None:
        return Answer(
            False,
            "incident_mismatch",
            f"This button is for incident `{shown}`, but run `{click.flow_run_id}` is not "
            f"that incident's run ({why}): refused. Your click changed nothing.",
        )
    return None


def _journal_says(click: Click, book, run) -> str | None:
    """None if the journal says ``run`` opened the click's incident; else why not."""
    from blocks.registry import open_registry
    from flows.incident import fold

    env = run.parameters.get("environment") or "production"
    try:
        registry = open_registry(book.environment(str(env)).registry, book.model)
        state = fold(registry.incident_entries(click.incident)).get(click.incident)
    except Exception as e:  # a store that cannot answer: refuse, never resume unchecked
        log.warning("Could not read incident %s to check a click: %s", click.incident, e)
        return "unavailable"
    if state is None or not state.flow_run_id:
        return "no run opened that incident"
    if state.flow_run_id != str(click.flow_run_id):
        return "another run opened it"
    return None


async def _resume(client, click: Click, role: str, proof: str | None = None) -> Answer:
    """``resume_flow_run`` with its input; the client call, so that a lost race is seen.

    ``prefect.flow_runs.resume_flow_run`` reads the run and then resumes it; if someone
    else resumes in between, the server answers ABORT and the helper returns as if all
    went well. Calling the client directly lets us tell the clicker the truth.
    """
    from prefect.client.schemas.responses import SetStateStatus

    who = f"@{click.user_name}" if click.user_name else click.user
    result = await client.resume_flow_run(
        click.flow_run_id,
        run_input={
            "approver": click.user,
            "decision": click.decision,
            "comment": f"{click.decision} button in Slack by {who}",
            # Slack's request signature was checked: the receiver vouches for the user id
            "proof": _sign(click) if proof is None else proof,
        },
    )
    if result.status != SetStateStatus.ACCEPT:
        reason = getattr(result.details, "reason", None) or result.status.value
        if result.state is not None and result.state.is_failed():
            return Answer(
                False, "expired", "The approval window closed; your click changed nothing."
            )
        if result.status == SetStateStatus.ABORT:
            return Answer(
                False, "not_waiting", "Someone decided a moment ago; your click changed nothing."
            )
        return Answer(False, "refused", f"Prefect refused the decision: {reason}")
    verdict = "approved" if click.decision == "approve" else "rejected"
    log.info("Run %s %s by %s (%s) via Slack", click.flow_run_id, verdict, click.user, role)
    text = f"Rollback {verdict} by {mention(click.user)} ({mrkdwn(role)}) via Slack"
    return Answer(True, verdict, text, role)


def decided_blocks(blocks: list[dict[str, Any]] | None, answer: Answer) -> list[dict[str, Any]]:
    """The original message with its buttons replaced by who decided what, and when."""
    emoji = ":white_check_mark:" if answer.outcome == "approved" else ":no_entry:"
    at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    note = {
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": f"{emoji} {answer.text} at {at}"}],
    }
    out, replaced = [], False
    for block in blocks or []:
        elements = block.get("elements")
        if block.get("type") == "actions" and any(
            isinstance(e, dict) and e.get("action_id") in (APPROVE, REJECT)
            for e in (elements if isinstance(elements, list) else [])
        ):
            out.append(note)
            replaced = True
        else:
            out.append(block)
    if not replaced:
        out.append(note)
    return out


class SlackReplies:
    """Tells Slack what happened after the click was answered: chat.update or an ephemeral."""

    def __init__(self, token: SecretStr | None = None, base_url: str | None = None):
        from blocks.slack import slack_token

        self.token = token if token is not None else slack_token()
        self.base_url = base_url or os.environ.get("SLACK_API_URL", "https://slack.com/api/")

    def _client(self):
        from slack_sdk import WebClient

        return WebClient(
            token=self.token.get_secret_value() if self.token else None,
            base_url=self.base_url,
            timeout=5,
        )

    def after(self, click: Click, answer: Answer) -> None:
        """Runs after the HTTP answer went out; a Slack failure is logged, never raised."""
        if self.token is None:
            log.warning("No Slack bot token: cannot tell Slack that %s", answer.text)
            return
        try:
            if answer.ok and click.channel and click.message_ts:
                from blocks.slack import SlackNotifier

                SlackNotifier(bot_token=self.token, base_url=self.base_url).update(
                    click.channel,
                    click.message_ts,
                    answer.text,
                    decided_blocks(click.blocks, answer),
                )
            elif click.channel:
                self._client().chat_postEphemeral(
                    channel=click.channel, user=click.user, text=answer.text
                )
        except Exception as e:  # the decision stands whatever Slack says
            log.warning("Slack reply failed after %s: %s", answer.outcome, e)
