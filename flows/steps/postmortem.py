"""Step 6, open post-mortem: fill the runbook's template with what actually happened.

Templates are runbook data that anyone may edit, and they render alert text from outside,
so they run in Jinja2's sandbox with undefined names as errors. The draft is published as a
Prefect markdown artifact and stored beside the registry under ``documents/postmortems/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from blocks.registry import JournalEntry, ModelRegistry


def render_template(path: Path, context: dict[str, Any]) -> str:
    env = SandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True
    )
    env.filters["seconds"] = lambda s: f"{s:.2f}s" if s is not None else "-"
    return env.from_string(path.read_text(encoding="utf-8")).render(**context)


@task(name="open-postmortem", cache_policy=NO_CACHE, persist_result=False)
def open_postmortem(
    template: Path, registry: ModelRegistry, incident: str, context: dict[str, Any]
) -> str:
    text = render_template(template, context)
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
