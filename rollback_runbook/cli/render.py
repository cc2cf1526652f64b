"""All of the CLI's output: rich text for people, one JSON document for machines.

Commands do the work and hand plain data (dicts, registry models) to these functions;
nothing here reads a registry or starts a flow.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Sequence
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape as _markup_escape
from rich.table import Table
from rich.text import Text

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


# -- tables ----------------------------------------------------------------------------

#: between two columns of a borderless table (one space of padding on either side)
GAP = 2


def _plain_width(cell: Text) -> int:
    return max((cell_len(line) for line in cell.plain.splitlines()), default=0)


def _longest_word(cell: Text) -> int:
    return max((cell_len(word) for word in cell.plain.split()), default=0)


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str | Text]],
    whole: Collection[str] = (),
    title: str | None = None,
    room: int | None = None,
) -> None:
    """A borderless table in which nothing a person copies or greps is ever broken.

    Cells are markup (escape what is not) or ``Text``. Columns named in ``whole`` (ids,
    URLs, paths, times) never wrap, and the others wrap only between words, so no word is
    ever split either. Piped output gets the table's full width; on a terminal too narrow
    for that, the table is printed as a list instead, one ``column: value`` line each.
    ``room``: the width to fit (default: the terminal's; unlimited when not a terminal).
    """
    cells = [[Text.from_markup(c) if isinstance(c, str) else c for c in row] for row in rows]
    heads = [Text(h) for h in headers]
    widest = [
        max([_plain_width(heads[i]), *(_plain_width(r[i]) for r in cells)])
        for i in range(len(headers))
    ]
    least = [
        widest[i]
        if headers[i] in whole
        else max([_longest_word(heads[i]), *(_longest_word(r[i]) for r in cells)])
        for i in range(len(headers))
    ]
    if room is None and out.is_terminal:
        room = out.width
    gaps = GAP * (len(headers) - 1)
    if room is not None and sum(least) + gaps > room:
        _as_list(headers, cells, title, room)
        return
    widths = widest if room is None else _share(least, widest, room - gaps)
    grid = Table(box=None, header_style="bold", pad_edge=False, title=title)
    for header, width in zip(headers, widths, strict=True):
        grid.add_column(header, width=width, no_wrap=header in whole, overflow="fold")
    for row in cells:
        grid.add_row(*row)
    total = sum(widths) + gaps
    if total > out.width:  # piped: as wide as it needs to be, never cut to 160 columns
        wide = Console(highlight=False, soft_wrap=True, width=total, file=out.file,
                       force_terminal=out.is_terminal, color_system=out.color_system)  # fmt: skip
        wide.print(grid)
    else:
        out.print(grid)


def _share(least: list[int], widest: list[int], room: int) -> list[int]:
    """Column widths from their least (``least``) toward their widest, within ``room``."""
    if sum(widest) <= room:
        return list(widest)
    spare = room - sum(least)
    want = [w - m for w, m in zip(widest, least, strict=True)]
    total = sum(want) or 1
    widths = [m + spare * x // total for m, x in zip(least, want, strict=True)]
    return widths


def _as_list(headers: Sequence[str], cells: list[list[Text]], title: str | None, room: int) -> None:
    """The table as records: the first column's value, then the others as ``column: value``
    packed into indented lines of at most ``room`` columns; a field longer than that gets a
    line of its own and is never broken (the terminal may fold it, a copy stays whole)."""
    if title:
        out.print(f"[bold]{escape(title)}[/bold]")
    for row in cells:
        (first_header, first), *rest = zip(headers, row, strict=True)
        out.print(Text.assemble((f"{first_header}: ", "bold"), first))
        line: list[Text] = []
        used = 2
        for header, cell in rest:
            if not cell.plain.strip():
                continue
            field = Text.assemble((f"{header}: ", "dim"), cell)
            need = cell_len(field.plain) + (3 if line else 0)
            if line and used + need > room:
                out.print(Text.assemble("  ", Text(" · ").join(line)))
                line, used = [], 2
                need = cell_len(field.plain)
            line.append(field)
            used += need
        if line:
            out.print(Text.assemble("  ", Text(" · ").join(line)))


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
    rows = []
    for s in report["steps"]:
        mark = {
            "ok": "[green]ok[/green]",
            "would-pass": "[green]would-pass[/green]",
            "failed": "[red]FAILED[/red]",
            "would-block": "[red]would-block[/red]",
        }.get(s["outcome"], f"[yellow]{escape(str(s['outcome']))}[/yellow]")
        rows.append(
            [
                escape(s["name"]),
                f"[dim]{escape(str(s['started_at']))}[/dim]",
                f"{s['seconds']:.2f}s",
                mark,
                escape(str(s["detail"])),
            ]
        )
    table(
        ("step", "started", "took", "outcome", "detail"),
        rows,
        whole=("started", "took", "outcome"),
    )
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
    rows = [
        [
            str(e.seq),
            f"{e.at:%m-%d %H:%M:%S}",
            escape(e.env or ""),
            escape(e.action),
            escape(e.status),
            escape(e.incident or ""),
            escape(journal_detail(e.action, e.details)),
        ]
        for e in entries
    ]
    table(
        ("#", "at (UTC)", "env", "action", "status", "incident", "detail"),
        rows,
        whole=("#", "at (UTC)", "env", "action", "status", "incident"),
    )


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
    cols = ("incident", "model", "env", "phase", "from -> to", "age", "outcome", "bake", "run")
    lines = []
    for r in rows:
        outcome = r.outcome or "OPEN"
        colour = OUTCOME_COLOUR.get(r.outcome, "red")
        forced = " (forced)" if r.forced else ""
        lines.append(
            [
                escape(r.incident),
                escape(r.model),
                escape(r.env),
                escape(str(r.phase)),
                escape(f"{r.from_version or '-'} -> {r.to_version or '-'}"),
                age(r.age_seconds()),
                f"[{colour}]{escape(outcome)}[/{colour}]{forced}",
                escape(r.bake_words()),
                escape(r.run_url or r.flow_run_id or "-"),
            ]
        )
    table(cols, lines, whole=("incident", "model", "env", "phase", "age", "run"))


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
    rows = [
        [str(t["seq"]), t["at"][5:19].replace("T", " "), escape(t["action"]),
         escape(t["status"]), escape(t["actor"] or ""), escape(t["detail"])]
        for t in doc["timeline"]
    ]  # fmt: skip
    table(
        ("#", "at (UTC)", "action", "status", "by", "detail"),
        rows,
        whole=("#", "at (UTC)", "action", "status", "by"),
        title="timeline",
    )
    for d in doc["decisions"]:
        out.print(
            f"decision: {d['status']} ({d.get('how')}) by {escape(str(d.get('by') or '-'))}"
            + (f": {escape(str(d['comment']))}" if d.get("comment") else "")
        )
    for v in doc["verifications"]:
        out.print(f"verification: {v['status']} {escape(str(v.get('detail') or v.get('summary')))}")
    notices = doc["notices"]
    if notices.get("summary"):
        out.print(f"notices: {escape(notice_words(notices))}")
    for f in notices["failed"]:
        out.print(
            f"  [yellow]not delivered[/yellow]: {f.get('event')} to {escape(str(f.get('channel')))}"
            f": {escape(str(f.get('error')))}"
        )
    out.print(f"post-mortem: {escape(doc.get('postmortem') or '-')}")


def notice_words(notices: dict[str, Any]) -> str:
    """``3 sent to Slack, 1 in the local outbox (no Slack token), 1 not delivered``: a
    message written to the local outbox is never called sent or delivered."""
    n = notices.get("summary") or {}
    where = notices.get("where")
    if not where:
        return f"{n.get('delivered')}/{n.get('total')} delivered"
    parts = []
    if where["slack"]:
        parts.append(f"{where['slack']} sent to Slack")
    if where["local_outbox"]:
        parts.append(f"{where['local_outbox']} in the local outbox (no Slack token)")
    if where["not_delivered"]:
        parts.append(
            f"{where['not_delivered']} not delivered (queued for `runbook outbox --retry`)"
        )
    return ", ".join(parts) or "none"


# -- drill -----------------------------------------------------------------------------


def drill_report(report: dict[str, Any]) -> None:
    verdict = "[bold green]PASS[/bold green]" if report["passed"] else "[bold red]FAIL[/bold red]"
    out.print(
        f"\n[bold]drill[/bold] {report['drill']} · {report['model']} in {report['env']} · "
        f"scenario {report['scenario']}: {verdict}"
    )
    if report.get("injected"):
        out.print(f"injected: {escape(str(report['injected']))}")
    table(
        ("check", "result", "detail"),
        [
            [
                escape(c["name"]),
                "[green]pass[/green]" if c["passed"] else "[red]FAIL[/red]",
                escape(str(c["detail"])),
            ]
            for c in report["checks"]
        ],
        whole=("result",),
    )
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
    lines = []
    for r in rows:
        if r.get("secret"):  # never the value: whether it is set, and from where
            value = "unset" if r["value"] is None else str(r["value"])
        else:
            value = "-" if r["value"] is None else str(r["value"])
        lines.append(
            [escape(r["scope"]), escape(r["name"]), escape(r["variable"]), escape(value),
             escape(r["source"])]
        )  # fmt: skip
    table(
        ("for", "setting", "variable", "value", "from"),
        lines,
        whole=("for", "setting", "variable", "value", "from"),
    )


# -- init ------------------------------------------------------------------------------


def init_done(folder: str, written: list[str], demo_registry: str | None = None) -> None:
    """What `runbook init` wrote and what to run next; ``demo_registry`` is where
    `runbook demo` keeps its journal (its own registry, not the runbook's)."""
    out.print(f"wrote a starter project in [bold]{escape(folder)}[/bold]:")
    for name in written:
        out.print(f"  {escape(name)}")
    out.print("\nnext:")
    out.print(f"  cd {escape(folder)}")
    out.print("  runbook validate                         # check the runbook")
    out.print("  runbook demo                             # break the example model, roll back")
    history = "runbook history churn-classifier"
    if demo_registry:
        history += f" --registry '{demo_registry}'"
        out.print(f"  {escape(history)}")
        out.print("      # the demo's journal (it keeps a registry of its own): what was live, why")
    else:
        out.print(f"  {history}         # what was live when, and why")
    out.print("  runbook stack                            # Prefect server, UI, worker, receiver")
