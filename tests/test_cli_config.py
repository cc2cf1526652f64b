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
    assert {n for s, n in got if s == "receiver"} == set(IntakeSettings.model_fields)


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
