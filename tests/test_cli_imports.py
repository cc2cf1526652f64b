"""Commands that need no orchestration never import Prefect (nor Great Expectations).

`runbook --help`, `validate`, `history`, `publish`, `promote`, `rollback --dry-run`,
`outbox` and `config` each run in a fresh Python against real registries in a tmp folder
(and on a real S3 server), and say which heavy libraries they imported: Prefect costs about
a second even compiled, GX several. Only a deep `validate` and a verifying `promote` load GX
(they run the suite); only a `block://` registry URL loads Prefect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from tests.conftest import MODEL, PROJECT_ROOT
from tests.fake_slack import FakeSlack
from tests.s3_servers import moto_s3  # noqa: F401  (fixture)

# imports the app, runs it, then says which heavy libraries got imported and the exit code
WRAPPER = """
import sys
from rollback_runbook.cli.app import app
code = 0
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
print("IMPORTED", "prefect" in sys.modules, "great_expectations" in sys.modules, code,
      file=sys.stderr)
"""


@dataclass
class Ran:
    prefect: bool
    gx: bool
    code: int
    stdout: str
    stderr: str

    @property
    def imported(self) -> tuple[bool, bool]:
        return self.prefect, self.gx


def run(*args: str, env: dict[str, str] | None = None) -> Ran:
    """Run ``runbook ARGS`` in a fresh Python (the environment is the test's, plus ``env``)."""
    res = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=180,
    )
    lines = [x for x in res.stderr.splitlines() if x.startswith("IMPORTED")]
    assert lines, f"runbook {' '.join(args)} did not finish:\n{res.stdout}\n{res.stderr}"
    _, prefect, gx, code = lines[-1].split()
    return Ran(prefect == "True", gx == "True", int(code), res.stdout, res.stderr)


def imported(*args: str, env: dict[str, str] | None = None) -> tuple[bool, bool]:
    return run(*args, env=env).imported


def seed(registry, versions, live: str = "1.2.0", env: str = "production") -> None:
    """The example's history: every version published, the older ones verified, ``live`` live."""
    from blocks.registry import VerificationRecord

    for version, folder, metrics in versions:
        registry.publish(version, folder, created_by="ci", metrics=metrics)
        if version != "1.2.0":
            registry.record_verification(
                VerificationRecord(version=version, env=env, passed=True, at=datetime.now(UTC))
            )
    registry.swap_pointer(env, live, expected=registry.pointer(env), by="ci", reason="release")


@pytest.fixture
def registries(state_dir, trained_versions):
    """The example runbook's two local registries ({state}/registry...), seeded."""
    from blocks.registry import open_registry
    from flows.config import load_runbook

    book = load_runbook(PROJECT_ROOT / "runbooks" / f"{MODEL}.yaml")
    prod = open_registry(book.environment("production").registry, MODEL)
    staging = open_registry(book.environment("staging").registry, MODEL)
    seed(prod, trained_versions)
    seed(staging, trained_versions, live="1.1.0", env="staging")
    return prod, staging


# -- light commands ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["--help"], ["validate", "--shallow"], ["validate", "--shallow", "--json"]]
)
def test_light_commands_import_neither_prefect_nor_great_expectations(args):
    assert imported(*args) == (False, False)


@pytest.mark.slow
def test_a_deep_validation_loads_the_suite_without_prefect():
    assert imported("validate") == (False, True)


def test_history_imports_neither(registries):
    ran = run("history", MODEL, "--json")
    assert (ran.code, ran.imported) == (0, (False, False)), ran.stderr
    shown = json.loads(ran.stdout)
    assert "1.2.0" in ran.stdout and "1.1.0" in ran.stdout, shown


def test_publish_imports_neither(registries, version_dir):
    prod, _ = registries
    ran = run("publish", MODEL, str(version_dir), "--version", "2.0.0", "--by", "me")
    assert (ran.code, ran.imported) == (0, (False, False)), ran.stderr
    assert prod.manifest("2.0.0").parent == "1.2.0"


