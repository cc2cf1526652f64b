"""``runbook approve``: answer a paused rollback run's approval form, and say what the run did.

The API call succeeding proves only that the server stored the answer. The command then
watches the run until the flow acknowledges the decision (accepted, or ignored and why:
the flow writes that back as a flow run input), and says so; a run that never picks the
answer up (its process is gone) is reported as such, with a non-zero exit. With
RUNBOOK_APPROVAL_SECRET set the decision is signed, so the flow records channel ``cli``
(proven) rather than ``ui`` (typed).
"""

from __future__ import annotations

import os
import time
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import check_api_url, fail
from rollback_runbook.cli.errors import UNREACHABLE, refused_login

#: how long the flow has to acknowledge a decision (it polls every few seconds)
ACK_SECONDS = 30.0


def approve(
    flow_run_id: Annotated[str, typer.Argument(help="The paused rollback run's id")],
    approver: Annotated[str, typer.Option("--as", help="Your identity as listed in the runbook")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approve")] = False,
    comment: Annotated[
        str,
        typer.Option("--comment", help="Why: recorded with the decision and in the post-mortem"),
    ] = "",
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for the run to acknowledge")
    ] = ACK_SECONDS,
) -> None:
    """Answer a paused rollback run's approval form (needs PREFECT_API_URL)."""
    from uuid import UUID

    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        raise fail(f"{flow_run_id!r} is not a flow run id") from None
    if not os.environ.get("PREFECT_API_URL"):
        raise fail("set PREFECT_API_URL to the server the paused run is on")
    check_api_url()
    import httpx
    from prefect.exceptions import NotPausedError, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    from rollback_runbook.approvals import sign_decision

    decision = "reject" if reject else "approve"
    api = os.environ["PREFECT_API_URL"]
    try:
        paused_key = _pause_key(run_id)
        sent_at = time.time()
        resume_flow_run(
            run_id,
            run_input={
                "approver": approver,
                "decision": decision,
                "comment": comment,
                "proof": sign_decision(str(run_id), approver, decision, "cli"),
            },
        )
        verdict, detail = _acknowledgement(run_id, paused_key, sent_at, wait)
    except NotPausedError:
        raise fail(
            f"run {flow_run_id} is not waiting for approval (finished, expired "
            "or already answered); nothing was changed",
            1,
        ) from None
    except ObjectNotFound:
        raise fail(f"no flow run {flow_run_id} on {api}") from None
    except (httpx.TransportError, OSError) as e:  # nothing answered: unreachable
        raise fail(f"cannot reach {api}: {e or type(e).__name__}", UNREACHABLE) from None
    except httpx.HTTPError as e:  # the server answered, and refused
        raise fail(refused_login(e) or f"{api} refused the decision: {e}", 1) from None
    if verdict == "accepted":
        done = {"approve": "approved", "reject": "rejected"}.get(decision, decision)
        render.say(f"{done} run {flow_run_id} as {approver}: {detail}")
        return
    raise fail(f"run {flow_run_id}: {detail}", 1)


def _pause_key(run_id) -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    return state.state_details.pause_key if state is not None else None


def _acknowledgement(run_id, paused_key: str | None, sent_at: float, wait: float):
    """What the flow did with the decision: ("accepted"|"ignored"|"gone", detail).

    The flow answers in the flow run input ``<pause key>-ack`` (see
    ``flows.steps.approval.acknowledge``).
    """
    from prefect.client.orchestration import get_client
    from prefect.input import read_flow_run_input

    deadline = time.monotonic() + wait
    state_name = "unknown"
    with get_client(sync_client=True) as client:
        while True:
            ack = (
                read_flow_run_input(f"{paused_key}-ack", flow_run_id=run_id) if paused_key else None
            )
            if isinstance(ack, dict) and ack.get("status") in ("accepted", "ignored"):
                if ack["status"] == "accepted":
                    return "accepted", str(ack.get("detail", ""))
                return "ignored", f"the run ignored this decision ({ack.get('detail')})"
            state = client.read_flow_run(run_id).state
            state_name = state.name if state else "unknown"
            if state is not None and state.is_final():
                return "gone", f"the run ended ({state_name}) without acknowledging the decision"
            if time.monotonic() >= deadline:
                return (
                    "gone",
                    f"the run did not acknowledge the decision within {wait:g}s (state "
                    f"{state_name}): its process may be gone; check the run, or start a new "
                    "rollback (it settles what this one left)",
                )
            time.sleep(0.5)
