"""The demo's work, apart from the CLI: its own registry, the example versions, the alert.

``runbook demo`` keeps the example in a registry of its own (``DEMO_REGISTRY``), so it never
wipes the registry a user works with. ``reset_example_registry`` deletes a folder only when
its content shows it is a registry of the example model and nothing else.
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

#: what a local registry folder may hold (blocks/registry.py's key layout)
_REGISTRY_ENTRIES = {"versions", "index", "pointers", "verifications", "journal", "documents"}
_REGISTRY_ENTRIES |= {"claims", "locks", "indexes", "tmp", ".tmp"}
_EXAMPLE_FILES = {"model.json", "config.yaml"}


class RefusedReset(Exception):
    """The folder is not (only) a registry of the example model: nothing was deleted."""


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
        raise RefusedReset(f"refusing to reset {root}: {why}; nothing was deleted")
    shutil.rmtree(root)


@dataclass
class DemoResult:
    report: dict[str, Any]
    good: bool
    seconds: float
    registry: str
    traffic: dict[str, Any] | None = None


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

        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    got = client.post(f"{self.url}/predict", json={"rows": self.rows})
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


def demo_runbook(book: Any, server_url: str) -> Path:
    """The example runbook with production served by the demo's model server.

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
    folder = state_dir() / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{book.model}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_demo(book: Any, url: str, say: Callable[[str], None]) -> DemoResult:
    """Seed the example into ``url``'s registry, serve it, break production, roll back."""
    import os
    import secrets

    from rollback_runbook.model_server import running
    from rollback_runbook.stack import free_port

    t0 = time.perf_counter()
    if url.startswith("file://"):
        reset_example_registry(url, book.model)
    reg = _seed(book, url, say)
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    secret = os.environ.get("RUNBOOK_MODEL_SERVER_SECRET") or secrets.token_hex(16)
    os.environ["RUNBOOK_MODEL_SERVER_SECRET"] = secret  # the flow's target signs with it
    say(f"     starting the model server on {server} (it follows production's pointer) ...")
    with running(
        book.model, "production", reg_url(reg, url), book.verify.predictor, port=port,
        secret=secret, sample=book.resolve(book.verify.dataset),
        label_column=book.verify.label_column, timeout=180,
    ):  # fmt: skip
        report, traffic = _alert_and_roll_back(book, reg, url, server, say)
    final = reg.pointer("production")
    good = (
        report["outcome"] == "restored"
        and final.version == report["to_version"]
        and bool(reg.verifications(final.version, "production")[-1].passed)
        and traffic["after"] == report["to_version"]
        and traffic["failed"] == 0
    )
    seconds = round(time.perf_counter() - t0, 2)
    return DemoResult(report=report, good=good, seconds=seconds, registry=url, traffic=traffic)


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


def _alert_and_roll_back(book, reg, url, server, say) -> tuple[dict[str, Any], dict[str, Any]]:
    import httpx
    import pandas as pd

    from blocks.registry import JournalEntry
    from flows.steps.trigger import Trigger
    from flows.steps.verify import measure_accuracy
    from rollback_runbook.local_run import run_rollback_flow

    live = reg.pointer("production")
    golden = pd.read_csv(book.resolve(book.verify.dataset))
    rows = json.loads(
        golden.drop(columns=[book.verify.label_column]).head(5).to_json(orient="records")
    )
    before = httpx.post(f"{server}/predict", json={"rows": rows}, timeout=10).json()["version"]
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
        "on a busy machine that can take a minute), with traffic on the model server ..."
    )
    runbook = demo_runbook(book, server)
    with Traffic(server, rows) as traffic:
        report = run_rollback_flow(
            runbook=str(runbook), environment="production", trigger=trigger, registry_url=url
        )
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
        f"{served['requests']} requests during the rollback, {served['failed']} failed"
        + (
            f"; the first answer from {after} came {first:.2f}s after the run took the alert "
            f"up ({from_alert:.2f}s after the alert, the temporary Prefect server's start-up "
            "included)"
            if first is not None and from_alert is not None
            else ""
        )
    )
    return report, served
