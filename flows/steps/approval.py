"""Step 2, request approval: the runbook's policy decides who, if anyone, must say yes.

Auto-approval applies when the trigger matches one of the policy's conditions (a drill, a
critical alert, a manual request, or always). Otherwise the flow run pauses with a typed
input, so the Prefect UI shows an approval form; the Slack buttons resume the same run
with the same input. A decision counts only if it comes from an identity the runbook
lists (and, under the two-person rule, not from the requester). A timeout follows
``on_timeout``: reject, approve (recorded as such, never as a person's approval) or
escalate (tell everyone, wait once more, then reject).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import SkipJsonSchema

from flows.config import Approval, Runbook
from flows.steps._log import step_logger
from flows.steps.trigger import Trigger


class ApprovalInput(RunInput):
    """The approval form the Prefect UI shows on a paused rollback run."""

    # a stale sender's extra field (an old client's ``channel``) is dropped, never trusted
    model_config = ConfigDict(extra="ignore")

    approver: str = Field(
        description="Your identity as listed in the runbook (Slack user id or e-mail)"
    )
    decision: Literal["approve", "reject"] = Field(
        description="Roll back, or leave production as is"
    )
    comment: str = Field(default="", description="Why (goes into the post-mortem)")
    # filled by Slack buttons and `runbook approve` to prove where the decision came from;
    # not a person's field, so it is left out of the form's schema (the UI does not show
    # it) while an API client may still send it
    proof: SkipJsonSchema[str] = ""


@dataclass(frozen=True)
class ApprovalContext:
    """What the approver is asked to approve, beyond the runbook and the trigger."""

    environment: str = "production"
    from_version: str | None = None
    to_version: str | None = None  # None: chosen after approval (restore.to)
    incident: str | None = None
    runbook_url: str | None = None


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def md(text: object, limit: int = 300) -> str:
    """Any text as inert Markdown: special characters escaped, one line, cut short."""
    one_line = " ".join(str(text).split())
    if len(one_line) > limit:
        one_line = one_line[: limit - 1] + "…"
    return _MD_SPECIAL.sub(r"\\\1", one_line)


def code(text: object, limit: int = 120) -> str:
    """Text as an inline code span: nothing inside is Markdown, so nothing is escaped (a
    backslash would show); backticks and line breaks cannot close or break it."""
    one_line = " ".join(str(text).replace("`", "'").split())
    return f"`{one_line[:limit]}`"


def approval_description(runbook: Runbook, trigger: Trigger, context: ApprovalContext) -> str:
    """The Markdown above the Prefect UI's approval form: what exactly is approved."""
    threshold = runbook.threshold_for(trigger.metric or "") if trigger.metric else None
    lines = [
        f"### Roll back **{md(runbook.model)}** in **{md(context.environment)}**",
        "",
        f"- **Versions:** {md(context.from_version or 'unknown')} → "
        + (
            f"**{md(context.to_version)}**"
            if context.to_version
            else f"{md(runbook.restore.to.replace('_', ' '))} (chosen when approved)"
        ),
    ]
    if trigger.metric:
        value = "no value" if trigger.value is None else f"{trigger.value:g}"
        bound = ""
        if threshold is not None:
            side, limit = (
                ("below", threshold.below) if threshold.below is not None else
                ("above", threshold.above)
            )  # fmt: skip
            bound = f" (threshold: {side} {limit:g})"
        sev = f", severity {md(trigger.severity)}" if trigger.severity else ""
        lines.append(
            f"- **Trigger:** {md(trigger.source)} alert, {md(trigger.metric)} = "
            f"**{md(value)}**{bound}{sev}"
        )
    else:
        lines.append(f"- **Trigger:** {md(trigger.source)} request")
    if trigger.requested_by:
        lines.append(f"- **Requested by:** {md(trigger.requested_by)}")
    if trigger.reason:
        lines.append(f"- **Why:** {md(trigger.reason)}")
    if context.incident:
        lines.append(f"- **Incident:** {md(context.incident)}")
    suite = runbook.verify.suite
    lines.append(
        f"- **Verification:** suite {code(Path(str(suite)).name)} on "
        f"{code(Path(str(runbook.verify.dataset)).name)}, then the live pointer is read "
        "back; a failed check puts the old version back"
    )
    rule = (
        " The requester cannot approve it (two-person rule)."
        if (runbook.approval.two_person_rule and trigger.requested_by)
        else ""
    )
    lines += [
        "",
        f"Approve as one of the runbook's approvers (decide within "
        f"{runbook.approval.timeout:g} s; then: {md(runbook.approval.on_timeout)}).{rule}",
    ]
    if context.runbook_url:
        lines.append(f"[Runbook]({context.runbook_url})")
    return "\n".join(lines)


