"""``runbook demo``: the main job, in a registry of its own."""

from __future__ import annotations

from typing import Any

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt, RegistryOpt, fail, load, quiet_env


def demo(
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seed the example registry, promote a degraded version, raise the alert, roll back,
    and watch production's accuracy recover (the impact window).

    The demo uses its own registry ({state}/demo-registry/) unless --registry names one,
    so it never touches the registry you seed or roll back with the other commands. The
    accuracy is read from the demo's model server, or from the Prometheus at
    $RUNBOOK_PROMETHEUS_URL when set (docs/demo.md).
    """
    quiet_env()
    from rollback_runbook.demo import DEMO_REGISTRY, BadSetting, RefusedReset, run_demo

    book = load("churn-classifier")
    url = registry or DEMO_REGISTRY
    try:
        result = run_demo(book, url, say=(lambda _m: None) if as_json else render.say)
    except (RefusedReset, BadSetting) as e:
        raise fail(str(e)) from None
    report = {
        **result.report,
        "demo_seconds": result.seconds,
        "traffic": result.traffic,
        "impact_window": result.impact_window,
    }
    if as_json:
        render.print_json(report)
    else:
        render.rollback_report(report)
        impact_window(result.impact_window or {}, report)
        render.say(
            f"demo wall time: {result.seconds:.1f}s · see the journal with "
            f"`runbook history {book.model} --registry '{url}'`"
        )
    raise typer.Exit(0 if result.good else 1)


def _secs(value: Any) -> str:
    return "unknown" if value is None else f"{float(value):.1f}s"


def impact_window(impact: dict[str, Any], report: dict[str, Any]) -> None:
    """The incident's three figures and their sum, one line each, with what each spans."""
    status = impact.get("bake") or "no verdict"
    colour = "green" if status == "recovered" else "red"
    render.say(f"\n[bold]Impact window[/bold] · bake watch: [{colour}]{status}[/{colour}]")
    where = {"model-server": "the model server's /metrics at", "prometheus": "Prometheus at"}
    if impact.get("read_from"):
        render.say(
            f"  accuracy read from {where.get(impact.get('source'), '')} {impact['read_from']}"
        )
    restored = report.get("to_version") or "the restored version"
    detection_note = "alert -> the run took it up"
    if impact.get("temporary_prefect_server"):
        detection_note += " (includes the temporary Prefect server's start-up)"
    lines = [
        ("detection", impact.get("detection"), detection_note),
        ("restore", impact.get("restore"), f"run start -> {restored} serving"),
        ("recovery", impact.get("recovery"),
         f"{restored} serving -> accuracy healthy, as the monitoring saw it"),
        ("impact", impact.get("impact"), "alert -> recovered"),
    ]  # fmt: skip
    for name, value, what in lines:
        render.say(f"  {name:<10} {_secs(value):>8}   {what}")
    if status != "recovered" and impact.get("reason"):
        render.say(f"  [red]{impact['reason']}[/red]")
