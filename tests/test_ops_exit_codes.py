"""One exit-code table for every command: 0 done, 1 refused or failed, 2 bad input,
3 a dependency unreachable (docs/operations.md). Each command, run as a person runs it."""

from __future__ import annotations

import os

import pytest

from tests.test_cli_imports import run
from tests.test_ops_freeze import published, runbook_cli  # noqa: F401

#: an S3 endpoint nobody listens on, credentials that would be accepted, no retries
UNREACHABLE_S3 = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "1",
    "AWS_RETRY_MODE": "standard",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def cli_env(*args: str, **env: str) -> tuple[int, str, str]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return runbook_cli(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow  # one CLI subprocess each, against a dead endpoint
@pytest.mark.parametrize(
    "command",
    [
        ["incidents", "{book}"],
        ["freeze", "{book}", "--reason", "r"],
        ["unfreeze", "{book}"],
        ["history", "{book}"],
        ["rollback", "{book}", "--dry-run", "--reason", "r"],
    ],
)
def test_an_unreachable_store_is_exit_3_in_one_line(runbook_path, command):
    args = [a.format(book=runbook_path) for a in command]
    code, out, err = cli_env(*args, "--registry", "s3://no-bucket/models", **UNREACHABLE_S3)
    assert code == 3, (code, out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "command, words",
    [
        (["freeze", "{book}"], "--reason"),
        (["freeze", "{book}", "--reason", "r", "--until", "2020-01-01T00:00Z"], "in the past"),
        (["unfreeze", "{book}", "--env", "../x"], "environment"),
        (["incidents", "{book}", "--since", "later"], "--since"),
        (["incidents", "no-such-model"], "no runbook"),
        (["incident", "nonsense"], "not an incident id"),
        (["promote", "{book}", "9.9.9"], "9.9.9"),
        (["rollback", "{book}", "--force", "--dry-run"], "--force needs --reason"),
        (["history", "{book}", "--env", "nowhere"], "nowhere"),
    ],
)
def test_bad_input_is_exit_2_naming_what_was_wrong(runbook_path, published, command, words):  # noqa: F811
    code, out, err = runbook_cli(*[a.format(book=runbook_path) for a in command])
    assert code == 2, (code, out, err)
    assert words in err, err


@pytest.mark.slow  # several CLI processes: ~3.5 s
def test_the_runbooks_own_refusals_are_exit_1(runbook_path, published):  # noqa: F811
    book = str(runbook_path)
    assert runbook_cli("freeze", book, "--reason", "migration")[0] == 0
    code, out, _ = runbook_cli("rollback", book, "--dry-run", "--reason", "r")
    assert code == 1 and "frozen" in out
    code, _, err = runbook_cli("incident", "churn-classifier-20261206T030000Z-zzzz",
                               "--runbook", book)  # fmt: skip
    assert code == 1 and "no incident" in err
    assert runbook_cli("unfreeze", book)[0] == 0
    assert runbook_cli("unfreeze", book)[0] == 0  # nothing to lift is done, not an error


@pytest.mark.slow
def test_the_new_commands_import_neither_prefect_nor_gx(runbook_path, published):  # noqa: F811
    book = str(runbook_path)
    for args in (
        ["incidents", book],
        ["incidents", book, "--open", "--json"],
        ["freeze", book, "--reason", "r"],
        ["unfreeze", book],
        ["incident", "churn-classifier-20261206T030000Z-zzzz", "--runbook", book],
        ["history", book],
        ["outbox"],
    ):
        ran = run(*args)
        assert ran.imported == (False, False), (args, ran.stderr)