def run_name(
    model: str, environment: str, incident: str | None = None, kind: str = "rollback"
) -> str:
    """``rollback · MODEL · ENV · INCIDENT``: what a run is, at a glance in the UI's list.

    For the flows' ``flow_run_name`` (a callable), e.g. ``@flow(flow_run_name=...)``."""
    parts = [kind, model, environment]
    if incident:
        parts.append(incident)
    return " · ".join(parts)


def run_tags(model: str, environment: str, source: str, incident: str | None = None) -> list[str]:
    """Tags that filter the UI's run list: ``model:…``, ``env:…``, ``source:…``,
    ``incident:…``."""
    tags = [f"model:{model}", f"env:{environment}", f"source:{source}"]
    if incident:
        tags.append(f"incident:{incident}")
    return tags


def label_current_run(
    model: str,
    environment: str,
    source: str,
    incident: str | None = None,
    kind: str = "rollback",
) -> None:
    """Rename and tag the running flow run (``run_name``, ``run_tags``) once its incident is
    known, so the UI's run list says what each run is; never fails the run."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext

        from flows.shared import shared_run

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None or shared_run():
            return  # a storm run is named for all its models, by the receiver
        tags = sorted({*(ctx.flow_run.tags or []), *run_tags(model, environment, source, incident)})
        with get_client(sync_client=True) as client:
            client.update_flow_run(
                ctx.flow_run.id, name=run_name(model, environment, incident, kind), tags=tags
            )
    except Exception as e:  # a label is not worth a failed rollback
        step_logger().debug("Could not name the run: %s", e)


class Decision(BaseModel):
    approved: bool
    how: Literal["auto", "human", "timeout", "dry_run"]
    by: str | None = None
    role: str | None = None
    channel: str | None = None
    comment: str = ""
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    ignored: list[str] = Field(default_factory=list, description="decisions that did not count")

    def describe(self) -> str:
        verdict = "approved" if self.approved else "rejected"
        if self.how == "human":
            return f"{verdict} by {self.by} ({self.role}) via {self.channel}"
        if self.how == "timeout":
            return f"{verdict}: no decision before the timeout"
        return f"{verdict} ({self.how}: {self.comment})"


class DecisionRefused(ValueError):
    """A submitted decision does not count (unknown approver, requester under two-person rule)."""


def auto_decision(policy: Approval, trigger: Trigger) -> Decision | None:
    """The decision taken without asking anyone, if the policy allows one."""
    reasons = {
        "always": True,
        "drill": trigger.is_drill,
        "critical": (trigger.severity or "").lower() == "critical",
        "manual": trigger.source == "manual",
    }
    for condition in policy.auto_approve:
        if reasons.get(condition):
            return Decision(approved=True, how="auto", comment=f"auto_approve: {condition}")
    return None


def check_decision(
    policy: Approval,
    answer: ApprovalInput,
    requested_by: str | None,
    flow_run_id: str | None = None,
    channels: list[str] | None = None,
) -> Decision:
    """Turn a submitted form into a Decision, or raise ``DecisionRefused`` naming why.

    The channel is what the decision's proof shows (``slack``, ``cli``), never what the form
    says; without a valid proof it is ``ui`` (the identity is as typed). ``channels``, when
    given, lists the channels whose decisions count.
    """
    from rollback_runbook.approvals import proven_channel

    channel = (
        proven_channel(str(flow_run_id), answer.approver, answer.decision, answer.proof) or "ui"
    )
    if channels and channel not in channels:
        raise DecisionRefused(
            f"a decision via {channel} does not count here (this environment accepts "
            f"{', '.join(channels)}); {answer.approver!r} must decide through one of those"
        )
    role = policy.role_of(answer.approver)
    if role is None:
        raise DecisionRefused(f"{answer.approver!r} is not an approver in this runbook")
    if policy.two_person_rule and requested_by and answer.approver == requested_by:
        raise DecisionRefused(
            f"{answer.approver!r} asked for this rollback and cannot also approve it "
            "(two_person_rule)"
        )
    return Decision(
        approved=answer.decision == "approve",
        how="human",
        by=answer.approver,
        role=role,
        channel=channel,
        comment=answer.comment,
    )


class ApprovalDeadline(Exception):
    """Nobody answered before the runbook's deadline; the run was set Running again."""


