"""`runbook --help`, `validate` and `history` start without importing Prefect or GX."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

# imports the app, runs it, then says which heavy libraries got imported
WRAPPER = """
import sys
from rollback_runbook.cli.app import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
print("IMPORTED", "prefect" in sys.modules, "great_expectations" in sys.modules, file=sys.stderr)
"""


def imported(*args: str, env: dict[str, str] | None = None) -> tuple[bool, bool]:
    res = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    line = [x for x in res.stderr.splitlines() if x.startswith("IMPORTED")][-1]
    _, prefect, gx = line.split()
    return prefect == "True", gx == "True"


@pytest.mark.parametrize(
    "args", [["--help"], ["validate", "--shallow"], ["validate", "--shallow", "--json"]]
)
def test_light_commands_import_neither_prefect_nor_great_expectations(args):
    assert imported(*args) == (False, False)


def test_a_deep_validation_loads_the_suite_without_prefect():
    assert imported("validate") == (False, True)


def test_history_does_not_import_great_expectations(tmp_path):
    # it still imports prefect: the registries are Prefect Block types (blocks/local.py)
    import os

    env = {**os.environ, "RUNBOOK_STATE_DIR": str(tmp_path)}
    _prefect, gx = imported("history", "churn-classifier", env=env)
    assert not gx
