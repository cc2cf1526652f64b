"""Send a dataset through a live serving target: verification from the serving side.

``predict_through(target, frame, expected_version)`` posts the rows in batches, as
production traffic would arrive, and returns the predictions as a frame (same index), the
versions that answered and the endpoint's latency percentiles. Every batch must be answered
by ``expected_version``: an answer from any other version is an error, not a statistic.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from blocks.serving import ServingError, ServingTarget, serves_predictions

if TYPE_CHECKING:
    import pandas as pd


class LivePredictions(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    frame: Any  # pandas.DataFrame: the predictor's columns, indexed like the input
    versions: list[str]
    batches: int
    p50_ms: float
    p99_ms: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def predict_through(
    target: ServingTarget, frame: pd.DataFrame, expected_version: str, batch_size: int = 50
) -> LivePredictions:
    """The predictions ``target`` serves for ``frame``; raises unless all are ``expected``'s."""
    import pandas as pd

    if not serves_predictions(target):
        raise ServingError(f"{target.name} does not answer predictions: verify offline")
    parts, seconds, versions = [], [], []
    for start in range(0, len(frame), batch_size):
        chunk = frame.iloc[start : start + batch_size]
        rows = json.loads(chunk.to_json(orient="records"))
        answer = target.predict(rows)  # type: ignore[attr-defined]
        if answer.version != expected_version:
            raise ServingError(
                f"{target.name}: rows {start}-{start + len(chunk) - 1} were answered by "
                f"{answer.version}, not {expected_version}"
            )
        if len(answer.predictions) != len(chunk):
            raise ServingError(
                f"{target.name}: {len(chunk)} rows sent, {len(answer.predictions)} predictions "
                "came back"
            )
        parts.append(pd.DataFrame.from_records(answer.predictions, index=chunk.index))
        seconds.append(answer.seconds)
        versions.append(answer.version)
    if not parts:
        raise ServingError("no rows to send")
    return LivePredictions(
        frame=pd.concat(parts),
        versions=sorted(set(versions)),
        batches=len(parts),
        p50_ms=round(_percentile(seconds, 0.5) * 1000, 2),
        p99_ms=round(_percentile(seconds, 0.99) * 1000, 2),
    )
