"""Debian's real Prometheus and Alertmanager, configured only from docs/monitoring.md, roll
back a degraded model of a `runbook init` project running under `runbook stack`.

The chain: an exporter of ours serves ``model_accuracy{model="churn-classifier"} 0.61``;
Prometheus scrapes it and evaluates the doc's rules; Alertmanager routes the firing alert
by the doc's route to the receiver with the token from the doc's ``credentials_file``; the
receiver starts the rollback run; production goes back from the degraded 1.2.0 to 1.1.0.
Only timers are shortened (scrape and evaluation every second, ``for`` and ``group_wait``
of a few seconds): everything else is the doc's text.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.stack_fixtures import free_port
from tests.test_monitoring_docs import snippets

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def binary(*names: str) -> str:
    for name in names:
        if found := shutil.which(name):
            return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{names[0]} is not installed (scripts/install-test-deps)")
    pytest.skip(f"{names[0]} is not installed (scripts/install-test-deps)")


class Exporter:
    """A /metrics endpoint in Prometheus' text format, holding one gauge per model."""

    def __init__(self, accuracy: float):
        self.accuracy = accuracy
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = (
                    "# TYPE model_accuracy gauge\n"
                    f'model_accuracy{{model="churn-classifier"}} {exporter.accuracy}\n'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw
        )


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_for(what: str, check, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
    raise AssertionError(f"{what} within {timeout:.0f}s\n{tails}")


def test_prometheus_and_alertmanager_from_the_doc_roll_back_an_init_project(tmp_path):
    prometheus = binary("prometheus")
    alertmanager = binary("prometheus-alertmanager", "alertmanager")
    project = tmp_path / "team"
    made = subprocess.run([str(BIN / "runbook"), "init", str(project)], capture_output=True)
    assert made.returncode == 0, made.stderr

    # -- the receiver's token, as the doc says: a private file, exported for the stack ----
    token_file = tmp_path / "rollback-receiver-token"
    token_file.write_text(secrets.token_hex(32) + "\n")
    token_file.chmod(0o600)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOK_", "SLACK_"))
    }
    env |= {
        "RUNBOOK_INTAKE_ALERTMANAGER_TOKEN": token_file.read_text().strip(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    api_port, receiver_port = free_port(), free_port()
    stack_log = tmp_path / "stack.log"
    stack = start(
        [str(BIN / "runbook"), "stack", "--port", str(api_port),
         "--receiver-port", str(receiver_port)],
        stack_log, cwd=project, env=env,
    )  # fmt: skip
    exporter = Exporter(accuracy=0.61)
    procs: list[subprocess.Popen] = []
    logs = [stack_log]
    try:
        wait_for("the stack up", lambda: "local stack is up" in stack_log.read_text(), 420, logs)
        client_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{api_port}/api"}
        seeded = subprocess.run(
            [str(BIN / "runbook"), "seed-example", "--env", "production"],
            cwd=project, env=client_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert seeded.returncode == 0, seeded.stdout + seeded.stderr
        assert production_version(project) == "1.2.0"  # degraded

        # -- Alertmanager: the doc's file, the receiver's port and the token file's path --
        am_port, am_cluster = free_port(), free_port()
        am_config = tmp_path / "alertmanager.yml"
        text = snippets()["alertmanager.yml"]
        text = text.replace("127.0.0.1:8787", f"127.0.0.1:{receiver_port}")
        text = text.replace("/etc/prometheus/rollback-receiver-token", str(token_file))
        text = text.replace("group_wait: 10s", "group_wait: 1s")
        am_config.write_text(text)
        am_log = tmp_path / "alertmanager.log"
        logs.append(am_log)
        procs.append(
            start(
                [
                    alertmanager,
                    f"--config.file={am_config}",
                    f"--storage.path={tmp_path / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    f"--cluster.listen-address=127.0.0.1:{am_cluster}",
                ],
                am_log,
            )
        )

        # -- Prometheus: the doc's rules and configuration, timers shortened --------------
        rules = yaml.safe_load(snippets()["rollback-rules.yml"])
        for rule in rules["groups"][0]["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
        (tmp_path / "rollback-rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = snippets()["prometheus.yml"]
        config = re.sub(r"(scrape|evaluation)_interval: 15s", r"\1_interval: 1s", config)
        config = config.replace("127.0.0.1:9093", f"127.0.0.1:{am_port}")
        config = config.replace("127.0.0.1:9100", f"127.0.0.1:{exporter.port}")
        (tmp_path / "prometheus.yml").write_text(config)
        prom_port = free_port()
        prom_log = tmp_path / "prometheus.log"
        logs.append(prom_log)
        procs.append(
            start(
                [
                    prometheus,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                prom_log,
                cwd=tmp_path,
            )
        )

        receiver_log = project / ".state" / "logs" / "receiver.log"
        logs.append(receiver_log)
        wait_for(
            "production rolled back to 1.1.0 by the alert",
            lambda: production_version(project) == "1.1.0",
            300,
            logs,
        )
        history = subprocess.run(
            [str(BIN / "runbook"), "history", "churn-classifier", "--json"],
            cwd=project, env=client_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert history.returncode == 0, history.stderr
        assert "alertmanager" in history.stdout and "0.61" in history.stdout
    finally:
        exporter.stop()
        for proc in procs:
            stop(proc)
        stop(stack, grace=60)


def production_version(project: Path) -> str | None:
    pointer = project / ".state" / "registry" / "churn-classifier" / "pointers" / "production.json"
    try:
        return json.loads(pointer.read_text()).get("version")
    except (OSError, ValueError):
        return None
