"""The starter project ``runbook init`` writes: the example runbook, its suite, templates,
golden dataset and ``prefect.yaml``.

An installed wheel carries them under ``rollback_runbook/starter/`` (hatch
``force-include`` of the repository's own ``runbooks/`` and ``prefect.yaml``: one copy in
the repository); a checkout reads the repository's files.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

#: entrypoints as module paths: an initialised project has no flows/ folder of its own
_ENTRYPOINTS = {
    "flows/rollback.py:rollback": "flows.rollback:rollback",
    "flows/drill.py:drill": "flows.drill:drill",
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
            text = data.decode()
            for old, new in _ENTRYPOINTS.items():
                text = text.replace(old, new)
            data = text.encode()
        target.write_bytes(data)
        written.append(name)
    return written
