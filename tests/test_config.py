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


@pytest.mark.parametrize("text", ["5" + " " * 100 + "x", "1" * 65, "5 minutes", "-5m", True])
def test_durations_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


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


@pytest.mark.parametrize("model", ["churn\n", "churn\r"])
def test_a_name_ending_in_a_newline_is_refused(tmp_path, model):
    path = write_runbook(tmp_path, model=model)
    assert any(p.startswith("model: invalid model name") for p in _problems(path))


@pytest.mark.parametrize("env", ["production\n", "staging\r"])
def test_an_environment_name_ending_in_a_newline_is_refused(tmp_path, env):
    reg = f"file://{tmp_path / 'registry' / 'm'}"
    path = write_runbook(tmp_path, environments={env: {"registry": reg}})
    assert any("invalid environment name" in p for p in _problems(path)), _problems(path)


def test_missing_suite_file_is_named(tmp_path):
    path = write_runbook(tmp_path, verify={"suite": "expectations/nope.json"})
    (problem,) = _problems(path)
    assert problem.startswith("verify.suite: file not found")


def test_registry_url_must_be_file_or_s3(tmp_path):
    path = write_runbook(tmp_path, environments={"production": {"registry": "http://x"}})
    assert any("environments.production.registry" in p for p in _problems(path))


@pytest.mark.slow  # 5-25 s (subprocesses, servers, lease expiry): keeps `not slow` < 5 min
def test_validate_command_reports_and_exits_nonzero(tmp_path):
    good = write_runbook(tmp_path)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = write_runbook(bad_dir, restore={"to": "../v1"}, extra_key=1)
    cmd = [sys.executable, "-m", "rollback_runbook.cli", "validate", str(good), str(bad), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert res.returncode == 2, res.stderr  # a bad runbook is bad input
    doc = json.loads(res.stdout)
    assert doc["ok"] is False
    by_file = {f["file"]: f for f in doc["files"]}
    assert by_file[str(good)]["ok"] is True
    problems = by_file[str(bad)]["problems"]
    assert any(p.startswith("extra_key: unknown key") for p in problems)
    assert any(p.startswith("restore.to: invalid version") for p in problems)
    text = subprocess.run(cmd[:-1], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert f"{bad}: extra_key: unknown key" in text.stdout


@pytest.mark.slow
def test_shipped_runbooks_validate_from_the_cli():
    res = subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", "validate"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout


@pytest.mark.parametrize("key", ["schedule", "timezone"])
def test_drill_schedule_in_a_runbook_points_to_prefect_yaml(tmp_path, key):
    path = write_runbook(tmp_path, drill={key: "0 9 1 * *"})
    (problem,) = _problems(path)
    assert problem.startswith(
        f"drill.{key}: no longer read: when drills run is the 'drill' "
        "deployment's schedules in prefect.yaml"
    )


def test_the_drill_schedule_has_one_source():
    deployments = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]
    (drill,) = [d for d in deployments if d["name"] == "drill"]
    assert [s["cron"] for s in drill["schedules"]] == ["0 9 1 * *"]
    runbook = yaml.safe_load((PROJECT_ROOT / "runbooks" / "churn-classifier.yaml").read_text())
    assert not {"schedule", "timezone"} & set(runbook["drill"])


def test_runbook_yaml_roundtrip_keeps_for_alias(tmp_path):
    path = write_runbook(tmp_path)
    data = yaml.safe_load(path.read_text())
    assert data["triggers"][1]["for"] == "5m"


# -- deep check of the files a runbook names (``check_assets``) ---------------------------


def _book(tmp_path, **files):
    """A runbook in ``tmp_path`` whose named files are written there from ``files``."""
    from tests.conftest import RUNBOOKS_DIR

    sections = {"suite": "verify", "dataset": "verify", "template": "postmortem"}
    defaults = {
        "suite": (RUNBOOKS_DIR / "expectations" / "churn-classifier.json").read_text(),
        "dataset": (RUNBOOKS_DIR / "data" / "churn-golden.csv").read_text(),
        "template": "{{ model }}",
    }
    changes: dict = {"notify": {"user_notice_template": None}}
    for key, default in defaults.items():
        (tmp_path / key).write_text(files.get(key, default))
        changes.setdefault(sections[key], {})[key] = key
    changes["verify"]["predictor"] = files.get(
        "predictor", "rollback_runbook.example.churn:predict"
    )
    return load_runbook(write_runbook(tmp_path, **changes))


def test_shipped_runbook_assets_check_clean():
    from flows.config import check_assets

    assert check_assets(load_runbook(PROJECT_ROOT / "runbooks" / "churn-classifier.yaml")) == []


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% if %}", "postmortem.template: template, line 1: TemplateSyntaxError"),
        ("{{ x | no_such_filter }}", "TemplateAssertionError: \"No filter named 'no_such_filter'"),
        ('{% include "missing.j2" %}', "postmortem.template: missing.j2: TemplateNotFound"),
        ('{% include "part.j2" %}', "postmortem.template: part.j2, line 1: TemplateSyntaxError"),
        ('{% include "leak.j2" %}', "postmortem.template: leak.j2: SecurityError"),
    ],
)
def test_templates_must_compile(tmp_path, template, expected):
    from flows.config import check_assets

    (tmp_path / "part.j2").write_text("{% for %}")
    (tmp_path / "leak.j2").symlink_to("/proc/self/environ")
    problems = check_assets(_book(tmp_path, template=template))
    assert any(p.startswith(expected) or expected in p for p in problems), problems