@pytest.mark.slow
def test_promote_imports_no_prefect_and_gx_only_to_verify(registries):
    _, staging = registries
    ran = run("promote", MODEL, "1.0.0", "--env", "staging", "--no-verify")
    assert (ran.code, ran.imported) == (0, (False, False)), ran.stderr
    assert staging.pointer("staging").version == "1.0.0"

    ran = run("promote", MODEL, "1.1.0", "--env", "staging")  # runs the suite: GX, no Prefect
    assert (ran.code, ran.imported) == (0, (False, True)), ran.stdout + ran.stderr
    assert "verification" in ran.stdout and staging.pointer("staging").version == "1.1.0"


def test_a_dry_run_plans_without_prefect_or_a_server(registries):
    prod, _ = registries
    ran = run("rollback", MODEL, "--dry-run", "--json", env={"PREFECT_API_URL": ""})
    assert (ran.code, ran.imported) == (0, (False, False)), ran.stderr
    report = json.loads(ran.stdout)
    assert (report["outcome"], report["to_version"]) == ("dry_run", "1.1.0")
    assert prod.pointer("production").version == "1.2.0"  # nothing moved


def test_a_rejected_dry_run_imports_neither(registries):
    ran = run("rollback", MODEL, "--dry-run", "--to", "9.9.9", "--json")
    assert (ran.code, ran.imported) == (1, (False, False)), ran.stderr
    assert json.loads(ran.stdout)["outcome"] == "restore_failed"


def test_config_imports_neither():
    for args in (["config"], ["config", "--json"]):
        ran = run(*args)
        assert (ran.code, ran.imported) == (0, (False, False)), ran.stderr


def test_outbox_lists_and_delivers_without_prefect(state_dir):
    from blocks.notify.delivery_log import DeliveryLog, QueuedMessage

    DeliveryLog(state_dir / "outbox").queue(
        QueuedMessage(
            id="inc-1.restored.abc",
            channel="#ml-oncall",
            event="restored",
            incident="inc-1",
            text="churn restored to 1.1.0",
            error="Slack unreachable",
        )
    )
    ran = run("outbox")
    assert (ran.code, ran.imported) == (0, (False, False)), ran.stderr
    assert "inc-1.restored.abc" in ran.stdout and "1 undelivered" in ran.stdout

    with FakeSlack() as slack:
        env = {"SLACK_BOT_TOKEN": slack.token, "SLACK_API_URL": slack.url}
        ran = run("outbox", "--retry", env=env)
        assert (ran.code, ran.imported) == (0, (False, False)), ran.stdout + ran.stderr
        assert [c["text"] for c in slack.sent("chat.postMessage")] == ["churn restored to 1.1.0"]
    assert "0 undelivered" in run("outbox").stdout


@pytest.mark.slow
def test_history_and_a_dry_run_on_s3_import_neither(moto_s3, trained_versions):  # noqa: F811
    reg = moto_s3.registry(model=MODEL)
    seed(reg, trained_versions)
    url = f"s3://{moto_s3.bucket}/{reg.prefix}"
    env = moto_s3.env()
    ran = run("history", MODEL, "--registry", url, env=env)
    assert (ran.code, ran.imported) == (0, (False, False)), ran.stderr
    assert "1.2.0" in ran.stdout
    ran = run("rollback", MODEL, "--dry-run", "--registry", url, "--json", env=env)
    assert (ran.code, ran.imported) == (0, (False, False)), ran.stderr
    assert json.loads(ran.stdout)["to_version"] == "1.1.0"


def test_the_registry_and_planning_modules_import_no_prefect():
    """The modules themselves, not only the commands that happen to reach them today."""
    code = (
        "import sys, blocks.local, blocks.s3, blocks.registry, flows.planning, flows.dry_run, "
        "flows.steps.trigger, flows.steps.verify, flows.operations; "
        "print(sorted(m for m in ('prefect', 'great_expectations') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_only_a_block_url_loads_prefect(tmp_path):
    code = (
        "import sys; from blocks.registry import open_registry; "
        f"open_registry('file://{tmp_path}/reg', 'm'); print('prefect' in sys.modules); "
        "import blocks.registry_blocks; print('prefect' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert out.stdout.split() == ["False", "True"], out.stderr
