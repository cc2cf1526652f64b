"""The predictor interface: how a runbook turns a model version's files into predictions.

A runbook names its predictor in ``verify.predictor`` as ``package.module:function``.
Verification (and the model server, ``runbook model-server``) calls it with the folder of
one version's files, fetched from the registry and checked against its manifest, and the
golden dataset's rows without the label column::

    def predict(model_dir: Path, frame: pandas.DataFrame) -> pandas.DataFrame: ...

It returns one row per input row, indexed like ``frame``, with a ``prediction`` column
(compared with the label column by the suite) and, optionally, ``probability``; any
other column is kept and may be checked by the suite too. It must not write into
``model_dir`` (a shared, read-only copy) and should be deterministic: verification of the
same version on the same data must give the same verdict.

Errors: raise any exception for a version that cannot predict (a missing file, a wrong
feature). Verification records the exception's type and first line and the version does
not pass; nothing is restored on the strength of a predictor that failed.

The module is imported from the installed packages or from the project folder (the one
that holds ``runbooks/``), so ``my_models/fraud.py`` there is ``my_models.fraud:predict``
with no PYTHONPATH (``rollback_runbook.settings.use_project_imports``). See
docs/own-model.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pandas as pd

PREDICTION = "prediction"
PROBABILITY = "probability"


@runtime_checkable
class Predictor(Protocol):
    """``predict(model_dir, frame) -> DataFrame[prediction, probability?]``."""

    def __call__(self, model_dir: Path, frame: pd.DataFrame) -> pd.DataFrame: ...


class PredictorError(ValueError):
    """The predictor's answer breaks the interface; the message says how."""


def check_predictions(frame: pd.DataFrame, out: Any, name: str = "the predictor") -> None:
    """Raise ``PredictorError`` unless ``out`` is what the interface promises for ``frame``:
    a DataFrame with a ``prediction`` column, one row per input row, the same index, and a
    numeric ``probability`` within [0, 1] if it has one."""
    import pandas as pd

    if not isinstance(out, pd.DataFrame):
        raise PredictorError(f"{name} returned {type(out).__name__}, not a pandas DataFrame")
    if PREDICTION not in out.columns:
        columns = ", ".join(map(str, out.columns[:8])) or "none"
        raise PredictorError(f"{name} returned no {PREDICTION!r} column (columns: {columns})")
    if len(out) != len(frame):
        raise PredictorError(f"{name} returned {len(out)} rows for {len(frame)} input rows")
    if not out.index.equals(frame.index):
        raise PredictorError(f"{name} returned rows indexed unlike its input (keep frame.index)")
    if PROBABILITY in out.columns:
        probability = pd.to_numeric(out[PROBABILITY], errors="coerce")
        if probability.isna().any() or ((probability < 0) | (probability > 1)).any():
            raise PredictorError(f"{name}'s {PROBABILITY!r} column must be numbers in [0, 1]")


def predict_checked(
    predictor: Predictor, model_dir: Path, frame: pd.DataFrame, name: str = "the predictor"
) -> pd.DataFrame:
    """``predictor(model_dir, frame)``, its answer checked against the interface."""
    out = predictor(Path(model_dir), frame)
    check_predictions(frame, out, name)
    return out
