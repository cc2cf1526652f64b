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
        mark = {"ok": "[green]ok[/green]", "failed": "[red]FAILED[/red]"}.get(
            s["outcome"], f"[yellow]{s['outcome']}[/yellow]"
        )
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
    undelivered = [n for n in report.get("notifications", []) if not n.get("delivered")]
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


def history(model: str, location: str, pointers: dict[str, Any], entries: list[Any]) -> None:
    out.print(f"[bold]{model}[/bold] · registry {escape(location)}")
    for name, p in pointers.items():
        live = (
            f"[bold]{p.version}[/bold] since {p.updated_at:%Y-%m-%d %H:%M:%S}Z by "
            f"{escape(p.updated_by)}"
            if p
            else "-"
        )
        out.print(f"  {name}: {live}")
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


def history_json(model: str, pointers: dict[str, Any], entries: list[Any]) -> None:
    print_json(
        {
            "model": model,
            "live": {k: (p.model_dump(mode="json") if p else None) for k, p in pointers.items()},
            "journal": [e.model_dump(mode="json") for e in entries],
        }
    )


def journal_detail(action: str, d: dict[str, Any]) -> str:
    if action in ("pointer", "restore", "undo", "promote") and "to" in d:
        detail = f"{d.get('from') or '-'} -> {d['to']}"
        if d.get("reason"):
            detail += f" ({d['reason']})"
        return detail
    if action == "approval":
        return f"{d.get('how')} {d.get('by') or ''} {d.get('comment') or ''}".strip()
    return str(d.get("reason") or d.get("summary") or d.get("location") or d.get("version") or "")


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
