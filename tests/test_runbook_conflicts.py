"""One runbook per model, strictly: a second file for a model disables both (issue 20).

Before, ``aa_shadow.yaml`` claiming ``churn-classifier`` with ``auto_approve: [critical]``
took the model over in the receiver because its name sorts first, and the real runbook
was the one disabled.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from flows.config import RunbookError, find_runbook, load_runbook, runbook_conflicts
from tests.conftest import MODEL, PROJECT_ROOT, write_runbook


@pytest.fixture
def two_books(tmp_path):
    folder = tmp_path / "runbooks"
    folder.mkdir()
    real = write_runbook(folder)
    data = yaml.safe_load(real.read_text())
    data["approval"]["auto_approve"] = ["critical", "drill"]
    shadow = folder / "aa_shadow.yaml"
    shadow.write_text(yaml.safe_dump(data, sort_keys=False))
    return folder, real, shadow


def test_two_files_for_one_model_disable_both(two_books):
    folder, real, shadow = two_books
    for path in (real, shadow):
        with pytest.raises(RunbookError) as exc:
            load_runbook(path)
        (problem,) = exc.value.problems
        assert "aa_shadow.yaml" in problem and f"{MODEL}.yaml" in problem
        assert "disable both" in problem
    with pytest.raises(RunbookError, match="aa_shadow.yaml"):
        find_runbook(MODEL, folder)


def test_runbook_conflicts_names_the_model_and_both_files(two_books):
    folder, real, shadow = two_books
    (line,) = runbook_conflicts(folder)
    assert repr(MODEL) in line and "aa_shadow.yaml" in line and real.name in line
    shadow.unlink()
    assert runbook_conflicts(folder) == []
    assert load_runbook(real).model == MODEL  # one file again: it loads


def test_a_link_to_the_same_runbook_is_no_conflict(tmp_path):
    folder = tmp_path / "runbooks"
    folder.mkdir()
    real = write_runbook(folder)
    (folder / "alias.yaml").symlink_to(real)
    assert runbook_conflicts(folder) == []
    assert load_runbook(real).model == MODEL


def test_the_receiver_disables_both_and_says_so(two_books):
    from intake.mapping import RunbookIndex

    folder, real, shadow = two_books
    index = RunbookIndex(folder, rescan_seconds=0)
    assert index.get(MODEL) is None  # neither takes the model over
    assert set(index.errors) == {real.name, shadow.name}
    assert all("disable both" in e for e in index.errors.values())


def test_validate_names_both_files(two_books):
    folder, real, shadow = two_books
    res = subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", "validate", "--shallow", "--json"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "RUNBOOK_RUNBOOKS_DIR": str(folder)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr  # bad runbooks are bad input
    import json

    files = json.loads(res.stdout)["files"]
    assert {os.path.basename(f["file"]) for f in files if not f["ok"]} == {
        real.name,
        shadow.name,
    }
    for f in files:
        assert any("aa_shadow.yaml" in p and real.name in p for p in f["problems"])


def test_healthz_lists_both_files_as_disabled(two_books):
    from starlette.testclient import TestClient

    from intake.app import create_app
    from tests.intake_fixtures import RecordingLauncher
    from tests.test_intake_alerts import make_settings

    folder, real, shadow = two_books
    app = create_app(make_settings(folder), launcher=RecordingLauncher())
    with TestClient(app) as client:
        health = client.get("/healthz").json()
    assert health["status"] == "degraded"
    assert set(health["runbook_errors"]) == {real.name, shadow.name}
    assert MODEL not in health["runbooks"]


def test_a_model_is_found_by_its_runbook_whatever_the_file_is_called(tmp_path):
    folder = tmp_path / "runbooks"
    folder.mkdir()
    path = write_runbook(folder)
    path.rename(folder / "churn.yaml")
    assert find_runbook(MODEL, folder).source.endswith("churn.yaml")
    with pytest.raises(RunbookError, match="no runbook for model"):
        find_runbook("fraud-scorer", folder)