#: seconds the server keeps a pause open after our own deadline, so that the flow (not the
#: server's pause-expiry service) decides what a timeout means
PAUSE_GRACE_SECONDS = 120


def pause_until(
    *, wait_for_input, timeout: int, poll_interval: int, key: str, note: str | None = None
):
    """Like ``pause_flow_run`` but a timeout leaves the run alive.

    Prefect fails a run whose pause expires, which would make ``on_timeout: approve`` or
    ``escalate`` impossible. So the pause is registered on the server with some grace, and
    at our deadline the run is proposed back to Running before the server's expiry. A late
    click then finds a running (or finished) run and is refused, never counted.
    """
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.input import keyset_from_paused_state
    from prefect.input.run_input import run_input_subclass_from_type
    from prefect.states import Paused, Running
    from prefect.utilities.engine import propose_state_sync

    context = FlowRunContext.get()
    if not context or not context.flow_run:
        raise RuntimeError("approval can only wait inside a flow run")
    proposed = Paused(
        timeout_seconds=timeout + PAUSE_GRACE_SECONDS,
        reschedule=False,
        pause_key=key,
        message=note,  # why the previous decision was ignored, for whoever sent it
    )
    input_type = run_input_subclass_from_type(wait_for_input)
    keyset = keyset_from_paused_state(proposed)
    proposed.state_details.run_input_keyset = keyset
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        # the server may stop between committing the pause and answering: proposing the same
        # pause key again is answered with the run's state (the key "has already fired")
        state = _while_unreachable(
            lambda: propose_state_sync(
                client=client, state=proposed, flow_run_id=context.flow_run.id
            ),
            deadline,
            poll_interval,
        )
        if state.is_running():  # this pause key was already answered
            return input_type.load(keyset)
        if not state.is_paused():
            raise RuntimeError(f"flow run could not pause; the server answered {state.type}")
        _while_unreachable(lambda: _save_once(input_type, keyset), deadline, poll_interval)
        unreachable = False
        while True:
            time.sleep(max(0.0, min(poll_interval, deadline - time.monotonic())))
            try:
                flow_run = client.read_flow_run(context.flow_run.id)
            except Exception as e:  # the server restarting: keep waiting until the deadline
                if not _server_unreachable(e):
                    raise
                if not unreachable:
                    step_logger().warning(
                        "Prefect API unreachable while waiting for approval (%s); retrying "
                        "until the approval deadline",
                        e,
                    )
                unreachable = True
            else:
                if unreachable:
                    step_logger().info("Prefect API reachable again; still waiting for approval")
                unreachable = False
                if flow_run.state and flow_run.state.is_running():
                    return input_type.load(keyset)
            if time.monotonic() >= deadline:
                break
        state = propose_state_sync(
            client=client,
            state=Running(message="approval deadline passed"),
            flow_run_id=context.flow_run.id,
        )
        if state.is_running():
            # someone may have answered in the last instant: their input counts if it is there
            try:
                return input_type.load(keyset)
            except Exception:
                pass
    raise ApprovalDeadline(f"no decision within {timeout}s")


def _while_unreachable(call, deadline: float, poll_interval: float):
    """``call()``, tried again every ``poll_interval`` while the Prefect server is away, until
    the approval deadline (then the error goes up, as any other at once)."""
    warned = False
    while True:
        try:
            return call()
        except Exception as e:
            if not _server_unreachable(e) or time.monotonic() >= deadline:
                raise
            if not warned:
                step_logger().warning(
                    "Prefect API unreachable while waiting for approval (%s); retrying "
                    "until the approval deadline",
                    e,
                )
                warned = True
            time.sleep(max(0.0, min(poll_interval, deadline - time.monotonic())))


