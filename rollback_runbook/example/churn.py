"""A small real churn classifier: the example model the demo and the tests roll back.

The data are synthetic and deterministic (a fixed seed), so every machine trains the same
three versions: two good ones and a degraded one whose training labels were corrupted by a
broken upstream join. A version is two files: ``model.json`` (the fitted logistic
regression's weights and scaling) and ``config.yaml`` (the configuration snapshot: feature
order and decision threshold). Predicting needs only numpy; scikit-learn is used to train.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

FEATURES = ["tenure_months", "monthly_charges", "support_calls", "contract_months", "late_payments"]
_TRUE_WEIGHTS = np.array([-0.09, 0.045, 0.9, -0.12, 0.8])
_TRUE_BIAS = -1.2

#: the example versions, oldest first: (version, label corruption rate, decision threshold)
VERSIONS = [("1.0.0", 0.0, 0.5), ("1.1.0", 0.0, 0.5), ("1.2.0", 0.7, 0.5)]


def make_dataset(n: int, seed: int) -> pd.DataFrame:
    """Customers with a churn label drawn from a known logistic model plus a little noise."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "tenure_months": rng.integers(1, 72, n),
            "monthly_charges": rng.normal(70, 20, n).round(2),
            "support_calls": rng.poisson(1.5, n),
            "contract_months": rng.choice([1, 12, 24], n, p=[0.5, 0.3, 0.2]),
            "late_payments": rng.poisson(0.7, n),
        }
    )
    logit = frame[FEATURES].to_numpy(float) @ _TRUE_WEIGHTS + _TRUE_BIAS
    frame["label"] = (logit + rng.normal(0, 0.6, n) > 0).astype(int)
    return frame


def train_version(
    dest: Path, *, corruption: float, threshold: float, seed: int
) -> dict[str, float]:
    """Fit a version into ``dest`` (model.json + config.yaml); return its offline metrics."""
    from sklearn.linear_model import LogisticRegression

    train = make_dataset(4000, seed=seed)
    y = train["label"].to_numpy().copy()
    if corruption:
        rng = np.random.default_rng(seed + 1)
        # the broken join dropped churn events: a share of churners look like stayers
        y[(y == 1) & (rng.random(len(y)) < corruption)] = 0
    x = train[FEATURES].to_numpy(float)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    clf = LogisticRegression(max_iter=1000).fit((x - mean) / scale, y)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.json").write_text(
        json.dumps(
            {
                "kind": "logistic_regression",
                "coef": clf.coef_[0].round(8).tolist(),
                "intercept": round(float(clf.intercept_[0]), 8),
                "mean": mean.round(8).tolist(),
                "scale": scale.round(8).tolist(),
            },
            indent=2,
        )
    )
    (dest / "config.yaml").write_text(
        yaml.safe_dump(
            {"features": FEATURES, "threshold": threshold, "seed": seed}, sort_keys=False
        )
    )
    holdout = make_dataset(2000, seed=seed + 100)
    predicted = predict(dest, holdout)["prediction"].to_numpy()
    return {"offline_accuracy": round(float((predicted == holdout["label"]).mean()), 4)}


def build_versions(dest: Path) -> list[tuple[str, Path, dict[str, float]]]:
    """Train the three example versions under ``dest/<version>``."""
    out = []
    for i, (version, corruption, threshold) in enumerate(VERSIONS):
        folder = dest / version
        metrics = train_version(folder, corruption=corruption, threshold=threshold, seed=11 + i)
        out.append((version, folder, metrics))
    return out


def predict(model_dir: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """The runbook's predictor entry point: a version's folder and inputs -> predictions."""
    model_dir = Path(model_dir)
    model = json.loads((model_dir / "model.json").read_text())
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    x = frame[config["features"]].to_numpy(float)
    z = ((x - np.array(model["mean"])) / np.array(model["scale"])) @ np.array(model["coef"])
    probability = 1.0 / (1.0 + np.exp(-(z + model["intercept"])))
    return pd.DataFrame(
        {
            "probability": probability,
            "prediction": (probability >= config["threshold"]).astype(int),
        },
        index=frame.index,
    )


def write_golden(path: Path, n: int = 1000) -> None:
    """The golden dataset shipped in ``runbooks/data`` (regenerate with this function)."""
    make_dataset(n, seed=2026).to_csv(path, index=False)
