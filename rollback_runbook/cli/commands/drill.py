"""``runbook drill``: run the drill deployment on the stack and print its report."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt, check_env, fail, load, quiet_env

SCENARIOS = ("accuracy", "latency", "error_rate", "corrupted_artifact")
DETECT = ("self", "monitoring")


def drill(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    scenario: Annotated[
        str, typer.Option("--scenario", help="accuracy, latency, error_rate or corrupted_artifact")
    ] = "accuracy",
    env: Annotated[
        str | None, typer.Option("--env", help="Default: the runbook's drill env")
    ] = None,
    receiver_url: Annotated[
        str | None,
        typer.Option("--receiver", help="Webhook receiver URL (default $RUNBOOK_RECEIVER_URL)"),
    ] = None,
    detect: Annotated[
        str | None,
        typer.Option(
            "--detect",
            help="self: the drill raises its own alert; monitoring: the real monitoring must "
            "notice (default: the runbook's drill.detect)",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a drill now: the drill deployment on the server (start `runbook stack` first).

    Runs where the monthly schedule runs it (a worker, which has the receiver's secret),
    waits for it, and prints the report.
    """
    quiet_env()
    if not os.environ.get("PREFECT_API_URL"):
        raise fail("a drill runs on the stack: start `runbook stack` and export PREFECT_API_URL")
    book = load(model)
    if env:
        check_env(book, env)
    if scenario not in SCENARIOS:
        raise fail(f"unknown scenario {scenario!r}")
    if detect is not None and detect not in DETECT:
        raise fail(f"--detect must be self or monitoring, got {detect!r}")
    from prefect.deployments import run_deployment

    params: dict[str, Any] = {"runbook": book.reference, "scenario": scenario}
    if env:
        params["environment"] = env
    if receiver_url:
        params["receiver_url"] = receiver_url
    if detect:
        params["detect"] = detect
    if not as_json:
        render.note(f"drill {scenario} of {book.model}: waiting for the drill run ...")
    run = run_deployment("drill/drill", parameters=params, timeout=900)
    state = run.state
    report = state.result(raise_on_failure=False)
    if not isinstance(report, dict):
        raise fail(f"drill run ended {state.type.value}: {state.message}", 1)
    if as_json:
        render.print_json(report)
    else:
        render.drill_report(report)
    raise typer.Exit(0 if report["passed"] else 1)
