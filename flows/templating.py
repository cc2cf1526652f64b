"""Rendering runbook templates with a time and an output-size budget.

A template is runbook data anyone may edit; Jinja2's sandbox keeps it from reading files
or calling into Python, but not from looping: two nested ``range(100000)`` loops passed
``runbook validate`` and held the post-mortem for a minute. Here every render:

- stops after ``TEMPLATE_SECONDS`` of wall-clock time: while a template's own code runs, a
  trace function (this thread only) checks the clock on each line of it, so a loop with an
  empty body is stopped too, mid-loop;
- stops once the output passes ``TEMPLATE_MAX_CHARS`` (checked between chunks, and before
  the steps that could build one huge string or number at once: ``*``, ``**``, a format
  width in ``%``, ``str.format`` and the ``format`` filter, ``center`` and ``indent``);
- caps ``range()`` at ``MAX_RANGE`` items.

A template over budget raises ``TemplateBudgetExceeded``. ``runbook validate`` renders each
template with sample data (``sample_contexts``) under the same budget and refuses one that
exceeds it; at run time the post-mortem falls back to a plain draft with the error noted.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from jinja2 import Template
from jinja2.exceptions import SecurityError, TemplateError

#: longest a template may render, in seconds (the shipped post-mortem takes milliseconds)
TEMPLATE_SECONDS = 2.0
#: most characters a rendered template may have (the shipped post-mortem has about 2,000)
TEMPLATE_MAX_CHARS = 1_000_000
#: most items one ``range()`` in a template may give
MAX_RANGE = 10_000
#: largest exponent ``**`` accepts in a template
MAX_EXPONENT = 1_000


class TemplateBudgetExceeded(TemplateError):
    """A template ran longer, or wrote more, than its budget; the message says which."""


#: a width or precision in a format spec (``%9999999s``, ``{:>9999999}``) this long or longer
_WIDE_SPEC = re.compile(
    r"%(\([^)]*\))?[-#0 +]*(\d{7,}|\*|\d*\.(\d{7,}|\*))"  # printf style
    r"|\{[^{}]*:[^{}]*?\d{7,}"  # str.format style (nested fields are refused by the sandbox)
)


def check_format(spec: Any) -> None:
    """Refuse a format string whose width or precision alone would blow the output budget
    (``'%999999999s' % x`` allocates a gigabyte in one step, before any budget is checked)."""
    if isinstance(spec, str) and _WIDE_SPEC.search(spec):
        raise TemplateBudgetExceeded(
            f"format {spec[:40]!r} asks for a width over the template output budget"
        )


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse a ``*``, ``**`` or ``%`` whose result would exceed the output budget in one
    step."""
    if operator == "%":
        check_format(left)
        return
    if operator == "**":
        if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise TemplateBudgetExceeded(
                f"'**' with exponent {right!r} is over the template limit of {MAX_EXPONENT}"
            )
        return
    for seq, times in ((left, right), (right, left)):
        sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
        if sized and len(seq) * times > TEMPLATE_MAX_CHARS:
            raise TemplateBudgetExceeded(
                f"'*' would build {len(seq) * times} items, over the template output "
                f"budget of {TEMPLATE_MAX_CHARS} characters"
            )


def bounded_range(*args: int) -> range:
    """``range`` for templates: at most ``MAX_RANGE`` items."""
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() of {len(rng)} items is over the template limit {MAX_RANGE}")
    return rng


