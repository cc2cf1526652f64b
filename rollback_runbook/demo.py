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
_REGISTRY_ENTRIES |= {"claims", "locks", "tmp", ".tmp"}
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


def run_demo(book: Any, url: str, say: Callable[[str], None]) -> DemoResult:
    """Seed the example into ``url``'s registry, break production, raise the alert, roll back."""
    from blocks.registry import JournalEntry, open_registry
    from flows.operations import seed_example
    from flows.steps.trigger import Trigger
    from flows.steps.verify import measure_accuracy
    from rollback_runbook.local_run import run_rollback_flow

    t0 = time.perf_counter()
    if url.startswith("file://"):
        reset_example_registry(url, book.model)
    reg = open_registry(url, book.model)
    say(f"[bold]1/4[/bold] seeding {reg.location()} with the example churn-classifier versions ...")
    versions = seed_example(reg, book)
    live = reg.pointer("production")
    say(
        f"     published {', '.join(versions)}; "
        f"production is on [bold]{live.version}[/bold] (degraded)"
    )
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
        "on a busy machine that can take a minute) ..."
    )
    report = run_rollback_flow(
        runbook=book.source, environment="production", trigger=trigger, registry_url=url
    )
    say("[bold]4/4[/bold] done")
    final = reg.pointer("production")
    good = (
        report["outcome"] == "restored"
        and final.version == report["to_version"]
        and bool(reg.verifications(final.version, "production")[-1].passed)
    )
    seconds = round(time.perf_counter() - t0, 2)
    return DemoResult(report=report, good=good, seconds=seconds, registry=url)
