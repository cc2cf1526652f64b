"""Step 6, open post-mortem: fill the runbook's template with what actually happened.

Templates are runbook data that anyone may edit, and they render alert text from outside,
so they run in Jinja2's sandbox with undefined names as errors. They are read through a
loader that only opens files inside the runbook's folders (``flows.config.contain``), a
second check after the one at load time: a template swapped for a symlink to
``/proc/self/environ`` after loading is still refused. The draft is published as a Prefect
markdown artifact and stored beside the registry under ``documents/postmortems/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from blocks.registry import JournalEntry, ModelRegistry
from flows.config import template_environment


def render_template(
    path: Path, context: dict[str, Any], roots: Sequence[Path] | None = None
) -> str:
    """Render the template at ``path``; it and its includes must lie inside ``roots``.

    ``roots`` defaults to the template's own folder; pass ``Runbook.allowed_roots()``.
    Raises ``jinja2.exceptions.SecurityError`` for a file outside them.
    """
    path = Path(path)
    roots = list(roots) if roots is not None else [path.parent.resolve()]
    env = template_environment(path.parent, roots)
    return env.get_template(path.name).render(**context)


@task(name="open-postmortem", cache_policy=NO_CACHE, persist_result=False)
def open_postmortem(
    template: Path,
    registry: ModelRegistry,
    incident: str,
    context: dict[str, Any],
    roots: Sequence[Path] | None = None,
) -> str:
    text = render_template(template, context, roots)
    location = registry.put_document(f"postmortems/{incident}.md", text)
    try:
        create_markdown_artifact(
            markdown=text,
            key=f"postmortem-{registry.model}".lower().replace("_", "-").replace(".", "-"),
            description=f"Post-mortem draft for {incident}",
        )
    except Exception:  # no flow run context (plain .fn call): the stored file still counts
        pass
    registry.append(
        JournalEntry(
            action="postmortem",
            incident=incident,
            env=context.get("env"),
            details={"location": location},
        )
    )
    return location
