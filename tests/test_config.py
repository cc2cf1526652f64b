"""Runbook files: every problem named with file, field path and expectation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from flows.config import RunbookError, load_runbook, parse_duration
from tests.conftest import PROJECT_ROOT, write_runbook


def test_shipped_runbook_is_valid():
    rb = load_runbook(PROJECT_ROOT / "runbooks" / "churn-classifier.yaml")
    assert rb.model == "churn-classifier"
    assert rb.threshold_for("latency_p99_ms").for_ == 300
    assert rb.approval.role_of("U03OPS") == "ops_lead"
    assert rb.cooldown == 1800


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5m", 300), ("2h", 7200), (45, 45), ("1.5m", 90)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def _problems(path):
    with pytest.raises(RunbookError) as exc:
        load_runbook(path)
    return exc.value.problems


def test_unknown_key_is_an_error_with_its_path(tmp_path):
    path = write_runbook(tmp_path, approval={"timeuot": "5m"})
    problems = _problems(path)
    assert any(p.startswith("approval.timeuot: unknown key") for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_runbook(
        tmp_path,
        triggers=[{"metric": "accuracy", "below": 0.9, "above": 0.1}, {"metric": "x"}],
        cooldown="soon",
        approval={"on_timeout": "shrug"},
    )
    problems = _problems(path)
    joined = "\n".join(problems)
    assert "triggers.0: give exactly one of 'below' or 'above'" in joined
    assert "triggers.1" in joined
    assert "cooldown: expected a duration" in joined
    assert "approval.on_timeout" in joined
    assert len(problems) >= 4


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\nenvironments: [\n")
    (problem,) = _problems(path)
    assert "line" in problem and "not valid YAML" in problem


def test_model_name_cannot_traverse_paths(tmp_path):
    path = write_runbook(tmp_path, model="../../etc")
    assert any(p.startswith("model: invalid model name") for p in _problems(path))


def test_missing_suite_file_is_named(tmp_path):
    path = write_runbook(tmp_path, verify={"suite": "expectations/nope.json"})
    (problem,) = _problems(path)
    assert problem.startswith("verify.suite: file not found")


def test_registry_url_must_be_file_or_s3(tmp_path):
    path = write_runbook(tmp_path, environments={"production": {"registry": "http://x"}})
    assert any("environments.production.registry" in p for p in _problems(path))


def test_validate_command_reports_and_exits_nonzero(tmp_path):
    good = write_runbook(tmp_path)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = write_runbook(bad_dir, restore={"to": "../v1"}, extra_key=1)
    cmd = [sys.executable, "-m", "rollback_runbook.cli", "validate", str(good), str(bad), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] is False
    by_file = {f["file"]: f for f in doc["files"]}
    assert by_file[str(good)]["ok"] is True
    problems = by_file[str(bad)]["problems"]
    assert any(p.startswith("extra_key: unknown key") for p in problems)
    assert any(p.startswith("restore.to: invalid version") for p in problems)
    text = subprocess.run(cmd[:-1], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert f"{bad}: extra_key: unknown key" in text.stdout


def test_shipped_runbooks_validate_from_the_cli():
    res = subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", "validate"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout


def test_runbook_yaml_roundtrip_keeps_for_alias(tmp_path):
    path = write_runbook(tmp_path)
    data = yaml.safe_load(path.read_text())
    assert data["triggers"][1]["for"] == "5m"
