"""The demo's work, apart from the CLI: its own registry, the example versions, the alert.

``runbook demo`` keeps the example in a registry of its own (``DEMO_REGISTRY``), so it never
wipes the registry a user works with. ``reset_example_registry`` deletes a folder only when
its content shows it is a registry of the example model and nothing else.

After the rollback the demo waits for the bake watch (``flows/bake.py``) to see production's
accuracy recover, and shows the incident's impact window: detection, restore, recovery. The
accuracy is read from the demo's model server (``/metrics``, labelled traffic), or from the
Prometheus at ``$RUNBOOK_PROMETHEUS_URL`` when one is set (it scrapes the model server through
the file-based discovery file the demo writes: docs/demo.md).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rollback_runbook.example.churn import VERSIONS

EXAMPLE_MODEL = "churn-classifier"
DEMO_REGISTRY = "file://{state}/demo-registry/churn-classifier"
#: a Prometheus that scrapes the demo's model server (file_sd: ``prometheus_targets_file()``)
PROMETHEUS_ENV = "RUNBOOK_PROMETHEUS_URL"
#: the demo's bake watch: short, so the demo stays quick (docs/bake.md has a real one's)
BAKE = {"window": "30s", "interval": 0.5, "consecutive": 3, "on_not_recovered": "page"}
#: labelled rows per traffic request: the model server's accuracy is over a version's last
#: 200 labelled rows, so a fixed batch that divides 200 gives each version a steady figure
TRAFFIC_ROWS = 50

#: what a local registry folder may hold (blocks/registry.py's key layout)
_REGISTRY_ENTRIES = {"versions", "index", "pointers", "verifications", "journal", "documents"}
_REGISTRY_ENTRIES |= {"claims", "locks", "indexes", "tmp", ".tmp"}
_EXAMPLE_FILES = {"model.json", "config.yaml"}


class RefusedReset(Exception):
    """The folder is not (only) a registry of the example model: nothing was deleted."""


class BadSetting(ValueError):
    """An environment setting the demo reads is unusable (named in the message)."""


def is_example_registry(root: Path) -> str | None:
    """None if ``root`` holds only a registry of the example model; else why it does not."""
    if not root.is_dir():
        return f"{root} is not a folder"
    unknown = sorted(p.name for p in root.iterdir() if p.name not in _REGISTRY_ENTRIES)
    if unknown:
        return f"{root} holds {', '.join(unknown[:5])}, which no registry of the example has"
    examples = {v for v, _, _ in VERSIONS}
    versions = root / "versions"
    for folder in sorted(versions.iterdir()) if versions.is_dir() else []:
        if folder.name not in examples:
            return f"{root} holds version {folder.name}, not one of the example's"
        manifest = folder / "manifest.json"
        try:
            files = set(json.loads(manifest.read_text()).get("files", {}))
        except (OSError, ValueError, AttributeError):
            return f"{manifest} is missing or unreadable"
        if not files <= _EXAMPLE_FILES:
            return f"version {folder.name} in {root} has files the example's do not"
    return None


def reset_example_registry(url: str, model: str = EXAMPLE_MODEL) -> None:
    """Delete a local registry of the example model; refuse anything else."""
    if not url.startswith("file://"):
        raise RefusedReset(f"--reset only empties local example registries (file://), not {url}")
    from blocks.local import LocalRegistry

    root = Path(LocalRegistry.from_url(url, model).root)
    if not root.exists():
        return
    why = is_example_registry(root.resolve())
    if why:
        hint = ""
        if "demo-registry" in root.parts:  # the demo's sandbox, used for publish or promote
            hint = (
                f". It is the demo's own registry: if you published or promoted into it, "
                f"remove it (rm -r '{root}') and run the demo again"
            )
        raise RefusedReset(f"refusing to reset {root}: {why}; nothing was deleted{hint}")
    shutil.rmtree(root)


@dataclass
class DemoResult:
    report: dict[str, Any]
    good: bool
    seconds: float
    registry: str
    traffic: dict[str, Any] | None = None
    impact_window: dict[str, Any] | None = None


class Traffic:
    """Steady requests to the model server while the rollback runs: which version answered."""

    def __init__(self, url: str, rows: list[dict[str, Any]]):
        import threading

        self.url, self.rows = url, rows
        self.answers: list[tuple[float, str | None]] = []  # (wall time, version or None)
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def _run(self) -> None:
        import httpx

        from rollback_runbook.model_server import labelled_request, read_feedback_secret

        secret = read_feedback_secret()  # labelled rows count only when signed with it
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    body, headers = labelled_request(self.rows, secret)  # a fresh nonce each
                    got = client.post(f"{self.url}/predict", content=body, headers=headers)
                    got.raise_for_status()
                    self.answers.append((time.time(), got.json()["version"]))
                except Exception:
                    self.failed += 1
                    self.answers.append((time.time(), None))
                self._stop.wait(0.02)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def first_answer_by(self, version: str, after: float) -> float | None:
        return next((t - after for t, v in self.answers if v == version and t >= after), None)


def bake_section(server_url: str, prometheus_url: str | None = None) -> dict[str, Any]:
    """The demo runbook's ``bake:``: the served accuracy, from the model server's own
    ``/metrics``, or from a Prometheus that scrapes it (this server only: its instance)."""
    if prometheus_url:
        instance = server_url.split("://", 1)[-1].rstrip("/")
        watch = {
            "source": "prometheus",
            "url": prometheus_url,
            "query": f'model_server_accuracy{{instance="{instance}",version="{{version}}"}}',
        }
    else:
        watch = {
            "source": "model-server",
            "url": server_url,
            "query": 'model_server_accuracy{version="{version}"}',
        }
    return {**BAKE, "metrics": {"accuracy": watch}}


def prometheus_url() -> str | None:
    """``$RUNBOOK_PROMETHEUS_URL``, checked: the demo reads accuracy there when it is set."""
    import os

    url = (os.environ.get(PROMETHEUS_ENV) or "").strip().rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        raise BadSetting(f"{PROMETHEUS_ENV}={url!r}: expected an http:// or https:// URL")
    return url or None


def prometheus_targets_file() -> Path:
    """The file_sd file naming the demo's model server while a demo runs (``[]`` after)."""
    from rollback_runbook.settings import state_dir

    return state_dir() / "demo" / "prometheus-targets.json"


