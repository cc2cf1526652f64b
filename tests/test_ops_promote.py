"""A promote whose verification fails leaves production where it was (real GX checks)."""

from __future__ import annotations

import json

import pytest

from flows.operations import promote
from tests.test_ops_freeze import runbook_cli


def publish_all(registry, trained_versions) -> None:
    parent = None
    for version, folder, metrics in trained_versions:
        registry.publish(version, folder, created_by="ci", parent=parent, metrics=metrics)
        parent = version


def test_a_promote_that_fails_verification_puts_the_previous_version_back(
    registry, runbook, trained_versions
):
    publish_all(registry, trained_versions)
    promote(registry, runbook, "1.1.0", "production", by="ci")
    live, result = promote(registry, runbook, "1.2.0", "production", by="ci")
    assert not result.passed
    assert live.version == "1.1.0" and registry.pointer("production").version == "1.1.0"
    last = next(registry.journal(action="promote", env="production", limit=1))
    assert last.status == "failed" and last.details["put_back"] == "1.1.0"
    assert registry.last_known_good("production") == "1.1.0"  # 1.2.0 never counts as good


def test_keep_unverified_leaves_it_live_on_purpose_and_says_so(registry, runbook, trained_versions):
    publish_all(registry, trained_versions)
    promote(registry, runbook, "1.1.0", "production", by="ci")
    live, result = promote(registry, runbook, "1.2.0", "production", by="ci", keep_unverified=True)
    assert not result.passed and live.version == "1.2.0"
    assert registry.pointer("production").version == "1.2.0"
    last = next(registry.journal(action="promote", env="production", limit=1))
    assert last.status == "kept_unverified"


@pytest.mark.slow
def test_the_cli_exits_1_in_one_line_and_history_shows_the_failed_promote(
    runbook_path, registry, runbook, trained_versions
):
    publish_all(registry, trained_versions)
    promote(registry, runbook, "1.1.0", "production", by="ci")
    code, out, err = runbook_cli("promote", str(runbook_path), "1.2.0")
    assert code == 1, out + err
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 1 and "FAILED verification" in lines[0]
    assert "put back on 1.1.0" in lines[0]
    assert registry.pointer("production").version == "1.1.0"
    code, out, err = runbook_cli("history", str(runbook_path), "--json", "-n", "5")
    doc = json.loads(out)
    assert doc["live"]["production"]["version"] == "1.1.0"
    promotes = [e for e in doc["journal"] if e["action"] == "promote"]
    assert promotes[0]["status"] == "failed" and promotes[0]["details"]["to"] == "1.2.0"
    code, out, err = runbook_cli("history", str(runbook_path), "-n", "5")
    assert "promote  failed" in out
