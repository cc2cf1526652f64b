"""On a fresh project, from the CLI alone: what is open, what happened, is the model frozen.

`runbook init`, `runbook seed-example`, `runbook freeze`; an alert's rollback (the real
flow, on the session's Prefect server) is refused by the freeze; a person's `runbook
rollback --force --reason` restores; then `incidents`, `incident ID` and `history` tell
the whole story.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest


@pytest.fixture
def api(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def runbook(project, *args: str, api: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "COLUMNS")}
    env["COLUMNS"] = "250"
    if api:
        env["PREFECT_API_URL"] = api
    res = subprocess.run([sys.executable, "-m", "rollback_runbook.cli", *args], cwd=project,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    return res.returncode, res.stdout, res.stderr


@pytest.mark.slow
def test_a_fresh_project_answers_what_is_open_what_happened_and_what_is_frozen(
    api, tmp_path, monkeypatch
):
    from flows.steps.trigger import Trigger
    from tests.conftest import run_rollback

    project = tmp_path / "team"
    assert runbook(tmp_path, "init", str(project))[0] == 0
    book = project / "runbooks" / "churn-classifier.yaml"
    text = book.read_text()
    book.write_text(text.replace("auto_approve: [drill, critical]",
                                 "auto_approve: [drill, critical, manual]"))  # fmt: skip
    code, out, err = runbook(project, "seed-example")
    assert code == 0, err

    why = ["--reason", "feature store migration", "--until", "4h", "--by", "alice"]
    code, out, err = runbook(project, "freeze", "churn-classifier", *why)
    assert code == 0, err

    # an alert while frozen: the real flow refuses it, naming the freeze, and touches nothing
    monkeypatch.chdir(project)
    began = datetime.now(UTC) - timedelta(minutes=10)
    alert = Trigger(source="alertmanager", metric="accuracy", value=0.62, severity="critical",
                    fingerprint="e2e", started_at=began)  # fmt: skip
    _, refused = run_rollback(book, trigger=alert)
    assert refused["outcome"] == "trigger_rejected", refused["reason"]
    assert "frozen in production by alice" in refused["reason"]
    assert "feature store migration" in refused["reason"]

    # a person can roll back anyway, with a reason
    code, out, err = runbook(project, "rollback", "churn-classifier", api=api)
    assert code == 1 and "frozen" in out and "--force" in out, out + err
    code, out, err = runbook(project, "rollback", "churn-classifier", "--force", "--reason",
                             "accuracy at 0.62, cannot wait", "--json", api=api)  # fmt: skip
    report = json.loads(out)
    assert code == 0 and report["outcome"] == "restored", out + err
    incident = report["incident"]

    # what is open now, and is the model frozen, and why
    code, out, err = runbook(project, "incidents")
    assert code == 0, err
    assert "FROZEN" in out and "alice" in out and "feature store migration" in out
    assert "(2 rollback(s) refused since)" in out  # the alert, and the unforced person
    assert "0 open, 1 closed" in out
    assert incident in out and "restored (forced)" in out and "1.2.0 -> 1.1.0" in out
    code, out, err = runbook(project, "incidents", "--open")
    assert "no open incidents" in out

    # what happened to incident X
    code, out, err = runbook(project, "incident", incident)
    assert code == 0, err
    for words in ("restored", "forced past the freeze by alice", "restore_intent", "verified",
                  "post-mortem: ", "cannot wait"):  # fmt: skip
        assert words in out, (words, out)
    doc = json.loads(runbook(project, "incident", incident, "--json")[1])
    assert doc["forced"] and doc["outcome"] == "restored" and doc["postmortem"]
    assert doc["flow_run_id"]

    code, out, err = runbook(project, "history", "churn-classifier", "-n", "40")
    assert "freeze" in out and "FROZEN" in out

    # within the cooldown a second rollback is refused, unless forced again (with a reason)
    runbook(project, "unfreeze", "churn-classifier")
    code, out, err = runbook(project, "rollback", "churn-classifier", "--json", api=api)
    again = json.loads(out)
    assert code == 1 and again["outcome"] == "trigger_rejected", out + err
    assert "cooldown" in again["reason"]
    code, out, err = runbook(project, "rollback", "churn-classifier", "--force", "--reason",
                             "1.1.0 is bad too", "--json", api=api)  # fmt: skip
    again = json.loads(out)
    assert code == 0 and again["outcome"] == "restored", out + err
    assert (again["from_version"], again["to_version"]) == ("1.1.0", "1.0.0")
