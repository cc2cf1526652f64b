"""The starter project ``runbook init`` writes: the example runbook, its suite, templates,
golden dataset and ``prefect.yaml``.

An installed wheel carries them under ``rollback_runbook/starter/`` (hatch
``force-include`` of the repository's own ``runbooks/`` and ``prefect.yaml``: one copy in
the repository); a checkout reads the repository's files.
"""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

#: entrypoints become module paths (``flows/x.py:f`` -> ``flows.x:f``): an initialised
#: project has no flows/ folder of its own, every deployment's flow is the installed one
_ENTRYPOINT = re.compile(r"entrypoint: flows/([A-Za-z0-9_]+)\.py:")
_ENTRYPOINTS = {
    # an initialised project has no .venv of its own: the `prefect` of the installed tool
    ".venv/bin/prefect": "prefect",
    "(start the worker with prefect so flows/ and blocks/ import)": (
        "(start the worker from the environment `runbook` is installed in)"
    ),
}


class StarterError(Exception):
    """The target folder cannot take the starter project; nothing was written."""


def source() -> Traversable:
    """Where the starter files are: the wheel's copy, or the checkout's own files."""
    packaged = files("rollback_runbook") / "starter"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "runbooks").is_dir() and (checkout / "prefect.yaml").is_file():
        return checkout  # type: ignore[return-value]
    raise StarterError("the starter files are missing from this installation")


def _walk(node: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    found = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        name = f"{prefix}{child.name}"
        if child.name.startswith(".") or child.name == "__pycache__":
            continue
        if child.is_dir():
            found.extend(_walk(child, f"{name}/"))
        else:
            found.append((name, child))
    return found


def starter_files() -> list[tuple[str, Traversable]]:
    """(relative path, source) of every file of the starter project."""
    root = source()
    return [("prefect.yaml", root / "prefect.yaml"), *_walk(root / "runbooks", "runbooks/")]


def write_starter(dest: Path, force: bool = False) -> list[str]:
    """Write the starter project into ``dest``; refuse a non-empty folder unless ``force``."""
    if dest.exists() and not dest.is_dir():
        raise StarterError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise StarterError(f"{dest} is not empty; use --force to write the starter files into it")
    written = []
    for name, src in starter_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        if name == "prefect.yaml":
            text = _ENTRYPOINT.sub(r"entrypoint: flows.\1:", data.decode())
            for old, new in _ENTRYPOINTS.items():
                text = text.replace(old, new)
            data = text.encode()
        target.write_bytes(data)
        written.append(name)
    return written


# -- a second model: `runbook init --model NAME` -----------------------------------------

_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

_PREDICTOR_MODULE = '''"""The predictor of {model}: a version's files and input rows -> predictions.

The runbook names it as ``verify.predictor: {module}:predict``; the project folder is on
the import path of every runbook command and of the stack's processes, so this file
needs no PYTHONPATH. The interface (docs/own-model.md, rollback_runbook/predictor.py):

    predict(model_dir: Path, frame: DataFrame) -> DataFrame with a ``prediction`` column
    (and optionally ``probability`` in [0, 1]), one row per input row, same index.

As written it delegates to the example model so that the new runbook validates and drills
as is; replace the body with the loading and scoring of your model's own files.
"""

from pathlib import Path

import pandas as pd

from rollback_runbook.example.churn import predict as example_predict


def predict(model_dir: Path, frame: pd.DataFrame) -> pd.DataFrame:
    return example_predict(model_dir, frame)
'''


def _model_runbook(text: str, model: str, module: str) -> str:
    """The example runbook's text made ``model``'s: name, registries, alert labels, suite,
    dataset and predictor (comments kept, so the file still explains itself)."""
    text = text.replace("churn-classifier", model).replace("the churn classifier", model)
    text = text.replace("data/churn-golden.csv", f"data/{model}-golden.csv")
    text = re.sub(r"(?m)^description: .*$", f"description: {model} (describe what it does).", text)
    text = re.sub(r"(?m)^(\s*predictor:) .*$", rf"\1 {module}:predict", text)
    # the example's staging model server is the example's: a second model starts without
    # one (add `serving:` when it has its own, see docs/serving.md)
    text = re.sub(r"(?m)^\s*serving: \{kind: model-server.*\n", "", text)
    return text


def add_model(dest: Path, model: str) -> list[str]:
    """Add a runbook for ``model`` to the project in ``dest``: ``runbooks/<model>.yaml``,
    its suite, its golden dataset and its predictor module ``my_models/<model>.py``,
    all made from the example's. Refuses a bad name or a model that already has files."""
    if not _MODEL_NAME.fullmatch(model):
        raise StarterError(
            f"model name {model!r}: use lower-case letters, digits and '-' (e.g. fraud-scorer)"
        )
    if not (dest / "runbooks").is_dir():
        raise StarterError(f"{dest} has no runbooks/ folder: run `runbook init {dest}` first")
    root = source()
    module_name = model.replace("-", "_")
    files = {
        f"runbooks/{model}.yaml": _model_runbook(
            (root / "runbooks" / "churn-classifier.yaml").read_text(),
            model,
            f"my_models.{module_name}",
        ),
        f"runbooks/expectations/{model}.json": (
            (root / "runbooks" / "expectations" / "churn-classifier.json")
            .read_text()
            .replace("churn-classifier", model)
        ),
        f"runbooks/data/{model}-golden.csv": (
            root / "runbooks" / "data" / "churn-golden.csv"
        ).read_text(),
        f"my_models/{module_name}.py": _PREDICTOR_MODULE.format(
            model=model, module=f"my_models.{module_name}"
        ),
    }
    taken = [name for name in files if (dest / name).exists()]
    if taken:
        raise StarterError(f"{', '.join(taken)} exist already: {model} has a runbook")
    (dest / "my_models").mkdir(exist_ok=True)
    init = dest / "my_models" / "__init__.py"
    written = []
    if not init.exists():
        init.write_text('"""The project\'s own predictors (docs/own-model.md)."""\n')
        written.append("my_models/__init__.py")
    for name, text in files.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(name)
    return written
