"""`runbook init DIR`: a starter project, written the way `prefect init` does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rollback_runbook.cli import app
from rollback_runbook.starter import starter_files

runner = CliRunner()


def test_init_writes_the_starter_project_and_says_what_next(tmp_path):
    res = runner.invoke(app, ["init", str(tmp_path / "proj")])
    assert res.exit_code == 0, res.output
    names = {name for name, _ in starter_files()}
    assert {
        "prefect.yaml",
        "runbooks/churn-classifier.yaml",
        "runbooks/expectations/churn-classifier.json",
        "runbooks/data/churn-golden.csv",
        "runbooks/templates/postmortem.md.j2",
    } <= names
    for name in names:
        assert (tmp_path / "proj" / name).is_file()
        assert name in res.output
    assert "runbook validate" in res.output
    deploy = (tmp_path / "proj" / "prefect.yaml").read_text()
    assert "entrypoint: flows.rollback:rollback" in deploy and "flows/rollback.py" not in deploy
    assert "entrypoint: flows/" not in deploy  # every deployment, reconcile and bake too


def test_init_refuses_a_folder_that_is_not_empty_unless_forced(tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["init", str(folder)])
    assert res.exit_code == 2
    assert "not empty" in res.output and "--force" in res.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    res = runner.invoke(app, ["init", str(folder), "--force"])
    assert res.exit_code == 0, res.output
    assert (folder / "runbooks" / "churn-classifier.yaml").is_file()
    assert (folder / "notes.txt").read_text() == "mine"


def test_init_refuses_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    res = runner.invoke(app, ["init", str(target)])
    assert res.exit_code == 2 and "not a folder" in res.output


# -- a team's own model -----------------------------------------------------------------------


def _runbook_cli(project, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `runbook`, run in the project folder as a person would: no PYTHONPATH."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env = {k: v for k, v in env.items() if not k.startswith("RUNBOOK_")}
    return subprocess.run(
        [str(Path(sys.executable).parent / "runbook"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # subprocesses: runs in CI, skipped by -m 'not slow'
def test_init_model_adds_a_second_model_that_validates_with_its_own_predictor(tmp_path):
    project = tmp_path / "team"
    assert runner.invoke(app, ["init", str(project)]).exit_code == 0
    assert ".venv/bin/prefect" not in (project / "prefect.yaml").read_text()
    res = runner.invoke(app, ["init", str(project), "--model", "fraud-scorer"])
    assert res.exit_code == 0, res.output
    for name in (
        "runbooks/fraud-scorer.yaml",
        "runbooks/expectations/fraud-scorer.json",
        "runbooks/data/fraud-scorer-golden.csv",
        "my_models/fraud_scorer.py",
    ):
        assert (project / name).is_file() and name in res.output
    import yaml

    book = yaml.safe_load((project / "runbooks" / "fraud-scorer.yaml").read_text())
    assert book["model"] == "fraud-scorer"
    assert book["verify"]["predictor"] == "my_models.fraud_scorer:predict"
    assert book["alerts"]["match_labels"] == {"model": "fraud-scorer"}
    assert "serving" not in book["environments"]["staging"]
    assert book["approval"]["two_person_rule"] is True

    # the project's own module imports from the project folder, with no PYTHONPATH
    checked = _runbook_cli(project, "validate", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert {r["model"] for r in json.loads(checked.stdout)["files"] if r["ok"]} == {
        "churn-classifier",
        "fraud-scorer",
    }

    again = runner.invoke(app, ["init", str(project), "--model", "fraud-scorer"])
    assert again.exit_code == 2 and "has a runbook" in again.output
    bad = runner.invoke(app, ["init", str(project), "--model", "Fraud Scorer"])
    assert bad.exit_code == 2 and "lower-case" in bad.output


@pytest.mark.slow
def test_a_missing_predictor_module_is_named_with_its_quotes(tmp_path):
    project = tmp_path / "team"
    assert runner.invoke(app, ["init", str(project)]).exit_code == 0
    path = project / "runbooks" / "churn-classifier.yaml"
    path.write_text(
        path.read_text().replace(
            "rollback_runbook.example.churn:predict", "my_models.fraud:predict"
        )
    )
    res = _runbook_cli(project, "validate")
    assert res.returncode == 2  # a runbook that does not check out is bad input
    assert "No module named 'my_models'" in res.stdout + res.stderr, res.stdout


def test_predictor_answers_are_checked_against_the_interface():
    import pandas as pd
    import pytest

    from rollback_runbook.example.churn import predict
    from rollback_runbook.predictor import Predictor, PredictorError, check_predictions

    assert isinstance(predict, Predictor)
    frame = pd.DataFrame({"x": [1, 2, 3]}, index=[10, 11, 12])
    good = pd.DataFrame(
        {"prediction": [0, 1, 0], "probability": [0.1, 0.9, 0.2]}, index=frame.index
    )
    check_predictions(frame, good)
    for out, problem in (
        ([0, 1, 0], "not a pandas DataFrame"),
        (good.drop(columns="prediction"), "no 'prediction' column"),
        (good.iloc[:2], "2 rows for 3"),
        (good.reset_index(drop=True), "indexed unlike"),
        (good.assign(probability=[0.1, 1.5, 0.2]), "in [0, 1]"),
    ):
        with pytest.raises(PredictorError, match=re.escape(problem)):
            check_predictions(frame, out)
