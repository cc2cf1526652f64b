"""All of the CLI's output: rich text for people, one JSON document for machines.

Commands do the work and hand plain data (dicts, registry models) to these functions;
nothing here reads a registry or starts a flow.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape as _markup_escape
from rich.table import Table

from rollback_runbook.escape import terminal

# soft_wrap: a line piped to a file or grep stays one line; tables get room when not on a TTY
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def escape(text: str) -> str:
    """``text`` shown as written: rich markup and terminal control characters made inert."""
    return _markup_escape(terminal(text))


def print_json(doc: Any, indent: int | None = 2) -> None:
    print(json.dumps(doc, indent=indent))


def error(message: str, as_json: bool = False) -> None:
    """One line naming what went wrong (and, with --json, the same as a JSON document)."""
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        err.print(f"[red]error:[/red] {escape(message)}")


def say(message: str) -> None:
    out.print(message)


def note(message: str) -> None:
    """Progress for a person, on stderr so a --json document on stdout stays clean."""
    err.print(message)


# -- validate --------------------------------------------------------------------------


def validation(results: list[dict[str, Any]], as_json: bool) -> None:
    bad = [r for r in results if not r["ok"]]
    if as_json:
        print_json({"ok": not bad, "files": results})
        return
    for r in results:
        if r["ok"]:
            out.print(f"[green]ok[/green]   {escape(r['file'])} ({escape(r['model'])})")
        else:
            out.print(f"[red]FAIL[/red] {escape(r['file'])}")
            for p in r["problems"]:
                out.print(f"       {escape(r['file'])}: {escape(p)}")
    if not results:
        out.print("no runbook files found")


# -- rollback --------------------------------------------------------------------------


def rollback_report(report: dict[str, Any]) -> None:
    ok = report["outcome"] in ("restored", "dry_run", "trigger_rejected", "approval_rejected")
    colour = "green" if report["outcome"] == "restored" else ("yellow" if ok else "red")
    out.print(
        f"\n[bold]{report['model']}[/bold] in [bold]{report['env']}[/bold] · incident "
        f"{report['incident']}"
    )
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("step")
    table.add_column("started", style="dim")
    table.add_column("took", justify="right")
    table.add_column("outcome")
    table.add_column("detail", overflow="fold")
    for s in report["steps"]:
        mark = {
            "ok": "[green]ok[/green]",
            "would-pass": "[green]would-pass[/green]",
            "failed": "[red]FAILED[/red]",
            "would-block": "[red]would-block[/red]",
        }.get(s["outcome"], f"[yellow]{s['outcome']}[/yellow]")
        table.add_row(
            s["name"], s["started_at"], f"{s['seconds']:.2f}s", mark, escape(str(s["detail"]))
        )
    out.print(table)
    v = report.get("verification")
    if v:
        out.print(f"\n[bold]verification[/bold] ({v['version']}): {escape(v['summary'])}")
        for e in v.get("expectations", []):
            sign = "[green]pass[/green]" if e["success"] else "[red]FAIL[/red]"
            col = f" {e['column']}" if e.get("column") else ""
            out.print(
                f"  {sign} {e['expectation']}{col}: observed {e['observed']} ({e['expected']})"
            )
    verdict = report["outcome"].upper().replace("_", " ")
    out.print(f"\n[bold {colour}]{verdict}[/bold {colour}]: {escape(str(report['reason']))}")
    out.print(
        f"versions: {report.get('from_version') or '-'} -> {report.get('to_version') or '-'}"
        f" · now live: [bold]{report.get('final_version') or '-'}[/bold]"
    )
    if report.get("time_to_restore") is not None:
        out.print(
            f"time to verified restore: {report['time_to_restore']:.2f}s "
            f"(run total {report['seconds']:.2f}s)"
        )
    if report.get("postmortem"):
        out.print(f"post-mortem: {report['postmortem']}")
    notes = report.get("notifications", [])
    if notes:
        from flows.report import delivery_words

        out.print(f"notices: {escape(delivery_words(notes))}")
    undelivered = [n for n in notes if not n.get("delivered")]
    if undelivered:
        out.print(
            f"[yellow]{len(undelivered)} notification(s) could not be sent; "
            "queued for `runbook outbox --retry`[/yellow]"
        )


def waiting_for_approval(
    run_id: str, ui_url: str | None, approvers: list[str], waited: float = 0.0
) -> None:
    """What a person needs while `runbook rollback` waits: the run, a link, the command."""
    if waited:
        err.print(f"  ... still waiting for approval of run {run_id} ({waited / 60:.0f} min)")
        return
    err.print(f"[yellow]waiting for approval[/yellow] of run {run_id}")
    if ui_url:
        err.print(f"  approve in the UI:  {ui_url.rstrip('/')}/runs/flow-run/{run_id}")
    who = approvers[0] if approvers else "YOUR_ID"
    err.print(f"  or run:             runbook approve {run_id} --as {who}")


# -- history ---------------------------------------------------------------------------


def history(
    model: str,
    location: str,
    pointers: dict[str, Any],
    entries: list[Any],
    freezes: dict[str, Any] | None = None,
) -> None:
    out.print(f"[bold]{model}[/bold] · registry {escape(location)}")
    for name, p in pointers.items():
        live = (
            f"[bold]{p.version}[/bold] since {p.updated_at:%Y-%m-%d %H:%M:%S}Z by "
            f"{escape(p.updated_by)}"
            if p
            else "-"
        )
        out.print(f"  {name}: {live}")
        if frozen := (freezes or {}).get(name):
            out.print(f"    [bold yellow]FROZEN[/bold yellow] {escape(frozen.describe())}")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("#", "at (UTC)", "env", "action", "status", "incident", "detail"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(
            str(e.seq),
            f"{e.at:%m-%d %H:%M:%S}",
            e.env or "",
            e.action,
            e.status,
            e.incident or "",
            escape(journal_detail(e.action, e.details)),
        )
    out.print(table)


def history_json(
    model: str, pointers: dict[str, Any], entries: list[Any], freezes: dict[str, Any] | None = None
) -> None:
    print_json(
        {
            "model": model,
            "live": {k: (p.model_dump(mode="json") if p else None) for k, p in pointers.items()},
            "frozen": {k: (f.as_dict() if f else None) for k, f in (freezes or {}).items()},
            "journal": [e.model_dump(mode="json") for e in entries],
        }
    )


def journal_detail(action: str, d: dict[str, Any]) -> str:
    if action in ("pointer", "restore", "undo", "promote") and "to" in d:
        detail = f"{d.get('from') or '-'} -> {d['to']}"
        if action == "promote" and d.get("verified") and not d.get("reason"):
            detail += f" ({d['verified']})"
        if d.get("reason"):
            detail += f" ({d['reason']})"
        return detail
    if action == "approval":
        return f"{d.get('how')} {d.get('by') or ''} {d.get('comment') or ''}".strip()
    if action == "freeze":
        until = f" until {d['until'][:16]}Z" if d.get("until") else ""
        return f"frozen{until}: {d.get('reason') or ''}"
    if action == "unfreeze":
        return f"unfrozen: {d.get('reason') or ''}".rstrip(": ")
    if action == "trigger" and d.get("code"):
        return f"{d['code']}: {d.get('reason') or ''}"
    if action == "drift":
        pointer = f"{d.get('pointer')} (rev {d.get('pointer_revision')})"
        return f"pointer {pointer}, served {d.get('served')}"
    return str(d.get("reason") or d.get("summary") or d.get("location") or d.get("version") or "")


# -- incidents -------------------------------------------------------------------------


def age(seconds: float) -> str:
    """``42s``, ``17m``, ``3h``, ``2d``: an age readable at a glance."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


