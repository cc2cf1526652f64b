"""The README's main-job command, run from a clean copy of the project as a newcomer would."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

pytestmark = pytest.mark.slow


def _clean_env(checkout):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "RUNBOOK_", "SLACK_", "VIRTUAL_ENV"))
    }
    env["PREFECT_HOME"] = str(checkout / ".state" / "prefect")
    return env


@pytest.mark.timeout(1200)  # two demos and a set-up: minutes on a busy machine
def test_readme_demo_command_restores_the_good_version(project_copy):
    readme = (project_copy / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    demo_cmd = first_block[0].split("#")[0].strip()
    assert demo_cmd == "scripts/demo"
    env = _clean_env(project_copy)
    runbook = str(project_copy / ".venv/bin/runbook")
    res = subprocess.run(
        f"{demo_cmd} --json",
        shell=True,
        cwd=project_copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["outcome"] == "restored"
    assert (report["from_version"], report["to_version"], report["final_version"]) == (
        "1.2.0",
        "1.1.0",
        "1.1.0",
    )
    assert report["verification"]["passed"] and report["verification"]["accuracy"] > 0.9
    assert os.path.exists(report["postmortem"])
    # the demo's own registry, never the one the runbook's production points at
    assert report["postmortem"].startswith(str(project_copy / ".state" / "demo-registry"))
    assert "Traceback" not in res.stderr and "UserWarning" not in res.stderr
    assert "ephemeral docs site" not in res.stderr
    # the impact window: the bake watch read the served accuracy from the model server's
    # own /metrics (no Prometheus on a fresh machine) until it recovered
    impact = report["impact_window"]
    assert impact["bake"] == "recovered", impact
    assert impact["source"] == "model-server" and impact["read_from"].startswith("http://127.")
    assert impact["detection"] > 0 and impact["restore"] >= 0 and impact["recovery"] > 0
    parts = impact["detection"] + impact["restore"] + impact["recovery"]
    assert impact["impact"] == pytest.approx(parts, abs=0.01)
    assert "accuracy: 0.94" in impact["reason"]

    demo_registry = "file://{state}/demo-registry/churn-classifier"
    hist = subprocess.run(
        [runbook, "history", "churn-classifier", "--registry", demo_registry, "--json"],
        cwd=project_copy,
        env=env,
        capture_output=True,
        text=True,
    )
    assert hist.returncode == 0, hist.stderr
    doc = json.loads(hist.stdout)
    assert doc["live"]["production"]["version"] == "1.1.0"
    incidents = [e for e in doc["journal"] if e["action"] == "incident"]
    assert incidents and incidents[0]["incident"] == report["incident"]
    assert incidents[0]["status"] == "restored"

    # a registry the user works with: the next demo must leave it alone
    seeded = subprocess.run(
        [runbook, "seed-example", "--json"], cwd=project_copy, env=env, capture_output=True
    )
    assert seeded.returncode == 0, seeded.stderr
    users = project_copy / ".state" / "registry" / "churn-classifier"
    before = sorted(p.relative_to(users) for p in users.rglob("*"))

    text = subprocess.run(
        demo_cmd, shell=True, cwd=project_copy, env=env, capture_output=True, text=True, timeout=600
    )
    assert text.returncode == 0, text.stderr[-3000:]
    assert "RESTORED" in text.stdout and "1.2.0 -> 1.1.0" in text.stdout
    block = text.stdout[text.stdout.index("Impact window") :]
    assert "bake watch: recovered" in block and "the model server's /metrics at" in block
    for figure in ("detection", "restore", "recovery", "impact"):
        assert re.search(rf"^  {figure} +\d+\.\ds ", block, re.MULTILINE), (figure, block)
    assert "waits" in text.stdout or "temporary server" in text.stdout  # says what it waits for
    assert f"runbook history churn-classifier --registry '{demo_registry}'" in text.stdout
    assert sorted(p.relative_to(users) for p in users.rglob("*")) == before
