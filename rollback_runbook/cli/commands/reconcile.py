"""``runbook reconcile``: does every serving target serve what its registry pointer says?"""

from __future__ import annotations

from typing import Annotated

import typer

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt, all_runbooks, check_env, fail, load

MARK = {
    "in_sync": "ok",
    "settling": "settling",
    "repaired": "REPAIRED",
    "detected": "DRIFT",
    "repair_failed": "DRIFT",
    "unreachable": "UNREACHABLE",
    "no_pointer": "-",
}


def reconcile(
    model: Annotated[
        str | None, typer.Argument(help="Model name or runbook path (default: every runbook)")
    ] = None,
    env: Annotated[str | None, typer.Option("--env", help="Only this environment")] = None,
    settle: Annotated[
        float,
        typer.Option(
            "--settle",
            min=0,
            help="Seconds a just-moved pointer is given to be followed before a mismatch "
            "counts as drift",
        ),
    ] = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Compare each environment's pointer with what its serving target serves; repair drift.

    Environments whose runbook says `on_drift: repair` (the default) get the pointer's
    version activated again; `on_drift: report` only journals and tells. Every change is one
    `drift` journal entry and one message. Exit 0 in sync or repaired, 1 drift left, 3 a
    target or registry could not be read. The `reconcile` deployment runs the same every 30 s.
    """
    from flows.drift import exit_code, settle_all
    from flows.drift import reconcile as run

    if model is not None:
        book = load(model)  # a bad name or file: exit 2 with every problem, before anything runs
        if env:
            check_env(book, env)
    elif env:
        books, _ = all_runbooks()
        known = sorted({name for b in books for name in b.environments})
        if env not in known:
            from flows.config import quote

            raise fail(
                f"unknown environment {quote(env)}: no runbook has it; known: "
                + (", ".join(known) or "none")
            )
    settled = settle_all([model] if model else None, env=env)
    checks = run([model] if model else None, env=env, settle=settle)
    code = exit_code(checks)
    if as_json:
        render.print_json(
            {
                "ok": code == 0,
                "exit_code": code,
                "settled": settled,
                "checks": [c.model_dump() for c in checks],
            }
        )
        raise typer.Exit(code)
    for line in settled:
        render.out.print(f"{'SETTLED':>11}  {line}", markup=False, highlight=False, soft_wrap=True)
    if not checks:
        render.say("no environment with a serving target" + (f" named {env}" if env else ""))
    else:
        for check in checks:
            line = f"{MARK[check.status]:>11}  {check.summary()}"
            render.out.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)
