"""`runbook config`: every setting, its value and where it came from; secrets masked."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from intake.settings import IntakeSettings
from rollback_runbook.cli import app
from rollback_runbook.settings import Settings

runner = CliRunner()


def rows(monkeypatch, **env: str) -> dict[str, dict]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    res = runner.invoke(app, ["config", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    return {(r["scope"], r["name"]): r for r in doc["settings"]}


def test_config_lists_every_field_of_both_settings_classes(monkeypatch):
    got = rows(monkeypatch)
    assert {n for s, n in got if s == "runbook"} == set(Settings.model_fields)
    assert set(IntakeSettings.model_fields) <= {n for s, n in got if s == "receiver"}


def test_config_says_where_each_value_came_from_and_masks_secrets(monkeypatch, tmp_path):
    got = rows(
        monkeypatch,
        SLACK_BOT_TOKEN="xoxb-very-secret",
        RUNBOOK_INTAKE_GENERIC_SECRET_BLOCK="generic-secret",
        RUNBOOK_INTAKE_ALERTMANAGER_TOKEN="am-secret-token",
        RUNBOOK_APPROVAL_POLL_SECONDS="7",
        PREFECT_UI_URL="http://ui.example:4200",
    )
    assert got["runbook", "slack_bot_token"] | {"doc": None} == {
        "scope": "runbook",
        "name": "slack_bot_token",
        "variable": "SLACK_BOT_TOKEN",
        "value": "****",
        "source": "env",
        "doc": None,
        "secret": True,
    }
    assert (
        got["receiver", "generic_secret"]["value"],
        got["receiver", "generic_secret"]["source"],
    ) == (
        "****",
        "block generic-secret",
    )
    assert got["receiver", "alertmanager_token"]["value"] == "****"
    assert got["runbook", "approval_poll_seconds"]["value"] == 7
    assert got["runbook", "approval_poll_seconds"]["source"] == "env"
    assert got["runbook", "ui_url"]["value"] == "http://ui.example:4200"
    assert got["runbook", "prewarm"]["source"] == "default"
    assert got["receiver", "grafana_token"]["value"] is None


def test_config_text_never_shows_a_secret(monkeypatch):
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "sign-me-secret")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-very-secret")
    res = runner.invoke(app, ["config"])
    assert res.exit_code == 0, res.output
    assert "sign-me-secret" not in res.output and "xoxb-very-secret" not in res.output
    assert "****" in res.output


def test_a_bad_setting_is_bad_input_naming_it(monkeypatch):
    monkeypatch.setenv("RUNBOOK_APPROVAL_POLL_SECONDS", "often")
    res = runner.invoke(app, ["config"])
    assert res.exit_code == 2
    assert "approval_poll_seconds" in res.output and "Traceback" not in res.output


# -- every RUNBOOK_* variable the code reads is listed ------------------------------------

#: the packages whose environment reads `runbook config` reports
SOURCES = ("rollback_runbook", "blocks", "flows", "intake")


def runbook_variables_in_the_code() -> dict[str, set[str]]:
    """Every ``RUNBOOK_<NAME>`` the source tree spells out -> the files (a prefix such as
    ``RUNBOOK_INTAKE_`` is not a variable)."""
    import re

    from tests.conftest import PROJECT_ROOT

    found: dict[str, set[str]] = {}
    for package in SOURCES:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            for name in re.findall(r"\bRUNBOOK_[A-Z0-9_]+", path.read_text()):
                if not name.endswith("_"):
                    found.setdefault(name, set()).add(str(path.relative_to(PROJECT_ROOT)))
    return found


def test_every_runbook_variable_the_code_reads_is_listed_by_config(monkeypatch):
    got = rows(monkeypatch)
    from rollback_runbook.config_report import listed_variables

    listed = listed_variables(list(got.values()))
    code = runbook_variables_in_the_code()
    assert len(code) > 30  # the grep works
    missing = {name: sorted(files) for name, files in code.items() if name not in listed}
    assert not missing, f"read by the code, not listed by `runbook config`: {missing}"


def test_security_settings_are_listed_set_or_unset_never_with_their_value(monkeypatch):
    unset = rows(monkeypatch)
    by_variable = {r["variable"]: r for r in unset.values()}
    for variable in ("RUNBOOK_APPROVAL_SECRET", "RUNBOOK_MODEL_SERVER_SECRET",
                     "RUNBOOK_MODEL_SERVER_FEEDBACK_SECRET", "PAGERDUTY_ROUTING_KEY",
                     "OPSGENIE_API_KEY"):  # fmt: skip
        row = by_variable[variable]
        assert row["secret"] is True and row["value"] is None and row["source"] == "default"
    for variable in ("RUNBOOK_PROMETHEUS_URL", "RUNBOOK_DEBUG", "RUNBOOK_METRICS_TTL"):
        assert by_variable[variable]["secret"] is False
    assert by_variable["RUNBOOK_METRICS_TTL"]["value"] == 10.0

    env = {
        "RUNBOOK_APPROVAL_SECRET": "approve-secret-value",
        "RUNBOOK_MODEL_SERVER_SECRET_BLOCK": "ms-block",
        "PAGERDUTY_ROUTING_KEY": "pd-secret-value",
        "OPSGENIE_API_KEY": "og-secret-value",
        "RUNBOOK_PROMETHEUS_URL": "http://127.0.0.1:9090",
        "RUNBOOK_DEBUG": "1",
        "RUNBOOK_METRICS_TTL": "3",
    }
    got = {r["variable"]: r for r in rows(monkeypatch, **env).values()}
    assert (got["RUNBOOK_APPROVAL_SECRET"]["value"], got["RUNBOOK_APPROVAL_SECRET"]["source"]) == (
        "****",
        "env",
    )
    assert got["RUNBOOK_MODEL_SERVER_SECRET"]["source"] == "block ms-block"
    assert got["RUNBOOK_MODEL_SERVER_SECRET"]["value"] == "****"
    assert got["PAGERDUTY_ROUTING_KEY"]["value"] == "****"
    assert got["RUNBOOK_PROMETHEUS_URL"]["value"] == "http://127.0.0.1:9090"
    assert (got["RUNBOOK_DEBUG"]["value"], got["RUNBOOK_DEBUG"]["source"]) == ("1", "env")
    assert got["RUNBOOK_METRICS_TTL"]["value"] == "3"

    text = runner.invoke(app, ["config"]).output
    for secret in ("approve-secret-value", "pd-secret-value", "og-secret-value"):
        assert secret not in text
    line = next(x for x in text.splitlines() if "RUNBOOK_APPROVAL_SECRET" in x)
    assert "****" in line and "env" in line


def test_a_paging_key_a_runbook_names_is_listed_with_its_model(monkeypatch, tmp_path):
    from tests.conftest import write_runbook

    write_runbook(tmp_path, page={"pagerduty": {"routing_key_env": "TEAM_PD_KEY"}})
    monkeypatch.setenv("RUNBOOK_RUNBOOKS_DIR", str(tmp_path))
    got = {r["variable"]: r for r in rows(monkeypatch, TEAM_PD_KEY_BLOCK="pd-block").values()}
    assert got["TEAM_PD_KEY"]["secret"] is True
    assert got["TEAM_PD_KEY"]["source"] == "block pd-block"
    assert "churn-classifier" in got["TEAM_PD_KEY"]["doc"]