def _write_private(path: Path, text: str) -> None:
    """``text`` as ``path``, whole (a temporary file renamed into place, so a reader such as
    Prometheus never sees half of it) and its owner's only whatever the umask: the file
    0600, created without following a link, missing folders 0700."""
    import os

    from blocks.registry import private_dirs

    private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed run (maybe wider, or a link)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_prometheus_targets(server_url: str | None, model: str = EXAMPLE_MODEL) -> Path:
    """Point a Prometheus' ``file_sd_configs`` at ``server_url`` (None: at nothing).

    The file is 0600, like the rest of the demo's state: a Prometheus reading it runs as
    the same user (as docs/demo.md starts it)."""
    path = prometheus_targets_file()
    groups = []
    if server_url:
        target = server_url.split("://", 1)[-1].rstrip("/")
        groups = [{"targets": [target], "labels": {"model": model, "env": "production"}}]
    _write_private(path, json.dumps(groups))
    return path


def demo_runbook(book: Any, server_url: str, prometheus: str | None = None) -> Path:
    """The example runbook with production served by the demo's model server, and a short
    bake watch of its accuracy (from the model server, or from ``prometheus``).

    Written beside the demo's state; its data paths point into the runbooks folder (which
    the runbook's path containment allows).
    """
    import yaml

    from rollback_runbook.settings import state_dir

    data = yaml.safe_load(Path(book.source).read_text(encoding="utf-8"))
    for section, key in (("verify", "suite"), ("verify", "dataset"), ("postmortem", "template"),
                         ("notify", "user_notice_template")):  # fmt: skip
        if data.get(section, {}).get(key):
            data[section][key] = str(book.resolve(data[section][key]))
    prod = data["environments"]["production"]
    prod["serving"] = {"kind": "model-server", "url": server_url}
    data["bake"] = bake_section(server_url, prometheus)
    path = state_dir() / "demo" / f"{book.model}.yaml"
    _write_private(path, yaml.safe_dump(data, sort_keys=False))
    return path


