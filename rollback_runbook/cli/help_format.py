"""Help pages a person can read: no ``<bool>`` type label on flags.

Typer 0.29 labels every option with its type, flags included (``--json <bool>``), which
reads as if the flag took a value. A flag takes none: its label is dropped. Options that
take a value keep theirs (``--port <int>``).
"""

from __future__ import annotations

from typing import Any


def clean_flag_labels() -> None:
    """Drop the type label of flag options (``is_flag``) in every Typer help page."""
    from typer.core import TyperOption

    if getattr(TyperOption, "_flags_unlabelled", False):
        return
    labelled = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return labelled(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
    TyperOption._flags_unlabelled = True  # type: ignore[attr-defined]
