"""Every command's --help reads cleanly: each option explained, no type label on flags,
no description broken at the source's line width."""

from __future__ import annotations

import itertools

import pytest
import typer.main
from typer.testing import CliRunner

from rollback_runbook.cli import app
from rollback_runbook.cli.app import COMMANDS

runner = CliRunner()
COMMAND = typer.main.get_command(app)


def help_of(name: str, width: int) -> str:
    res = runner.invoke(app, [name, "--help"], env={"COLUMNS": str(width), "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_page_is_clean(name):
    command = COMMAND.commands[name]
    for param in command.params:
        assert (getattr(param, "help", None) or "").strip(), f"{name}: {param.name} has no help"
    narrow = help_of(name, 80)
    assert "<bool>" not in narrow and "BOOLEAN" not in narrow
    # at 200 columns, a prose line that ends far short of the width and goes on lower-case
    # in the next line is a line break the source's width put there
    lines = [line.strip() for line in help_of(name, 200).splitlines()]
    prose = [line for line in lines if line and not line.startswith(("│", "╭", "╰", "Usage"))]
    for first, second in itertools.pairwise(prose):
        ended_early = len(first) < 150 and not first.endswith((".", ":"))
        assert not (ended_early and second[:1].islower()), (name, first)


def test_the_top_level_help_lists_every_command():
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "120"}).output
    for name in COMMANDS:
        assert name in out
