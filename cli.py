"""``runbook``: the command line of the rollback runbook.

Every command prints a result a person can read at a glance, and ``--json`` prints the
same as one JSON document for machines. Exit codes: 0 done (or nothing needed doing),
1 the rollback or check failed, 2 bad input (a runbook, a version, an argument).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="runbook",
    help="Roll ML models back to their last known good version, verified, with a post-mortem.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: a line piped to a file or grep stays one line; tables get room when not on a TTY
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")]
EnvOpt = Annotated[str, typer.Option("--env", help="Environment (production, staging, ...).")]
RegistryOpt = Annotated[
    str | None, typer.Option("--registry", help="Use this registry URL instead of the runbook's.")
]


def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    import logging

    logging.getLogger("great_expectations").setLevel(logging.WARNING)


def _fail(message: str, code: int = 2, as_json: bool = False) -> typer.Exit:
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _load(model: str, as_json: bool = False):
    from flows.config import RunbookError, find_runbook

    try:
        return find_runbook(model)
    except (RunbookError, ValueError) as e:
        raise _fail(str(e), 2, as_json) from None


def _registry(book, env: str, override: str | None, as_json: bool = False):
    from blocks.registry import RegistryError, open_registry
    from flows.config import RunbookError

    try:
        return open_registry(override or book.environment(env).registry, book.model)
    except (RegistryError, RunbookError) as e:
        raise _fail(str(e), 2, as_json) from None


# -- validate --------------------------------------------------------------------------


@app.command()
def validate(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Runbook files (default: runbooks/*.yaml)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check runbook files; report every problem with file, field and expectation."""
    from flows.config import RunbookError, load_runbook
    from rollback_runbook.settings import runbooks_dir

    folder = runbooks_dir()
    paths = files or sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    results = []
    for path in paths:
        try:
            rb = load_runbook(path)
            results.append({"file": str(path), "ok": True, "model": rb.model, "problems": []})
        except RunbookError as e:
            results.append({"file": str(path), "ok": False, "problems": e.problems})
    bad = [r for r in results if not r["ok"]]
    if as_json:
        print(json.dumps({"ok": not bad, "files": results}, indent=2))
    else:
        for r in results:
            if r["ok"]:
                out.print(f"[green]ok[/green]   {r['file']} ({r['model']})")
            else:
                out.print(f"[red]FAIL[/red] {r['file']}")
                for p in r["problems"]:
                    out.print(f"       {r['file']}: {p}")
        if not results:
            out.print("no runbook files found")
    raise typer.Exit(1 if bad or not results else 0)


# -- rollback --------------------------------------------------------------------------


def _print_report(report: dict[str, Any]) -> None:
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
        table.add_row(s["name"], s["started_at"], f"{s['seconds']:.2f}s", mark, s["detail"])
    out.print(table)
    v = report.get("verification")
    if v:
        out.print(f"\n[bold]verification[/bold] ({v['version']}): {v['summary']}")
        for e in v.get("expectations", []):
            sign = "[green]pass[/green]" if e["success"] else "[red]FAIL[/red]"
            col = f" {e['column']}" if e.get("column") else ""
            out.print(
                f"  {sign} {e['expectation']}{col}: observed {e['observed']} ({e['expected']})"
            )
    verdict = report["outcome"].upper().replace("_", " ")
    out.print(f"\n[bold {colour}]{verdict}[/bold {colour}]: {report['reason']}")
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


def run_rollback_flow(**params: Any) -> dict[str, Any]:
    """Run the rollback flow in this process (against PREFECT_API_URL or a temporary server)."""
    from flows.rollback import rollback as rollback_flow

    state = rollback_flow(**params, return_state=True)
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException) or not isinstance(data, dict):
        raise RuntimeError(f"rollback run ended {state.type.value}: {state.message or data}")
    return data


