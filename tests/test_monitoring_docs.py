"""Every snippet of docs/monitoring.md, run: a guide that does not work is worse than none.

Snippets are the fenced blocks that follow an ``<!-- file: NAME -->`` marker. The rules go
through Debian's ``promtool``, the Alertmanager configuration through ``amtool``, the
Grafana payload and the CloudWatch alarm through the receiver's own code.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from datetime import UTC, datetime

import pytest
import yaml
from starlette.testclient import TestClient

from intake import sources
from intake.app import create_app
from intake.mapping import RunbookIndex, plan
from tests.conftest import MODEL, PROJECT_ROOT, write_runbook
from tests.intake_fixtures import SECRETS, RecordingLauncher, grafana_headers
from tests.test_intake_alerts import make_settings

DOC = PROJECT_ROOT / "docs" / "monitoring.md"
SNIPPET = re.compile(r"<!-- file: (\S+) -->\n```\w*\n(.*?)\n```", re.DOTALL)


def snippets() -> dict[str, str]:
    return dict(SNIPPET.findall(DOC.read_text()))


def test_the_doc_has_every_snippet_it_promises():
    assert set(snippets()) == {
        "rollback-rules.yml",
        "prometheus.yml",
        "alertmanager.yml",
        "grafana-payload.json",
        "cloudwatch.sh",
        "api.sh",
    }


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/install-test-deps)")
    return found


def test_prometheus_rules_pass_promtool_and_name_the_runbooks_alerts(tmp_path):
    rules = tmp_path / "rollback-rules.yml"
    rules.write_text(snippets()["rollback-rules.yml"])
    res = subprocess.run(
        [tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 4 rules found" in res.stdout
    names = yaml.safe_load(write_runbook(tmp_path).read_text())["alerts"]["names"]
    for rule in yaml.safe_load(rules.read_text())["groups"][0]["rules"]:
        assert rule["alert"] in names, rule["alert"]  # each measures a trigger metric
        assert rule["annotations"]["value"] == "{{ $value }}"
        assert "by (model" in rule["expr"]  # the label that says whose it is survives


def test_prometheus_config_loads_the_rules(tmp_path):
    (tmp_path / "rollback-rules.yml").write_text(snippets()["rollback-rules.yml"])
    config = tmp_path / "prometheus.yml"
    config.write_text(snippets()["prometheus.yml"])
    res = subprocess.run(
        [tool("promtool"), "check", "config", str(config)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_alertmanager_config_passes_amtool_with_the_token_file(tmp_path):
    token = tmp_path / "rollback-receiver-token"
    token.write_text(SECRETS["alertmanager_token"])
    text = snippets()["alertmanager.yml"].replace(
        "/etc/prometheus/rollback-receiver-token", str(token)
    )
    config = tmp_path / "alertmanager.yml"
    config.write_text(text)
    res = subprocess.run(
        [tool("amtool"), "check-config", str(config)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    hook = yaml.safe_load(text)["receivers"][1]["webhook_configs"][0]
    assert hook["url"].endswith("/alerts/alertmanager") and hook["send_resolved"] is True
    assert hook["http_config"]["authorization"]["credentials_file"] == str(token)


def test_the_documented_grafana_payload_starts_a_run_with_the_query_value(tmp_path):
    write_runbook(tmp_path)
    launcher = RecordingLauncher()
    body = snippets()["grafana-payload.json"].encode()
    json.loads(body)  # the doc's JSON is JSON
    with TestClient(create_app(make_settings(tmp_path), launcher=launcher)) as client:
        r = client.post("/alerts/grafana", content=body, headers=grafana_headers(body))
    assert r.status_code == 202, r.text
    assert r.json()["alerts"][0]["outcome"] == "started"
    trigger = launcher.calls[0]["parameters"]["trigger"]
    assert trigger["metric"] == "accuracy" and trigger["value"] == 0.61


def test_the_documented_cloudwatch_alarm_maps_to_the_runbook(tmp_path):
    """The alarm the doc's `put-metric-alarm` makes, as CloudWatch would publish it."""
    script = snippets()["cloudwatch.sh"].replace("\\\n", " ")
    line = next(c for c in script.splitlines() if "put-metric-alarm" in c)
    args = shlex.split(line)
    opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    name, value = re.fullmatch(r"Name=(\w+),Value=(\S+)", opt["--dimensions"]).groups()
    alarm = {
        "AlarmName": opt["--alarm-name"],
        "AlarmDescription": opt["--alarm-description"],
        "NewStateValue": "ALARM",
        "NewStateReason": "Threshold Crossed: 1 out of the last 5 datapoints "
        "[0.61 (06/12/26 09:00:00)] was less than the threshold (0.9).",
        "StateChangeTime": datetime.now(UTC).isoformat(),
        "AlarmArn": f"arn:aws:cloudwatch:us-east-1:123456789012:alarm:{opt['--alarm-name']}",
        "Trigger": {
            "MetricName": opt["--metric-name"],
            "Namespace": opt["--namespace"],
            "Dimensions": [{"name": name, "value": value}],
        },
    }
    write_runbook(tmp_path)
    alerts = sources.cloudwatch(json.dumps(alarm))
    planned, notes = plan(alerts, RunbookIndex(tmp_path).books())
    assert [n.outcome for n in notes] == ["started"], [n.reason for n in notes]
    trigger = planned[0].trigger
    assert planned[0].model == MODEL and trigger.metric == "accuracy"
    assert trigger.value == 0.61 and trigger.severity == "critical"