OUTCOME_COLOUR = {"restored": "green", None: "yellow"}


def incidents(rows: list[Any], freezes: list[Any], problems: list[str], open_only: bool) -> None:
    for f, refused in freezes:
        also = f" ({refused} rollback(s) refused since)" if refused else ""
        out.print(f"[bold yellow]FROZEN[/bold yellow] {escape(f.describe())}{also}")
    for p in problems:
        err.print(f"[red]error:[/red] {escape(p)}")
    if not rows:
        out.print("no open incidents" if open_only else "no incidents")
        return
    opened = sum(r.open for r in rows)
    out.print(f"[bold]{opened} open[/bold], {len(rows) - opened} closed")
    table = Table(box=None, header_style="bold", pad_edge=False)
    cols = ("model", "env", "incident", "phase", "from -> to", "age", "outcome", "bake", "run")
    for col in cols:
        table.add_column(col, overflow="fold")
    for r in rows:
        outcome = r.outcome or "OPEN"
        colour = OUTCOME_COLOUR.get(r.outcome, "red")
        forced = " (forced)" if r.forced else ""
        table.add_row(
            r.model,
            r.env,
            r.incident,
            r.phase,
            f"{r.from_version or '-'} -> {r.to_version or '-'}",
            age(r.age_seconds()),
            f"[{colour}]{escape(outcome)}[/{colour}]{forced}",
            escape(r.bake_words()),
            escape(r.run_url or r.flow_run_id or "-"),
        )
    out.print(table)


