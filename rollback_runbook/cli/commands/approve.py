"""``runbook approve``: answer a paused rollback run's approval form."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import check_api_url, fail


def approve(
    flow_run_id: Annotated[str, typer.Argument(help="The paused rollback run's id")],
    approver: Annotated[str, typer.Option("--as", help="Your identity as listed in the runbook")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approve")] = False,
    comment: Annotated[str, typer.Option("--comment")] = "",
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

    try:
        resume_flow_run(
            run_id,
            run_input={
                "approver": approver,
                "decision": "reject" if reject else "approve",
                "comment": comment,
                "channel": "cli",
            },
        )
    except NotPausedError:
        raise fail(
            f"run {flow_run_id} is not waiting for approval (finished, expired "
            "or already answered); nothing was changed",
            1,
        ) from None
    except ObjectNotFound:
        raise fail(f"no flow run {flow_run_id} on {os.environ['PREFECT_API_URL']}") from None
    except (httpx.HTTPError, OSError) as e:
        raise fail(f"cannot reach {os.environ['PREFECT_API_URL']}: {e}", 1) from None
    render.say(f"{'rejected' if reject else 'approved'} run {flow_run_id} as {approver}")