def run_demo(book: Any, url: str, say: Callable[[str], None]) -> DemoResult:
    """Seed the example into ``url``'s registry, serve it, break production, roll back."""
    import os
    import secrets

    from rollback_runbook.model_server import running
    from rollback_runbook.stack import free_port

    t0 = time.perf_counter()
    prometheus = prometheus_url()
    if url.startswith("file://"):
        reset_example_registry(url, book.model)
    reg = _seed(book, url, say)
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    secret = os.environ.get("RUNBOOK_MODEL_SERVER_SECRET") or secrets.token_hex(16)
    os.environ["RUNBOOK_MODEL_SERVER_SECRET"] = secret  # the flow's target signs with it
    say(f"     starting the model server on {server} (it follows production's pointer) ...")
    if prometheus:
        targets = write_prometheus_targets(server, book.model)
        say(f"     {PROMETHEUS_ENV} is set: the bake watch reads accuracy from {prometheus} "
            f"(scraping {server} through {targets})")  # fmt: skip
    try:
        with running(
            book.model, "production", reg_url(reg, url), book.verify.predictor, port=port,
            secret=secret, sample=book.resolve(book.verify.dataset),
            label_column=book.verify.label_column, timeout=180,
        ):  # fmt: skip
            report, traffic, impact = _alert_and_roll_back(book, reg, url, server, prometheus, say)
    finally:
        if prometheus:
            write_prometheus_targets(None)
    final = reg.pointer("production")
    good = (
        report["outcome"] == "restored"
        and final.version == report["to_version"]
        and bool(reg.verifications(final.version, "production")[-1].passed)
        and traffic["after"] == report["to_version"]
        and traffic["failed"] == 0
        and impact.get("bake") == "recovered"
    )
    seconds = round(time.perf_counter() - t0, 2)
    return DemoResult(report=report, good=good, seconds=seconds, registry=url, traffic=traffic,
                      impact_window=impact)  # fmt: skip


def flow_began(report: dict[str, Any]) -> float:
    """Wall time of the run's first step (``HH:MM:SS.mmm`` UTC on the report's day)."""
    day = datetime.fromisoformat(report["started_at"])
    clock = datetime.strptime(report["steps"][0]["started_at"], "%H:%M:%S.%f").time()
    return datetime.combine(day.date(), clock, tzinfo=UTC).timestamp()


def reg_url(reg: Any, url: str) -> str:
    """The registry URL with {state} expanded, for a process with another environment."""
    return f"file://{reg.root}" if url.startswith("file://") else url


def _seed(book: Any, url: str, say: Callable[[str], None]) -> Any:
    from blocks.registry import open_registry
    from flows.operations import seed_example

    reg = open_registry(url, book.model)
    say(f"[bold]1/4[/bold] seeding {reg.location()} with the example churn-classifier versions ...")
    versions = seed_example(reg, book)
    live = reg.pointer("production")
    say(
        f"     published {', '.join(versions)}; "
        f"production is on [bold]{live.version}[/bold] (degraded)"
    )
    return reg


def wait_for_bake(
    book: Any, reg: Any, report: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Any]:
    """The bake watch's verdict on the demo's incident and its figures, from the journal
    (the watch is a thread of this process, or its own flow run on a stack)."""
    from flows.bake import BAKING, latest_bake, wait_verdict

    incident = report.get("incident")
    if report.get("outcome") != "restored" or not incident:
        return {"bake": "not started", "reason": f"the rollback ended {report.get('outcome')}"}
    bake = book.bake
    wait = bake.window + 2 * bake.interval + 30
    say(
        f"     waiting for the bake watch to see accuracy recover on {report.get('to_version')} "
        f"(every {bake.interval:g}s, {bake.consecutive} healthy readings in a row, "
        f"window {bake.window:g}s) ..."
    )
    entry = wait_verdict(reg, incident, timeout=wait, poll=0.2)
    if entry is None:
        seen = latest_bake(reg, incident)
        state = "never started" if seen is None else f"still {BAKING}"
        return {"bake": "no verdict", "reason": f"no bake verdict within {wait:g}s ({state})"}
    baking = next(
        (e for e in reg.incident_entries(incident) if e.action == "bake" and e.status == BAKING),
        None,
    )
    where = (baking.details.get("metrics") or {}).get("accuracy") if baking else None
    watched = bake.metrics.get("accuracy")
    figures = entry.details.get("figures") or {}
    return {
        "bake": entry.status,
        **{k: figures.get(k) for k in ("detection", "restore", "recovery", "impact")},
        "reason": entry.details.get("reason"),
        "readings": entry.details.get("readings"),
        "recovered_at": entry.details.get("recovered_at"),
        "read_from": where,
        "source": watched.source if watched else None,
    }