def incident_detail(doc: dict[str, Any]) -> None:
    state = doc["outcome"] or f"OPEN at {doc['phase']}"
    out.print(
        f"[bold]{escape(doc['incident'])}[/bold] · {doc['model']} in {doc['env']} · "
        f"[bold]{escape(state)}[/bold]"
    )
    out.print(f"trigger: {escape(doc['trigger'])}")
    out.print(
        f"versions: {doc['from_version'] or '-'} -> {doc['to_version'] or '-'}"
        f" · live after: {doc['final_version'] or '-'}"
    )
    if doc.get("time_to_restore") is not None:
        out.print(f"time to verified restore: {doc['time_to_restore']:.2f}s")
    out.print(f"prefect run: {escape(doc.get('run_url') or doc.get('flow_run_id') or '-')}")
    if doc.get("bake"):
        from flows.overview import figures_line

        out.print(f"bake: {escape(doc['bake'])} · {escape(figures_line(doc.get('impact_window')))}")
    table = Table(box=None, header_style="bold", pad_edge=False, title="timeline")
    for col in ("#", "at (UTC)", "action", "status", "by", "detail"):
        table.add_column(col, overflow="fold")
    for t in doc["timeline"]:
        table.add_row(
            str(t["seq"]), t["at"][5:19].replace("T", " "), t["action"], t["status"],
            escape(t["actor"] or ""), escape(t["detail"]),
        )  # fmt: skip
    out.print(table)
    for d in doc["decisions"]:
        out.print(
            f"decision: {d['status']} ({d.get('how')}) by {escape(str(d.get('by') or '-'))}"
            + (f": {escape(str(d['comment']))}" if d.get("comment") else "")
        )
    for v in doc["verifications"]:
        out.print(f"verification: {v['status']} {escape(str(v.get('detail') or v.get('summary')))}")
    notices = doc["notices"]
    if notices.get("summary"):
        n = notices["summary"]
        out.print(f"notices: {n.get('delivered')}/{n.get('total')} delivered")
    for f in notices["failed"]:
        out.print(
            f"  [yellow]not delivered[/yellow]: {f.get('event')} to {escape(str(f.get('channel')))}"
            f": {escape(str(f.get('error')))}"
        )
    out.print(f"post-mortem: {escape(doc.get('postmortem') or '-')}")


# -- drill -----------------------------------------------------------------------------


def drill_report(report: dict[str, Any]) -> None:
    verdict = "[bold green]PASS[/bold green]" if report["passed"] else "[bold red]FAIL[/bold red]"
    out.print(
        f"\n[bold]drill[/bold] {report['drill']} · {report['model']} in {report['env']} · "
        f"scenario {report['scenario']}: {verdict}"
    )
    if report.get("injected"):
        out.print(f"injected: {escape(str(report['injected']))}")
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for c in report["checks"]:
        table.add_row(
            c["name"],
            "[green]pass[/green]" if c["passed"] else "[red]FAIL[/red]",
            escape(str(c["detail"])),
        )
    out.print(table)
    if report.get("steps"):
        steps = Table(box=None, header_style="bold", pad_edge=False, title="rollback steps")
        for col in ("step", "took", "outcome"):
            steps.add_column(col)
        for s in report["steps"]:
            steps.add_row(s["name"], f"{s['seconds']:.2f}s", s["outcome"])
        out.print(steps)
    ttr = report.get("time_to_restore")
    if ttr is not None:
        out.print(f"time to restore: {ttr:.1f}s (RTO {report['rto_slo']:g}s)")
    if any(f.get("seconds") is not None for f in report.get("figure_trend") or []):
        figures = Table(box=None, header_style="bold", pad_edge=False,
                        title=f"figures (detect: {report.get('detect', 'self')})")  # fmt: skip
        for col in ("figure", "seconds", "SLO", "earlier drills (median)", "trend"):
            figures.add_column(col)

        def secs(v: Any) -> str:
            return "-" if v is None else f"{float(v):.1f}s"

        for f in report["figure_trend"]:
            earlier = f"{secs(f['median_earlier'])} of {len(f['earlier'])}" if f["earlier"] else "-"
            figures.add_row(f["figure"], secs(f["seconds"]), secs(f["slo"]), earlier, f["trend"])
        out.print(figures)
    if report.get("trend"):
        last = ", ".join(
            f"{t['result']}"
            + (f" {t['time_to_restore']:.1f}s" if t.get("time_to_restore") is not None else "")
            for t in report["trend"][:6]
        )
        out.print(f"recent drills (newest first): {last}")
    out.print(escape(str(report["reason"])))


# -- stack -----------------------------------------------------------------------------


def stack_up(ui_url: str, api_url: str, receiver_url: str | None, workers: int, logs: Any) -> None:
    out.print("\n[bold]local stack is up[/bold] (Ctrl-C stops everything it started)")
    out.print(f"  Prefect UI        {ui_url}")
    out.print(f"  Prefect API       {api_url}   (export PREFECT_API_URL={api_url})")
    if receiver_url:
        out.print(f"  webhook receiver  {receiver_url}")
    out.print(f"  workers           {workers} on pool rollback-pool")
    out.print(f"  logs              {logs}")


# -- config ----------------------------------------------------------------------------


def config_table(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json({"settings": rows})
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("for", "setting", "variable", "value", "from"):
        table.add_column(col, overflow="fold")
    for r in rows:
        value = "-" if r["value"] is None else str(r["value"])
        table.add_row(r["scope"], r["name"], r["variable"], escape(value), escape(r["source"]))
    out.print(table)


# -- init ------------------------------------------------------------------------------


def init_done(folder: str, written: list[str]) -> None:
    out.print(f"wrote a starter project in [bold]{escape(folder)}[/bold]:")
    for name in written:
        out.print(f"  {escape(name)}")
    out.print("\nnext:")
    out.print(f"  cd {escape(folder)}")
    out.print("  runbook validate                         # check the runbook")
    out.print("  runbook demo                             # break the example model, roll back")
    out.print("  runbook history churn-classifier         # what was live when, and why")
    out.print("  runbook stack                            # Prefect server, UI, worker, receiver")
