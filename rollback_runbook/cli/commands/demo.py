"""``runbook demo``: the main job, in a registry of its own."""

from __future__ import annotations

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt, RegistryOpt, fail, load, quiet_env


def demo(
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seed the example registry, promote a degraded version, raise the alert, roll back.

    The demo uses its own registry ({state}/demo-registry/) unless --registry names one,
    so it never touches the registry you seed or roll back with the other commands.
    """
    quiet_env()
    from rollback_runbook.demo import DEMO_REGISTRY, RefusedReset, run_demo

    book = load("churn-classifier")
    url = registry or DEMO_REGISTRY
    try:
        result = run_demo(book, url, say=(lambda _m: None) if as_json else render.say)
    except RefusedReset as e:
        raise fail(str(e)) from None
    report = {**result.report, "demo_seconds": result.seconds, "traffic": result.traffic}
    if as_json:
        render.print_json(report)
    else:
        render.rollback_report(report)
        render.say(
            f"demo wall time: {result.seconds:.1f}s · see the journal with "
            f"`runbook history {book.model} --registry '{url}'`"
        )
    raise typer.Exit(0 if result.good else 1)
