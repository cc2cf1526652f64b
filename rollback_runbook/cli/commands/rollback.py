"""``runbook rollback``: a manual trigger through the whole runbook."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import (
    EnvOpt,
    JsonOpt,
    RegistryOpt,
    fail,
    load,
    open_for,
    quiet_env,
)


def _moment(as_of: str | None, to: str | None) -> datetime | None:
    if not as_of:
        return None
    try:
        moment = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
    except ValueError:
        raise fail(f"--as-of {as_of!r} is not an ISO time such as 2026-11-20T10:00Z") from None
    if to:
        raise fail("give --to or --as-of, not both")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def rollback(
    model: Annotated[
        str, typer.Argument(help="Model name (runbooks/<model>.yaml) or runbook path")
    ],
    to: Annotated[
        str | None, typer.Option("--to", help="Restore this version (default: last known good)")
    ] = None,
    env: EnvOpt = "production",
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why (goes into the journal and post-mortem)")
    ] = None,
    requested_by: Annotated[
        str | None, typer.Option("--requested-by", help="Who asks (default: $USER)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and plan; change nothing")
    ] = False,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Restore what was live then, e.g. 2026-11-20T10:00Z"),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Roll back despite a freeze or the cooldown (needs --reason; journaled; "
            "approval still applies)",
        ),
    ] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Roll MODEL back now: a manual trigger through the whole runbook."""

    if force and not (reason and reason.strip()):
        raise fail("--force needs --reason: why this rollback cannot wait (it is journaled)")
    moment = _moment(as_of, to)
    quiet_env()
    book = load(model)
    if to is not None:
        from blocks.registry import check_version

        check_version(to)  # `--to ../../x` is bad input (exit 2), before anything runs
    open_for(book, env, registry)  # an unknown --env is bad input, with any registry
    who = requested_by or os.environ.get("USER") or "cli"
    from flows.steps.trigger import Trigger

    manual = Trigger(
        source="manual",
        requested_by=who,
        reason=reason or (f"manual rollback by {who}" if not dry_run else "manual"),
        force=force,
    )
    if dry_run:  # the plan needs no flow engine and no server: nothing is written or sent
        from flows.dry_run import plan_only

        report = plan_only(book, env, manual, to, moment, registry)
        _show(report, as_json)
        raise typer.Exit(0 if report["outcome"] == "dry_run" else 1)
    from flows.steps.approval import auto_decision

    asks_a_person = auto_decision(book.approval, manual) is None
    if not dry_run and not os.environ.get("PREFECT_API_URL") and asks_a_person:
        raise fail(
            f"the {book.model} runbook asks a person to approve manual rollbacks, and without "
            "a Prefect server nobody could: start `runbook stack`, export PREFECT_API_URL, and "
            "approve in the UI or with `runbook approve` (or use --dry-run)"
        )
    approvers = [i for ids in book.approval.approvers.values() for i in ids]
    from rollback_runbook.local_run import run_rollback_flow

    report = run_rollback_flow(
        on_paused=(
            (lambda run_id, ui, waited: render.waiting_for_approval(run_id, ui, approvers, waited))
            if not dry_run and asks_a_person
            else None
        ),
        runbook=book.source or model,
        environment=env,
        trigger=manual,
        target_version=to,
        requested_by=who,
        reason=manual.reason,
        dry_run=dry_run,
        registry_url=registry,
        as_of=moment,
    )
    _show(report, as_json)
    raise typer.Exit(0 if report["outcome"] in ("restored", "dry_run") else 1)


def _show(report: dict, as_json: bool) -> None:
    if as_json:
        render.print_json(report)
    else:
        render.rollback_report(report)
