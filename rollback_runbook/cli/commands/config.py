"""``runbook config``: every setting, its value and where it came from."""

from __future__ import annotations

from rollback_runbook.cli import render
from rollback_runbook.cli.common import JsonOpt


def config(as_json: JsonOpt = False) -> None:
    """Print every setting (runbook and receiver), its value and source; secrets as ****."""
    from rollback_runbook.config_report import all_settings

    render.config_table(all_settings(), as_json)
