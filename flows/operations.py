"""Registry operations outside an incident: promote a version, seed the example model.

These feed the registry the way a team's CI would (publish, promote, verify), so the
rollback flow has a history to read: which versions were live, and which passed checks.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from blocks.registry import JournalEntry, ModelRegistry, Pointer
from flows.config import Runbook


def promote(
    registry: ModelRegistry,
    runbook: Runbook | None,
    version: str,
    env: str,
    *,
    by: str,
    reason: str = "promote",
    verify: bool = True,
    keep_unverified: bool = False,
):
    """Move ``env`` forward to ``version`` (checksums checked), then verify it if asked.

    Returns (pointer, verification result or None). Safe by default: a version that does
    not pass verification is taken out again, the previous pointer put back (compare-and-
    swap on the pointer just written, so a move by someone else in between is never
    overwritten), and the promote is journaled ``failed``. ``keep_unverified`` leaves it
    live on purpose, journaled as ``kept_unverified``. The returned pointer is what is live
    afterwards.
    """
    current = registry.pointer(env)
    registry.manifest(version)  # an unknown version is refused before anything is written
    moves = {"from": current.version if current else None, "to": version}

    def record(status: str, phase: str = "result", **details: Any) -> None:
        registry.append(
            JournalEntry(
                action="promote",
                phase=phase,
                status=status,
                env=env,
                actor=by,
                details={**moves, **details},
            )
        )

    record("started", phase="intent", keep_unverified=keep_unverified)
    moved: Pointer | None = None
    try:
        moved = registry.swap_pointer(env, version, expected=current, by=by, reason=reason)
        result = None
        if verify and runbook is not None:
            from flows.steps.verify import verify_and_record

            result = verify_and_record(runbook, registry, env, version)
        if result is not None and not result.passed:
            moved = _not_passed(registry, env, version, current, moved, result, by,
                                keep_unverified, record)  # fmt: skip
            return moved, result
    except BaseException as e:  # the intent gets its outcome: what happened, then re-raise
        with contextlib.suppress(Exception):  # the store may be what failed
            record(
                "failed",
                moved=moved is not None,
                error=f"{type(e).__name__}: {str(e)[:500]}",
            )
        raise
    record("ok", verified=result.summary() if result else "not verified")
    return moved, result


def _not_passed(registry, env, version, current, moved, result, by, keep, record) -> Pointer:
    """A promoted version that did not pass: put the previous one back, or keep it (asked)."""
    summary = result.summary()
    if keep:
        record("kept_unverified", verified=summary, reason=f"kept live unverified: {summary}")
        return moved
    if current is None:  # nothing was live before: there is nothing to put back
        record(
            "failed",
            verified=summary,
            put_back=None,
            reason=f"verification failed; nothing was live before, {version} stays: {summary}",
        )
        return moved
    back = registry.swap_pointer(
        env,
        current.version,
        expected=moved,
        by=by,
        reason=f"promote of {version} failed verification; put {current.version} back",
        check=False,  # it was live a moment ago; a corrupt file must not keep the bad one
    )
    record(
        "failed",
        verified=summary,
        put_back=current.version,
        reason=f"verification failed, {current.version} put back: {summary}",
    )
    return back


def seed_example(
    registry: ModelRegistry, runbook: Runbook, env: str = "production", healthy: bool = False
) -> list[str]:
    """Train and publish the example churn versions; leave ``env`` on the degraded newest one.

    1.0.0 and 1.1.0 are promoted and pass verification; 1.2.0 (trained on corrupted labels)
    is promoted without the golden-set check, the way a regression reaches production.
    With ``healthy``, 1.2.0 is published but not promoted (a staging for drills).
    """
    from rollback_runbook.example.churn import build_versions

    tmp = Path(tempfile.mkdtemp(prefix="churn-versions-"))
    try:
        built = build_versions(tmp)
        parent = None
        for version, folder, metrics in built:
            registry.publish(
                version,
                folder,
                created_by="ci@example.com",
                parent=parent,
                metrics=metrics,
                notes="example churn classifier",
            )
            degraded = version == built[-1][0]
            if degraded and healthy:
                break
            promote(
                registry,
                runbook,
                version,
                env,
                by="ci@example.com",
                reason="release" if not degraded else "release (golden-set check skipped)",
                verify=not degraded,
            )
            parent = version
        return [v for v, _, _ in built]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