@app.command()
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
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Roll MODEL back now: a manual trigger through the whole runbook."""
    moment = None
    if as_of:
        try:
            moment = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
        except ValueError:
            raise _fail(
                f"--as-of {as_of!r} is not an ISO time such as 2026-11-20T10:00Z", 2, as_json
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        if to:
            raise _fail("give --to or --as-of, not both", 2, as_json)
    _quiet_env()
    book = _load(model, as_json)
    _registry(book, env, registry, as_json)
    who = requested_by or os.environ.get("USER") or "cli"
    from flows.steps.approval import auto_decision
    from flows.steps.trigger import Trigger

    manual = Trigger(source="manual", requested_by=who, reason=reason or "manual")
    if (
        not dry_run
        and not os.environ.get("PREFECT_API_URL")
        and auto_decision(book.approval, manual) is None
    ):
        raise _fail(
            f"the {book.model} runbook asks a person to approve manual rollbacks, and without "
            "a Prefect server nobody could: start `runbook stack`, export PREFECT_API_URL, and "
            "approve in the UI or with `runbook approve` (or use --dry-run)",
            2,
            as_json,
        )
    report = run_rollback_flow(
        runbook=book.source or model,
        environment=env,
        target_version=to,
        requested_by=who,
        reason=reason or f"manual rollback by {who}",
        dry_run=dry_run,
        registry_url=registry,
        as_of=moment,
    )
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    raise typer.Exit(0 if report["outcome"] in ("restored", "dry_run") else 1)


# -- history ---------------------------------------------------------------------------


@app.command()
def history(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    env: Annotated[str | None, typer.Option("--env", help="Only this environment")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Newest N journal records")] = 50,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What was live when, and why: the registry's journal, newest first.

    Each environment's live version is read from its own registry; the journal is the one
    of ENV's registry (default: the runbook's first environment).
    """
    book = _load(model, as_json)
    reg = _registry(book, env or next(iter(book.environments)), registry, as_json)
    entries = [e for e in reg.journal(limit=limit) if env is None or e.env in (env, None)]
    pointers = {
        name: _registry(book, name, registry, as_json).pointer(name) for name in book.environments
    }
    if as_json:
        print(
            json.dumps(
                {
                    "model": book.model,
                    "live": {
                        k: (p.model_dump(mode="json") if p else None) for k, p in pointers.items()
                    },
                    "journal": [e.model_dump(mode="json") for e in entries],
                },
                indent=2,
            )
        )
        return
    out.print(f"[bold]{book.model}[/bold] · registry {reg.location()}")
    for name, p in pointers.items():
        live = (
            f"[bold]{p.version}[/bold] since {p.updated_at:%Y-%m-%d %H:%M:%S}Z by {p.updated_by}"
            if p
            else "-"
        )
        out.print(f"  {name}: {live}")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("#", "at (UTC)", "env", "action", "status", "incident", "detail"):
        table.add_column(col, overflow="fold")
    for e in entries:
        d = e.details
        if e.action in ("pointer", "restore", "undo", "promote") and "to" in d:
            detail = f"{d.get('from') or '-'} -> {d['to']}"
            if d.get("reason"):
                detail += f" ({d['reason']})"
        else:
            detail = (
                d.get("reason") or d.get("summary") or d.get("location") or d.get("version") or ""
            )
            if e.action == "approval":
                detail = f"{d.get('how')} {d.get('by') or ''} {d.get('comment') or ''}".strip()
        table.add_row(
            str(e.seq),
            f"{e.at:%m-%d %H:%M:%S}",
            e.env or "",
            e.action,
            e.status,
            e.incident or "",
            str(detail),
        )
    out.print(table)


# -- registry feeding ------------------------------------------------------------------


