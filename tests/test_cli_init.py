"""`runbook init DIR`: a starter project, written the way `prefect init` does."""

from __future__ import annotations

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
