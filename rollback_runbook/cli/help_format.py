"""Help pages a person can read: no ``<bool>`` type label on flags, no broken wraps.

Typer 0.29 labels every option with its type, flags included (``--json <bool>``), which
reads as if the flag took a value. A flag takes none: its label is dropped. Options that
take a value keep theirs (``--port <int>``). It also keeps the docstring's own line breaks
after the first paragraph, so a command's description wrapped at 88 columns in the source
breaks again at the terminal's width ("follows the / pointer"): lines of a paragraph are
joined, except indented ones and list items, which stay on their own lines.
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


def _reflow(paragraph: str) -> str:
    if paragraph.startswith("\b"):
        return paragraph
    out: list[str] = []
    for line in paragraph.splitlines():
        keep = not out or line[:1].isspace() or line.lstrip().startswith(("- ", "* "))
        if keep:
            out.append(line)
        else:
            out[-1] = f"{out[-1].rstrip()} {line.strip()}"
    return "\n".join(out)


def reflow_help() -> None:
    """Join the single line breaks of help paragraphs (Typer keeps them)."""
    from typer import rich_utils

    if getattr(rich_utils, "_paragraphs_reflowed", False):
        return
    joined = rich_utils._fix_linebreaks

    def fix_linebreaks(paragraphs: list[str], markup_mode: Any) -> str:
        return joined([_reflow(p) for p in paragraphs], markup_mode)

    rich_utils._fix_linebreaks = fix_linebreaks
    rich_utils._paragraphs_reflowed = True  # type: ignore[attr-defined]


def clean_help() -> None:
    """Both fixes; the CLI app calls this once at import."""
    clean_flag_labels()
    reflow_help()