def _save_once(input_type, keyset) -> None:
    """Save the form's schema; one saved by an attempt whose answer was lost counts."""
    import httpx
    from prefect.exceptions import ObjectAlreadyExists

    try:
        input_type.save(keyset)
    except ObjectAlreadyExists:
        pass
    except httpx.HTTPStatusError as e:  # the server answers 409 for a key already saved
        if e.response.status_code != 409:
            raise


def _server_unreachable(error: Exception) -> bool:
    """A connection failure or a 5xx: the Prefect server is away, not the request wrong."""
    import httpx

    if isinstance(error, httpx.TransportError):
        return True
    return isinstance(error, httpx.HTTPStatusError) and error.response.status_code >= 500


def _poll_interval() -> int:
    from rollback_runbook.settings import settings

    return settings().approval_poll_seconds


def acknowledge(pause_key: str, status: str, detail: str) -> None:
    """Tell whoever answered the pause what the flow did with it (``runbook approve`` reads
    the flow run input ``<pause_key>-ack``); never fails the run."""
    try:
        from prefect.input import create_flow_run_input

        create_flow_run_input(f"{pause_key}-ack", {"status": status, "detail": detail})
    except Exception as e:
        step_logger().debug("Could not acknowledge %s: %s", pause_key, e)


def wait_for_decision(
    runbook: Runbook,
    trigger: Trigger,
    *,
    pause=pause_until,
    on_escalate=None,
    channels: list[str] | None = None,
    context: ApprovalContext | None = None,
) -> Decision:
    """Pause until an allowed approver decides or the policy's timeout runs out."""
    form = ApprovalInput.with_initial_data(
        description=approval_description(runbook, trigger, context or ApprovalContext())
    )
    from prefect.context import FlowRunContext

    logger = step_logger()
    ctx = FlowRunContext.get()
    flow_run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    policy = runbook.approval
    ignored: list[str] = []
    rounds = 2 if policy.on_timeout == "escalate" else 1
    for round_no in range(rounds):
        deadline = time.monotonic() + policy.timeout
        attempt = 0
        while (remaining := deadline - time.monotonic()) > 0:
            attempt += 1
            key = f"approval-{round_no}-{attempt}"
            try:
                answer = pause(
                    wait_for_input=form,
                    timeout=max(1, int(remaining)),
                    poll_interval=_poll_interval(),
                    key=key,
                    **({"note": f"ignored: {ignored[-1]}"} if ignored else {}),
                )
            except (FlowPauseTimeout, ApprovalDeadline):
                break
            except ValidationError as e:  # a malformed answer through the API: not a decision
                logger.warning("Ignored a malformed decision: %s; still waiting", e)
                ignored.append(f"malformed decision: {e.errors()[0].get('msg', e)}")
                acknowledge(key, "ignored", ignored[-1])
                continue
            try:
                decision = check_decision(
                    policy, answer, trigger.requested_by, flow_run_id, channels
                )
            except DecisionRefused as e:
                logger.warning("Ignored a decision: %s; still waiting", e)
                ignored.append(str(e))
                acknowledge(key, "ignored", str(e))
                continue
            decision.ignored = ignored
            logger.info("Decision accepted: %s", decision.describe())
            acknowledge(key, "accepted", decision.describe())
            return decision
        if round_no + 1 < rounds and on_escalate is not None:
            on_escalate()
    if policy.on_timeout == "approve":
        return Decision(
            approved=True,
            how="timeout",
            comment="on_timeout: approve (nobody approved; the runbook allows this)",
            ignored=ignored,
        )
    return Decision(
        approved=False,
        how="timeout",
        comment=f"on_timeout: {policy.on_timeout}; nobody decided within {policy.timeout:g}s",
        ignored=ignored,
    )


@task(name="request-approval", cache_policy=NO_CACHE, persist_result=False)
def request_approval(
    runbook: Runbook,
    trigger: Trigger,
    dry_run: bool = False,
    on_escalate=None,
    channels: list[str] | None = None,
    context: ApprovalContext | None = None,
) -> Decision:
    auto = auto_decision(runbook.approval, trigger)
    if auto is not None:
        return auto
    if dry_run:
        return Decision(approved=True, how="dry_run", comment="dry run: approval not requested")
    return wait_for_decision(
        runbook, trigger, on_escalate=on_escalate, channels=channels, context=context
    )