def _alert_and_roll_back(
    book, reg, url, server, prometheus, say
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    import httpx
    import pandas as pd

    from blocks.registry import JournalEntry
    from flows.steps.trigger import Trigger
    from flows.steps.verify import measure_accuracy
    from rollback_runbook.local_run import run_rollback_flow
    from rollback_runbook.model_server import labelled_request

    live = reg.pointer("production")
    golden = pd.read_csv(book.resolve(book.verify.dataset))
    # labelled traffic (the golden set's label column): the model server judges each row
    # after predicting and keeps the served version's accuracy, which the bake watch reads;
    # it counts labels only from a request signed with its feedback secret (the admin one)
    rows = json.loads(golden.head(TRAFFIC_ROWS).to_json(orient="records"))
    body, headers = labelled_request(rows)
    answer = httpx.post(f"{server}/predict", content=body, headers=headers, timeout=10)
    answer.raise_for_status()
    before = answer.json()["version"]
    say(f"     the model server answers predictions from [bold]{before}[/bold]")
    say("[bold]2/4[/bold] measuring live accuracy on the golden set ...")
    accuracy = measure_accuracy(book, reg, live.version)
    threshold = book.threshold_for("accuracy")
    say(f"     accuracy {accuracy:.3f} < {threshold.below} -> alert fires (severity critical)")
    reg.append(
        JournalEntry(
            action="alert",
            status="firing",
            env="production",
            details={"metric": "accuracy", "value": round(accuracy, 4)},
        )
    )
    trigger = Trigger(
        source="generic",
        metric="accuracy",
        value=round(accuracy, 4),
        severity="critical",
        fingerprint=f"demo-accuracy-{datetime.now(UTC):%Y%m%d%H%M%S}",
        started_at=datetime.now(UTC),
        labels={"model": book.model, "alertname": "ModelAccuracyLow"},
    )
    say(
        "[bold]3/4[/bold] running the rollback flow on a local Prefect API "
        "(a temporary server starts first when PREFECT_API_URL is unset; "
        "on a busy machine that can take a minute), with labelled traffic on the model server ..."
    )
    from flows.config import load_runbook
    from rollback_runbook.settings import settings

    runbook = demo_runbook(book, server, prometheus)
    with Traffic(server, rows) as traffic:
        # {state} expanded: a bake run on a stack's worker must watch this very registry
        report = run_rollback_flow(runbook=str(runbook), environment="production",
                                   trigger=trigger, registry_url=reg_url(reg, url))  # fmt: skip
        impact = wait_for_bake(load_runbook(runbook), reg, report, say)
    # without PREFECT_API_URL the run waited for a temporary server: detection includes it
    impact["temporary_prefect_server"] = not settings().prefect_api_url
    after = httpx.get(f"{server}/version", timeout=10).json()["version"]
    # measured from what each figure names: the alert's own time (which here includes the
    # temporary Prefect server's start-up, a cost a real deployment does not pay), and the
    # moment the run took the alert up (its first step)
    restored = report.get("to_version") or ""
    first = traffic.first_answer_by(restored, flow_began(report))
    from_alert = traffic.first_answer_by(restored, trigger.started_at.timestamp())
    served = {
        "before": before,
        "after": after,
        "requests": len(traffic.answers),
        "failed": traffic.failed,
        "run_start_to_first_request_on_restored": round(first, 3) if first is not None else None,
        "alert_to_first_request_on_restored": (
            round(from_alert, 3) if from_alert is not None else None
        ),
    }
    say("[bold]4/4[/bold] done")
    say(
        f"     the model server now answers from [bold]{after}[/bold] (read from /version); "
        f"{served['requests']} requests during the rollback and the bake watch, "
        f"{served['failed']} failed"
        + (
            f"; the first answer from {after} came {first:.2f}s after the run took the alert "
            f"up ({from_alert:.2f}s after the alert, the temporary Prefect server's start-up "
            "included)"
            if first is not None and from_alert is not None
            else ""
        )
    )
    return report, served, impact
