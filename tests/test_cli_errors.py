"""Bad input and broken stores: one clear line, the right exit code, never a traceback.

Exit codes: 2 bad input, 1 failed. Each case ran into a traceback (or the wrong code) before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import MODEL, PROJECT_ROOT


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | env
    return subprocess.run(
        [sys.executable, "-m", "rollback_runbook.cli", *args],
        cwd=PROJECT_ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line(res: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("command", ["history", "rollback", "seed-example"])
def test_a_ten_thousand_character_name_is_bad_input_in_one_short_line(command):
    args = ["--registry", "file://" + "r" * 10_000] if command == "seed-example" else ["m" * 10_000]
    res = cli(command, *args)
    assert res.returncode == 2
    assert len(one_line(res)) < 700


def test_a_version_that_escapes_the_registry_is_bad_input():
    res = cli("rollback", MODEL, "--to", "../../x", "--dry-run")
    assert res.returncode == 2
    assert "invalid version '../../x'" in one_line(res)


@pytest.mark.parametrize("args", [["serve", "--port", "99999"], ["stack", "--port", "0"]])
def test_a_port_out_of_range_is_refused_before_anything_starts(args):
    res = cli(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "--port" in res.stderr
    assert "less than or equal to 65535" in res.stderr or "greater than or equal to 1" in res.stderr


@pytest.fixture
def seeded_state(state_dir, trained_versions):
    res = cli("seed-example", "--json")
    assert res.returncode == 0, res.stderr
    return state_dir / "registry" / MODEL


def test_a_corrupt_journal_record_is_named_in_one_line(seeded_state):
    # history reads the journal's index pages (copies of the records): break the newest
    page = seeded_state / "indexes" / "journal" / "all" / "00000000.json"
    page.write_text('{"seq": 12, "broken')
    res = cli("history", MODEL)
    assert res.returncode == 1
    assert "corrupt record" in one_line(res) and str(seeded_state) in res.stderr
    page.write_text(json.dumps({"seq": "twelve"}))
    res = cli("history", MODEL, "--json")
    assert res.returncode == 1
    assert "corrupt record" in json.loads(res.stdout)["error"]


def test_s3_without_credentials_is_one_line():
    res = cli(
        "history",
        MODEL,
        "--registry",
        "s3://some-bucket/models",
        AWS_ACCESS_KEY_ID="",
        AWS_SECRET_ACCESS_KEY="",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
    )
    assert res.returncode == 2
    assert "credentials" in one_line(res)


def test_reset_refuses_the_state_folder_and_deletes_nothing(seeded_state, state_dir):
    before = sorted(p.relative_to(state_dir) for p in state_dir.rglob("*"))
    res = cli("seed-example", "--reset", "--registry", "file://{state}")
    assert res.returncode == 2
    assert "refusing to reset" in one_line(res)
    assert sorted(p.relative_to(state_dir) for p in state_dir.rglob("*")) == before


def test_reset_refuses_a_registry_that_is_not_the_examples(state_dir, tmp_path, version_dir):
    from blocks.local import LocalRegistry

    folder = tmp_path / "mine"
    LocalRegistry(root=str(folder), model=MODEL).publish("2.0.0", version_dir, created_by="me")
    res = cli("seed-example", "--reset", "--registry", f"file://{folder}")
    assert res.returncode == 2
    assert "not one of the example's" in one_line(res)
    assert (folder / "versions" / "2.0.0").is_dir()


def test_the_demos_own_registry_says_how_to_start_over(tmp_path, version_dir):
    """Published into the demo's sandbox, the demo refuses to reset it: and says how."""
    from blocks.local import LocalRegistry
    from rollback_runbook.demo import RefusedReset, reset_example_registry

    folder = tmp_path / "demo-registry" / MODEL
    LocalRegistry(root=str(folder), model=MODEL).publish("2.0.0", version_dir, created_by="me")
    with pytest.raises(RefusedReset, match=r"demo's own registry.*rm -r") as refused:
        reset_example_registry(f"file://{folder}")
    assert str(folder) in str(refused.value) and (folder / "versions" / "2.0.0").is_dir()


@pytest.mark.slow  # seeds the example (trains and verifies): ~10-20 s
def test_reset_empties_a_registry_of_the_example_and_seeds_again(seeded_state):
    res = cli("seed-example", "--reset", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["live"] == "1.2.0"


@pytest.mark.slow  # seeds the example (trains and verifies): ~10-20 s
def test_seeding_prints_no_library_noise(state_dir):
    res = cli("seed-example")
    assert res.returncode == 0, res.stderr
    assert "ephemeral docs site" not in res.stderr and "UserWarning" not in res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_the_demo_keeps_a_registry_of_its_own(state_dir):
    from flows.config import find_runbook
    from rollback_runbook.demo import DEMO_REGISTRY

    book = find_runbook(MODEL)
    assert DEMO_REGISTRY not in {e.registry for e in book.environments.values()}
    assert "demo-registry" in DEMO_REGISTRY


def test_commands_give_prefects_temporary_server_time_on_a_slow_machine():
    probe = (
        "import os; from rollback_runbook.cli.common import quiet_env; quiet_env(); "
        "from prefect.settings import get_current_settings as s; "
        "print(s().server.ephemeral.startup_timeout_seconds)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_EPHEMERAL")}
    res = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT
    )
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) >= 120


def test_errors_map_to_codes_in_one_place():
    from blocks.registry import InvalidName
    from flows.config import RunbookError
    from rollback_runbook.cli.errors import translate

    assert translate(RunbookError("x.yaml", ["a: wrong"]))[0] == 2
    assert translate(InvalidName("invalid version " + "v" * 10_000))[0] == 2
    assert len(translate(InvalidName("invalid version " + "v" * 10_000))[1]) < 700
    code, message = translate(ZeroDivisionError("division by zero"))
    assert code == 1 and message.startswith("ZeroDivisionError: division by zero")
    assert translate(OSError(36, "File name too long"))[0] == 2
    assert translate(ConnectionRefusedError(111, "Connection refused"))[0] == 3  # unreachable


@pytest.fixture
def api_wanting_a_login():
    """A real HTTP server that answers every request 401, as a Prefect API with
    PREFECT_SERVER_API_AUTH_STRING does to a caller without the login."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "31")
            self.end_headers()
            self.wfile.write(b'{"exception_message":"Unauth"}\n')

        do_GET = do_POST = do_PATCH = do_PUT = _refuse

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_an_api_that_wants_a_login_says_so_in_one_line(api_wanting_a_login):
    run_id = "00000000-0000-4000-8000-000000000001"
    res = cli("approve", run_id, "--as", "U01ONCALL", PREFECT_API_URL=api_wanting_a_login)
    line = one_line(res)
    assert res.returncode == 1, res.stderr
    assert "refused the login (401)" in line and "PREFECT_API_AUTH_STRING" in line, line
    assert "Traceback" not in res.stderr