def bounded_width(filter_: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``filter_`` refusing a width (an integer argument) or a format spec over the budget."""

    def bounded(value: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "format":
            check_format(value)
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and arg > TEMPLATE_MAX_CHARS:
                raise TemplateBudgetExceeded(
                    f"{name}({arg}) is over the template output budget of "
                    f"{TEMPLATE_MAX_CHARS} characters"
                )
        return filter_(value, *args, **kwargs)

    bounded.__name__ = getattr(filter_, "__name__", name)
    for marker in ("jinja_pass_arg",):  # keep pass_eval_context & co. as declared
        if hasattr(filter_, marker):
            setattr(bounded, marker, getattr(filter_, marker))
    return bounded


def render_bounded(
    template: Template,
    context: dict[str, Any],
    *,
    seconds: float = TEMPLATE_SECONDS,
    max_chars: int = TEMPLATE_MAX_CHARS,
) -> str:
    """``template.render(**context)`` within ``seconds`` and ``max_chars``.

    Raises ``TemplateBudgetExceeded`` when either runs out, any other ``TemplateError`` (or
    the exception the template raised) as ``render`` would.
    """
    deadline = time.monotonic() + seconds
    files = {template.filename or "<template>", "<template>"}

    def over_time() -> None:
        raise TemplateBudgetExceeded(
            f"template {template.name or ''} ran longer than its budget of {seconds:g}s"
        )

    def local(frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        if time.monotonic() > deadline:
            over_time()
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        if frame.f_code.co_filename in files:
            return local(frame, event, arg)
        return None  # not the template's own code: no per-line cost

    out: list[str] = []
    size = 0
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        chunks: Iterator[str] = template.generate(**context)
        for chunk in chunks:
            size += len(chunk)
            if size > max_chars:
                raise TemplateBudgetExceeded(
                    f"template {template.name or ''} wrote more than its budget of "
                    f"{max_chars} characters"
                )
            if time.monotonic() > deadline:
                over_time()
            out.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(out)


def sample_contexts() -> dict[str, dict[str, Any]]:
    """What a post-mortem or notice template is given, with sample values, per outcome.

    The same keys as ``RollbackRun.template_context`` (the report, ``outcome``, ``trigger``,
    ``finished_at``), so ``runbook validate`` sees a template fail as the run would.
    """
    from flows.report import RollbackReport, StepRecord

    now = datetime.now(UTC).isoformat(timespec="seconds")
    trigger = {
        "source": "alertmanager",
        "status": "firing",
        "metric": "accuracy",
        "value": 0.81,
        "started_at": now,
        "fingerprint": "sample",
        "severity": "critical",
        "requested_by": "U0SAMPLE",
        "reason": "sample reason",
        "labels": {"model": "sample"},
    }
    decision = {
        "approved": True,
        "how": "human",
        "by": "U0SAMPLE",
        "role": "on_call_engineer",
        "channel": "slack",
        "comment": "sample comment",
        "at": now,
        "ignored": ["sample ignored decision"],
        "describe": "approved by U0SAMPLE (on_call_engineer) via slack",
    }
    verification = {
        "version": "1.0.0",
        "env": "production",
        "passed": True,
        "live_version": "1.0.0",
        "rows": 100,
        "evaluated": 1,
        "successful": 1,
        "accuracy": 0.95,
        "expectations": [
            {
                "expectation": "expect_column_mean_to_be_between",
                "column": "correct",
                "success": True,
                "observed": 0.95,
                "expected": "0.9 <= mean",
            }
        ],
        "error": None,
        "seconds": 1.0,
        "served": None,
        "live": None,
        "summary": "passed: 1/1 expectations on 100 rows, accuracy 0.950",
    }
    steps = [
        StepRecord(name=name, started_at=now, seconds=0.5, outcome="ok", detail="sample")
        for name in ("validate trigger", "request approval", "restore", "verify", "notify")
    ]
    out = {}
    for outcome in ("restored", "unverified", "verification_failed", "approval_rejected"):
        report = RollbackReport(
            incident="sample-20260101T000000Z-0000",
            model="sample",
            env="production",
            outcome=outcome,  # type: ignore[arg-type]
            reason="sample reason",
            from_version="1.1.0",
            to_version="1.0.0",
            final_version="1.0.0" if outcome == "restored" else "1.1.0",
            trigger=trigger,
            threshold="accuracy below 0.9",
            decision=decision,
            verification=verification,
            steps=steps,
            notes=["sample note"],
            flow_run_id="00000000-0000-0000-0000-000000000000",
            finished_at=now,
            seconds=3.0,
        )
        data = report.model_dump(mode="json")
        data.setdefault("time_to_restore", 3.0)
        out[outcome] = {**data, "outcome": outcome, "trigger": trigger, "finished_at": now}
    return out