@app.command()
def publish(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    path: Annotated[Path, typer.Argument(help="Folder with the artifact file(s) and config")],
    version: Annotated[str, typer.Option("--version", "-v", help="Version name")],
    env: EnvOpt = "production",
    created_by: Annotated[str | None, typer.Option("--by", help="Who publishes")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register PATH as a new immutable version of MODEL."""
    from blocks.registry import RegistryError

    book = _load(model, as_json)
    reg = _registry(book, env, registry, as_json)
    versions = reg.list_versions()
    try:
        m = reg.publish(
            version,
            path,
            created_by=created_by or os.environ.get("USER", "cli"),
            parent=versions[-1] if versions else None,
        )
    except RegistryError as e:
        raise _fail(str(e), 2, as_json) from None
    if as_json:
        print(m.model_dump_json(indent=2))
    else:
        out.print(
            f"published {book.model} {m.version} ({len(m.files)} files, {m.total_bytes} bytes) "
            f"in {reg.location()}"
        )


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="Model name or runbook path")],
    version: Annotated[str, typer.Argument(help="Version to make live")],
    env: EnvOpt = "production",
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Run the runbook's checks after")
    ] = True,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move ENV's pointer to VERSION (checksums checked, journaled), then verify it."""
    from blocks.registry import RegistryError
    from flows.operations import promote as do_promote

    _quiet_env()
    book = _load(model, as_json)
    reg = _registry(book, env, registry, as_json)
    try:
        moved, result = do_promote(
            reg, book, version, env, by=os.environ.get("USER", "cli"), verify=verify
        )
    except RegistryError as e:
        raise _fail(str(e), 2, as_json) from None
    if as_json:
        print(
            json.dumps(
                {
                    "pointer": moved.model_dump(mode="json"),
                    "verification": result.model_dump(mode="json") if result else None,
                },
                indent=2,
            )
        )
    else:
        out.print(f"{book.model} {env}: {moved.previous or '-'} -> [bold]{moved.version}[/bold]")
        if result:
            out.print(f"verification: {result.summary()}")
    raise typer.Exit(0 if result is None or result.passed else 1)


@app.command()
def approve(
    flow_run_id: Annotated[str, typer.Argument(help="The paused rollback run's id")],
    approver: Annotated[str, typer.Option("--as", help="Your identity as listed in the runbook")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approve")] = False,
    comment: Annotated[str, typer.Option("--comment")] = "",
) -> None:
    """Answer a paused rollback run's approval form (needs PREFECT_API_URL)."""
    from uuid import UUID

    import httpx
    from prefect.exceptions import NotPausedError, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        raise _fail(f"{flow_run_id!r} is not a flow run id") from None
    if not os.environ.get("PREFECT_API_URL"):
        raise _fail("set PREFECT_API_URL to the server the paused run is on")
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
        raise _fail(
            f"run {flow_run_id} is not waiting for approval (finished, expired "
            "or already answered); nothing was changed",
            1,
        ) from None
    except ObjectNotFound:
        raise _fail(f"no flow run {flow_run_id} on {os.environ['PREFECT_API_URL']}") from None
    except (httpx.HTTPError, OSError) as e:
        raise _fail(f"cannot reach {os.environ['PREFECT_API_URL']}: {e}", 1) from None
    out.print(f"{'rejected' if reject else 'approved'} run {flow_run_id} as {approver}")


@app.command()
def outbox(
    retry: Annotated[
        bool, typer.Option("--retry", help="Resend undelivered notifications")
    ] = False,
) -> None:
    """Show (or resend) notifications that could not be delivered."""
    from blocks.slack import default_notifier
    from flows.steps.notify import retry_undelivered
    from rollback_runbook.settings import state_dir

    queue = state_dir() / "outbox" / "undelivered.jsonl"
    if retry:
        sent, left = retry_undelivered(default_notifier())
        out.print(f"resent {sent}, still undelivered {left}")
        raise typer.Exit(0 if left == 0 else 1)
    lines = queue.read_text().splitlines() if queue.exists() else []
    for line in lines:
        item = json.loads(line)
        out.print(f"{item['at']} {item['channel']} {item['event']}: {item['error']}")
    out.print(f"{len(lines)} undelivered")


@app.command("seed-example")
def seed_example_cmd(
    env: EnvOpt = "production",
    reset: Annotated[
        bool, typer.Option("--reset", help="Empty the local example registry first")
    ] = False,
    healthy: Annotated[
        bool, typer.Option("--healthy", help="Leave ENV on the good 1.1.0 (a staging for drills)")
    ] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish the example churn versions; leave ENV on the degraded newest one."""
    _quiet_env()
    from flows.operations import seed_example

    book = _load("churn-classifier", as_json)
    url = registry or book.environment(env).registry
    if reset:
        _reset_local(url, book.model)
    reg = _registry(book, env, url, as_json)
    if reg.list_versions():
        raise _fail(f"{reg.location()} already has versions; use --reset to start over", 2, as_json)
    versions = seed_example(reg, book, env, healthy=healthy)
    live = reg.pointer(env)
    if as_json:
        print(json.dumps({"versions": versions, "live": live.version, "registry": reg.location()}))
    else:
        state = "healthy" if healthy else "degraded"
        out.print(
            f"published {', '.join(versions)} in {reg.location()}; {env} is on "
            f"[bold]{live.version}[/bold] ({state})"
        )


def _reset_local(url: str, model: str) -> None:
    """Empty a local registry, but only one under the state folder (the embedded default)."""
    if not url.startswith("file://"):
        raise _fail(f"--reset only empties local registries under the state folder, not {url}")
    from blocks.local import LocalRegistry
    from rollback_runbook.settings import state_dir

    root = Path(LocalRegistry.from_url(url, model).root)
    if root.exists():
        if not root.resolve().is_relative_to(state_dir().resolve()):
            raise _fail(f"refusing to reset {root}: only registries under {state_dir()} are reset")
        shutil.rmtree(root)


# -- demo ------------------------------------------------------------------------------


@app.command()
def demo(
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seed the example registry, promote a degraded version, raise the alert, roll back."""
    _quiet_env()
    from blocks.registry import JournalEntry
    from flows.operations import seed_example
    from flows.steps.trigger import Trigger
    from flows.steps.verify import measure_accuracy

    t0 = time.perf_counter()
    book = _load("churn-classifier", as_json)
    url = registry or book.environment("production").registry
    if url.startswith("file://"):
        from blocks.local import LocalRegistry
        from rollback_runbook.settings import state_dir

        root = Path(LocalRegistry.from_url(url, book.model).root)
        if root.exists():
            if not root.resolve().is_relative_to(state_dir().resolve()):
                raise _fail(
                    f"refusing to reset {root}: the demo only resets registries under {state_dir()}"
                )
            shutil.rmtree(root)
    reg = _registry(book, "production", url, as_json)
    say = (lambda *a: None) if as_json else out.print
    say(f"[bold]1/4[/bold] seeding {reg.location()} with the example churn-classifier versions ...")
    versions = seed_example(reg, book)
    live = reg.pointer("production")
    say(
        f"     published {', '.join(versions)}; "
        f"production is on [bold]{live.version}[/bold] (degraded)"
    )

    say("[bold]2/4[/bold] measuring live accuracy on the golden set ...")
    accuracy = measure_accuracy(book, reg, live.version)
    threshold = book.threshold_for("accuracy")
    say(f"     accuracy {accuracy:.3f} < {threshold.below} -> alert fires (severity critical)")
    reg.append(
        JournalEntry(
            action="alert",
            status="firing",
            env="production",
            details={"metric": "accuracy", "value": round(accuracy, 4)},
        )
    )
    trigger = Trigger(
        source="generic",
        metric="accuracy",
        value=round(accuracy, 4),
        severity="critical",
        fingerprint=f"demo-accuracy-{datetime.now(UTC):%Y%m%d%H%M%S}",
        started_at=datetime.now(UTC),
        labels={"model": book.model, "alertname": "ModelAccuracyLow"},
    )
    say("[bold]3/4[/bold] running the rollback flow on a local Prefect API ...")
    report = run_rollback_flow(
        runbook=book.source, environment="production", trigger=trigger, registry_url=registry
    )
    say("[bold]4/4[/bold] done")
    final = reg.pointer("production")
    good = (
        report["outcome"] == "restored"
        and final.version == report["to_version"]
        and bool(reg.verifications(final.version, "production")[-1].passed)
    )
    report["demo_seconds"] = round(time.perf_counter() - t0, 2)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
        out.print(
            f"demo wall time: {report['demo_seconds']:.1f}s · see the journal with "
            f"`runbook history {book.model}`"
        )
    raise typer.Exit(0 if good else 1)


def _print_drill(report: dict[str, Any]) -> None:
    verdict = "[bold green]PASS[/bold green]" if report["passed"] else "[bold red]FAIL[/bold red]"
    out.print(
        f"\n[bold]drill[/bold] {report['drill']} · {report['model']} in {report['env']} · "
        f"scenario {report['scenario']}: {verdict}"
    )
    if report.get("injected"):
        out.print(f"injected: {report['injected']}")
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for c in report["checks"]:
        table.add_row(
            c["name"], "[green]pass[/green]" if c["passed"] else "[red]FAIL[/red]", c["detail"]
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
    out.print(report["reason"])


@app.command()
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
    as_json: JsonOpt = False,
) -> None:
    """Run a drill now: the drill deployment on the server (start `runbook stack` first).

    Runs where the monthly schedule runs it (a worker, which has the receiver's secret),
    waits for it, and prints the report.
    """
    _quiet_env()
    if not os.environ.get("PREFECT_API_URL"):
        raise _fail(
            "a drill runs on the stack: start `runbook stack` and export PREFECT_API_URL",
            2,
            as_json,
        )
    from prefect.deployments import run_deployment

    book = _load(model, as_json)
    if scenario not in ("accuracy", "latency", "error_rate", "corrupted_artifact"):
        raise _fail(f"unknown scenario {scenario!r}", 2, as_json)
    params: dict[str, Any] = {"runbook": book.reference, "scenario": scenario}
    if env:
        params["environment"] = env
    if receiver_url:
        params["receiver_url"] = receiver_url
    if not as_json:
        err.print(f"drill {scenario} of {book.model}: waiting for the drill run ...")
    run = run_deployment("drill/drill", parameters=params, timeout=900)
    state = run.state
    report = state.result(raise_on_failure=False)
    if not isinstance(report, dict):
        raise _fail(f"drill run ended {state.type.value}: {state.message}", 1, as_json)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_drill(report)
    raise typer.Exit(0 if report["passed"] else 1)


@app.command()
def stack(
    port: Annotated[int, typer.Option("--port", help="Prefect server/UI port")] = 4200,
    receiver_port: Annotated[
        int, typer.Option("--receiver-port", help="Webhook receiver port")
    ] = 8787,
    no_receiver: Annotated[
        bool, typer.Option("--no-receiver", help="Do not start the receiver")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="Process workers to start")] = 1,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="PostgreSQL URL for the server (default: SQLite in .state)"
        ),
    ] = None,
) -> None:
    """Start the local stack: Prefect server, work pool, deployments, worker(s), receiver."""
    from stack import Stack

    s = Stack(
        port=port,
        receiver_port=None if no_receiver else receiver_port,
        workers=workers,
        database_url=database_url or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"),
        say=lambda m: out.print(m),
    )
    try:
        s.up()
        out.print("\n[bold]local stack is up[/bold] (Ctrl-C stops everything it started)")
        out.print(f"  Prefect UI        {s.ui_url}")
        out.print(f"  Prefect API       {s.api_url}   (export PREFECT_API_URL={s.api_url})")
        if s.receiver_url:
            out.print(f"  webhook receiver  {s.receiver_url}")
        out.print(f"  workers           {workers} on pool rollback-pool")
        out.print(f"  logs              {s.logs}")
        code = s.wait()
    except RuntimeError as e:
        err.print(f"[red]error:[/red] {e}")
        code = 1
    finally:
        out.print("stopping the local stack ...")
        s.down()
    raise typer.Exit(code)


def _mount_receiver() -> None:
    from intake.cli import serve

    app.command("serve")(serve)


_mount_receiver()


def main() -> None:
    from blocks.registry import RegistryError
    from flows.config import RunbookError

    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except (RegistryError, RunbookError) as e:  # bad input or an unreachable store: no traceback
        if "--json" in sys.argv:
            print(json.dumps({"ok": False, "error": str(e)}))
        err.print(f"[red]error:[/red] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
