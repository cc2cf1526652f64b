"""Step 6, open post-mortem: fill the runbook's template with what actually happened.

Templates are runbook data that anyone may edit, and they render alert text from outside,
so they run in Jinja2's sandbox with undefined names as errors. They are read through a
loader that only opens files inside the runbook's folders (``flows.config.contain``), a
second check after the one at load time: a template swapped for a symlink to
``/proc/self/environ`` after loading is still refused. The draft is published as a Prefect
markdown artifact and stored beside the registry under ``documents/postmortems/``.

Every value a template shows is escaped for Markdown (``rollback_runbook.escape``): an
alert summary holding "## Outcome" or "**FALSE ALARM**" renders as that text, never as a
heading of the post-mortem. A render has a time and size budget (``flows.templating``); a
template that fails or runs over it still leaves a post-mortem: a plain one, from the
same facts, with the error at the top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from blocks.registry import JournalEntry, ModelRegistry
from flows.config import template_environment
from flows.steps._log import step_logger
from flows.templating import render_bounded
from rollback_runbook.escape import markdown, text_of


def render_template(
    path: Path,
    context: dict[str, Any],
    roots: Sequence[Path] | None = None,
    escape: Callable[[Any], str] = markdown,
) -> str:
    """Render the template at ``path``; it and its includes must lie inside ``roots``.

    ``roots`` defaults to the template's own folder; pass ``Runbook.allowed_roots()``.
    Every value is passed through ``escape`` (Markdown by default). Raises
    ``jinja2.exceptions.SecurityError`` for a file outside them and
    ``flows.templating.TemplateBudgetExceeded`` for a render over its budget.
    """
    path = Path(path)
    roots = list(roots) if roots is not None else [path.parent.resolve()]
    env = template_environment(path.parent, roots, escape)
    return render_bounded(env.get_template(path.name), context)


def render_notice(path: Path, context: dict[str, Any], roots: Sequence[Path] | None = None) -> str:
    """The user notice, values unescaped: it is posted to Slack, whose message builder
    escapes the whole text for mrkdwn (escaping it for Markdown first would show
    backslashes there)."""
    return render_template(path, context, roots, escape=text_of)


def plain_postmortem(context: dict[str, Any], error: BaseException | str) -> str:
    """A post-mortem made without the runbook's template, for when that template failed.

    Built from the same facts, every value escaped, with the template's error on top so
    the on-call engineer knows why it looks plain.
    """
    md = markdown
    trigger = context.get("trigger") or {}
    decision = context.get("decision") or {}
    verification = context.get("verification") or {}
    lines = [
        f"# Post-mortem draft: {md(context.get('model'))} rollback in {md(context.get('env'))}",
        "",
        f"> The runbook's post-mortem template failed ({md(error)}); this is the plain draft.",
        "",
        f"- Incident: {md(context.get('incident'))}",
        f"- Outcome: {md(context.get('outcome'))}",
        f"- From version: {md(context.get('from_version') or 'unknown')}",
        f"- To version: {md(context.get('to_version') or '-')}",
        f"- Final version: {md(context.get('final_version') or '-')}",
        f"- Reason: {md(context.get('reason') or '-')}",
        f"- Trigger: {md(trigger.get('source'))} {md(trigger.get('metric') or '')} "
        f"{md(trigger.get('value') if trigger.get('value') is not None else '')}".rstrip(),
        f"- Decision: {md(decision.get('describe') or 'no approval was requested')}",
        f"- Verification: {md(verification.get('summary') or 'none ran')}",
        f"- Drafted: {md(context.get('finished_at'))}",
        "",
        "## Timeline",
        "",
        "| Step | Started (UTC) | Duration | Outcome | Detail |",
        "|---|---|---|---|---|",
    ]
    for step in context.get("steps") or []:
        lines.append(
            f"| {md(step.get('name'))} | {md(step.get('started_at'))} | "
            f"{md(step.get('seconds'))} | {md(step.get('outcome'))} | {md(step.get('detail'))} |"
        )
    return "\n".join(lines) + "\n"


def render_postmortem(
    template: Path, context: dict[str, Any], roots: Sequence[Path] | None = None
) -> tuple[str, str | None]:
    """(the post-mortem, the template's error or None): the plain draft when it failed."""
    try:
        return render_template(template, context, roots), None
    except Exception as e:  # a template error, a budget, an unreadable file: still a draft
        error = f"{type(e).__name__}: {e}"
        return plain_postmortem(context, error), error


@task(name="open-postmortem", cache_policy=NO_CACHE, persist_result=False)
def open_postmortem(
    template: Path,
    registry: ModelRegistry,
    incident: str,
    context: dict[str, Any],
    roots: Sequence[Path] | None = None,
) -> str:
    text, error = render_postmortem(template, context, roots)
    if error is not None:
        step_logger().warning("Post-mortem template failed, wrote the plain draft: %s", error)
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
            details={"location": location, **({"template_error": error} if error else {})},
        )
    )
    return location
