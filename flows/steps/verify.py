"""Step 4, verify: prove the restored version works before anyone is told it does.

The live pointer is read back, the version's files are fetched and checked, the runbook's
predictor runs them over the golden dataset, and the runbook's Great Expectations suite
judges the predictions (``correct`` is 1 where prediction equals label, so the mean of
``correct`` is accuracy). Great Expectations takes seconds to import, so it is imported
here, after the pointer has moved, never on the path from alert to restore.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from blocks.registry import IntegrityError, ModelRegistry, VerificationRecord
from flows.config import Runbook


class ExpectationOutcome(BaseModel):
    expectation: str
    column: str | None = None
    success: bool
    observed: Any = None
    expected: str = ""


#: a verification's verdict: ``failed`` only when the version's own predictions break the
#: suite (or the version cannot predict at all); ``inconclusive`` when the check could not be
#: made (serving unreachable or answering for another version, a store error, a GX error, a
#: moved pointer). Only a conclusive verdict is ever recorded against a version.
Verdict = Literal["passed", "failed", "inconclusive"]


class VerificationResult(BaseModel):
    version: str
    env: str
    passed: bool
    verdict: Verdict = "failed"
    live_version: str | None
    rows: int = 0
    evaluated: int = 0
    successful: int = 0
    accuracy: float | None = None
    expectations: list[ExpectationOutcome] = Field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    served: dict[str, Any] | None = Field(
        default=None, description="what the serving target reported, read back from it"
    )
    live: dict[str, Any] | None = Field(
        default=None, description="the golden set sent through the live endpoint: latency"
    )

    @property
    def conclusive(self) -> bool:
        return self.verdict != "inconclusive"

    def summary(self) -> str:
        if self.error:
            word = "INCONCLUSIVE" if self.verdict == "inconclusive" else "FAILED"
            return f"{word}: {self.error}"
        acc = f", accuracy {self.accuracy:.3f}" if self.accuracy is not None else ""
        where = (
            f" through {self.live['target']} (p99 {self.live['p99_ms']:g} ms)" if self.live else ""
        )
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{verdict}: {self.successful}/{self.evaluated} expectations on {self.rows} rows"
            f"{where}{acc}"
        )


class VerificationFailed(Exception):
    def __init__(self, result: VerificationResult):
        super().__init__(f"{result.version} in {result.env}: {result.summary()}")
        self.result = result


class ModelFault(Exception):
    """The version itself could not predict the golden set: a verdict on the model."""


_prewarm: threading.Thread | None = None


def prewarm(entry_point: str | None = None) -> None:
    """Import Great Expectations, pandas and the predictor in a background thread.

    Started when the run waits for a person's approval, so the seconds these imports take
    (Great Expectations alone takes several) overlap the wait instead of following the
    pointer flip. Not started on auto-approval: there the flip comes within a second and
    the imports would only compete with it. Import errors are left to the verify step.
    """
    global _prewarm
    from rollback_runbook.settings import settings

    if _prewarm is not None or not settings().prewarm:
        return

    def run() -> None:
        try:
            import great_expectations  # noqa: F401
            import pandas  # noqa: F401

            if entry_point:
                importlib.import_module(entry_point.partition(":")[0])
        except Exception:
            pass

    _prewarm = threading.Thread(target=run, name="prewarm-verification", daemon=True)
    _prewarm.start()


def load_predictor(entry_point: str):
    module_name, _, func = entry_point.partition(":")
    try:
        return getattr(importlib.import_module(module_name), func)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"verify.predictor {entry_point!r} cannot be loaded: {e}") from None


def measure_accuracy(runbook: Runbook, registry: ModelRegistry, version: str) -> float:
    """Accuracy of ``version`` on the golden dataset, as a monitor would report it."""
    import pandas as pd

    golden = pd.read_csv(runbook.resolve(runbook.verify.dataset))
    label = runbook.verify.label_column
    with tempfile.TemporaryDirectory(prefix=f"measure-{version}-") as tmp:
        predicted = load_predictor(runbook.verify.predictor)(
            registry.fetch(version, Path(tmp)), golden.drop(columns=[label])
        )
    return float((predicted["prediction"].to_numpy() == golden[label].to_numpy()).mean())


def _describe_kwargs(kwargs: dict[str, Any]) -> str:
    keep = {k: v for k, v in kwargs.items() if k not in ("column", "batch_id", "result_format")}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


def run_suite(frame, suite_path: Path) -> tuple[bool, list[ExpectationOutcome]]:
    """Evaluate a GX suite (JSON) over a pandas frame with an ephemeral context."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)

    data = json.loads(suite_path.read_text())
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("golden")
    batch = (
        source.add_dataframe_asset("predictions")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = gx.ExpectationSuite(**data)
    result = batch.validate(suite, result_format="SUMMARY")
    outcomes = []
    for r in result.results:
        cfg = r.expectation_config
        outcomes.append(
            ExpectationOutcome(
                expectation=cfg.type,
                column=cfg.kwargs.get("column"),
                success=bool(r.success),
                observed=_observed(r.result),
                expected=_describe_kwargs(dict(cfg.kwargs)),
            )
        )
    return bool(result.success), outcomes


def _observed(result: dict[str, Any]) -> Any:
    if "observed_value" in result:
        return _plain(result["observed_value"])
    if "unexpected_count" in result:
        return f"{result['unexpected_count']} unexpected"
    return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def verify_version(
    runbook: Runbook, registry: ModelRegistry, env: str, version: str, target: Any = None
) -> VerificationResult:
    """Read the pointer back and run the suite on ``version``'s predictions.

    With a serving ``target``, what it serves is read back from the serving system (version
    and configuration hash must match), and when it answers predictions the golden set goes
    through the live endpoint instead of a local copy of the version.

    The verdict is ``failed`` only when the suite ran and the predictions broke it, or the
    version's own predictor could not predict the golden set; anything that kept the check
    from being made (see ``Verdict``) is ``inconclusive``, never a verdict on the model.
    """
    import pandas as pd

    started = time.perf_counter()
    result = VerificationResult(
        version=version, env=env, passed=False, verdict="inconclusive", live_version=None
    )
    try:
        live = registry.pointer(env)
        result.live_version = live.version if live else None
        if result.live_version != version:
            raise RuntimeError(f"{env} pointer reads {result.live_version}, expected {version}")
        golden = pd.read_csv(runbook.resolve(runbook.verify.dataset))
        label = runbook.verify.label_column
        if label not in golden.columns:
            raise ValueError(f"golden dataset has no {label!r} column")
        if target is not None:
            result.served = read_back_served(target, registry, version)
        predicted = predict_golden(runbook, registry, version, golden.drop(columns=[label]),
                                   target, result)  # fmt: skip
        if "prediction" not in predicted.columns or label in predicted.columns:
            raise ModelFault(
                f"predictor {runbook.verify.predictor} must return a 'prediction' column "
                f"and must not return the label column {label!r}"
            )
        frame = golden.copy()
        for column in predicted.columns:
            frame[column] = predicted[column].to_numpy()
        frame["correct"] = (frame["prediction"] == frame[label]).astype(int)
        passed, outcomes = run_suite(frame, runbook.resolve(runbook.verify.suite))
        result.passed = passed
        result.verdict = "passed" if passed else "failed"
        result.expectations = outcomes
        result.rows = len(frame)
        result.evaluated = len(outcomes)
        result.successful = sum(o.success for o in outcomes)
        result.accuracy = round(float(frame["correct"].mean()), 4)
    except ModelFault as e:  # the version's own code or files could not predict
        result.verdict = "failed"
        result.error = str(e)
    except Exception as e:  # the check could not be made: not a verdict on the model
        result.verdict = "inconclusive"
        result.error = f"{type(e).__name__}: {e}"
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def read_back_served(target: Any, registry: ModelRegistry, version: str) -> dict[str, Any]:
    """What the serving system says it serves; raise unless it is ``version`` and its config."""
    from blocks.serving import config_hash

    served = target.served()
    want = config_hash(registry.manifest(version))
    if not served.matches(version, want):
        raise RuntimeError(
            f"{target.name} serves {served.version} (config {served.config_hash}), expected "
            f"{version} (config {want})"
        )
    return served.model_dump(mode="json")


def predict_golden(
    runbook: Runbook,
    registry: ModelRegistry,
    version: str,
    features: Any,
    target: Any,
    result: VerificationResult,
) -> Any:
    """Predictions for the golden set: through the live target if it predicts, else offline."""
    from blocks.serving import serves_predictions

    if target is not None and serves_predictions(target):
        from blocks.serving.live import predict_through

        live = predict_through(target, features, version)
        result.live = {"target": target.name, "p50_ms": live.p50_ms, "p99_ms": live.p99_ms,
                       "batches": live.batches}  # fmt: skip
        return live.frame
    predict = load_predictor(runbook.verify.predictor)
    with tempfile.TemporaryDirectory(prefix=f"verify-{version}-") as tmp:
        try:
            folder = registry.fetch(version, Path(tmp))
        except IntegrityError as e:  # the version's own files do not match its manifest
            raise ModelFault(f"{type(e).__name__}: {e}") from None
        try:
            return predict(folder, features)
        except Exception as e:  # the version's predictor fails on the golden set
            raise ModelFault(f"{version} could not predict: {type(e).__name__}: {e}") from None


def verify_and_record(
    runbook: Runbook,
    registry: ModelRegistry,
    env: str,
    version: str,
    incident: str | None = None,
    target: Any = None,
) -> VerificationResult:
    """Verify ``version`` and keep a conclusive verdict: last-known-good reads it later.

    An inconclusive check is not recorded against the version (the journal's ``verify``
    entry says it could not be made): an outage must never demote a good version.
    """
    result = verify_version(runbook, registry, env, version, target)
    if not result.conclusive:
        return result
    registry.record_verification(
        VerificationRecord(
            version=version,
            env=env,
            passed=result.passed,
            at=datetime.now(UTC),
            incident=incident,
            summary={"summary": result.summary(), "accuracy": result.accuracy},
        )
    )
    return result


def __getattr__(name: str) -> Any:
    """``verify_restore`` (the Prefect task) lives in flows.steps.tasks: no Prefect here."""
    if name == "verify_restore":
        from flows.steps import tasks

        return tasks.verify_restore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