def test_templates_render_with_sample_data_only_inside_the_sandbox(tmp_path):
    from flows.config import check_assets

    unsafe = "{{ model.__class__.__mro__ }}{{ undefined_name }}"
    (problem,) = check_assets(_book(tmp_path, template=unsafe))
    assert problem.startswith("postmortem.template: ") and "fails with sample data" in problem
    assert "SecurityError" in problem and "__class__" in problem  # the sandbox refused it


@pytest.mark.parametrize(
    ("suite", "expected"),
    [
        ("{not json", "verify.suite: not a readable JSON file"),
        ("[]", "verify.suite: expected a JSON object with a list of 'expectations'"),
        (
            json.dumps({"name": "s", "expectations": [{"type": "expect_nonsense", "kwargs": {}}]}),
            "verify.suite: expectations.0 ('expect_nonsense'): ",
        ),
        (
            json.dumps(
                {
                    "name": "s",
                    "expectations": [
                        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "a"}},
                        {"type": "expect_column_values_to_not_be_null", "kwargs": {}},
                    ],
                }
            ),
            "verify.suite: expectations.1 ('expect_column_values_to_not_be_null'): ",
        ),
        (json.dumps({"expectations": []}), "verify.suite: not a Great Expectations suite"),
    ],
)
def test_suite_must_be_one_great_expectations_accepts(tmp_path, suite, expected):
    from flows.config import check_assets

    problems = check_assets(_book(tmp_path, suite=suite))
    assert [p for p in problems if p.startswith(expected)] and len(problems) == 1, problems


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("", "verify.dataset: not a readable CSV file (EmptyDataError"),
        ("a,b\n", "verify.dataset: has no rows"),
        ("a,b\n1,2\n", "verify.dataset: has no label column 'label'"),
        ('a,"b\n1,2\n', "verify.dataset: not a readable CSV file"),
    ],
)
def test_dataset_must_be_a_csv_with_the_label(tmp_path, dataset, expected):
    from flows.config import check_assets

    problems = check_assets(_book(tmp_path, dataset=dataset))
    assert [p for p in problems if p.startswith(expected)] and len(problems) == 1, problems


@pytest.mark.parametrize(
    ("predictor", "expected"),
    [
        ("no_such_module_xyz:predict", "cannot import 'no_such_module_xyz' (ModuleNotFoundError"),
        (
            "rollback_runbook.example.churn:nope",
            "module 'rollback_runbook.example.churn' has no 'nope'",
        ),
        (
            "rollback_runbook.example.churn:FEATURES",
            "'rollback_runbook.example.churn:FEATURES' is not callable",
        ),
        ("one_argument:predict", "'one_argument:predict' must take (version_folder, frame)"),
        ("exits_on_import:f", "cannot import 'exits_on_import' (SystemExit"),
        ("broken_on_import:f", "cannot import 'broken_on_import' (ZeroDivisionError"),
    ],
)
def test_predictor_must_import_and_take_a_folder_and_a_frame(
    tmp_path, monkeypatch, predictor, expected
):
    from flows.config import check_assets

    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "exits_on_import.py").write_text("raise SystemExit(3)\n")
    (modules / "broken_on_import.py").write_text("1 / 0\n")
    (modules / "one_argument.py").write_text("def predict(folder):\n    return folder\n")
    monkeypatch.syspath_prepend(str(modules))
    problems = check_assets(_book(tmp_path, predictor=predictor))
    assert problems == [f"verify.predictor: {expected}"] or (
        len(problems) == 1 and problems[0].startswith(f"verify.predictor: {expected}")
    ), problems
