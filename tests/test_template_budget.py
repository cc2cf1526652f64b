"""Templates render within a time and output-size budget, checked by `validate` too."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flows.templating import TemplateBudgetExceeded, render_bounded
from tests.conftest import write_runbook

BOMB = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}done"
#: loops within range()'s cap, nested deep enough to run for hours
DEEP_BOMB = (
    "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}"
    "{% endfor %}{% endfor %}{% endfor %}done"
)


def _env(tmp_path: Path):
    from flows.config import template_environment

    return template_environment(tmp_path, [tmp_path.resolve()])


@pytest.mark.parametrize("source", [BOMB, DEEP_BOMB])
def test_a_loop_bomb_is_stopped(tmp_path, source):
    env = _env(tmp_path)
    started = time.monotonic()
    with pytest.raises((TemplateBudgetExceeded, Exception)) as exc:
        render_bounded(env.from_string(source), {}, seconds=0.5)
    assert time.monotonic() - started < 5  # the budget (0.5 s) plus a slow machine's margin
    assert "budget" in str(exc.value) or "range()" in str(exc.value)


def test_an_empty_loop_within_the_range_cap_is_stopped_by_the_clock(tmp_path):
    env = _env(tmp_path)
    started = time.monotonic()
    with pytest.raises(TemplateBudgetExceeded, match="longer than its budget of 0.3s"):
        render_bounded(env.from_string(DEEP_BOMB), {}, seconds=0.3)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(10000) %}{% for j in range(10000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
        "{{ 'x' * 100000000 }}",
        "{{ ['x'] * 100000000 }}",
        "{{ 10 ** 100000000 }}",
        "{{ '%999999999s' % 'x' }}",
        "{{ '%999999999s' | format('x') }}",
        "{{ '{:>999999999}'.format('x') }}",
        "{{ 'x' | center(999999999) }}",
        "{{ 'a\\nb' | indent(999999999) }}",
    ],
)
def test_output_over_the_size_budget_is_stopped(tmp_path, source):
    env = _env(tmp_path)
    with pytest.raises(TemplateBudgetExceeded):
        render_bounded(env.from_string(source), {}, seconds=20, max_chars=100_000)


def test_a_normal_template_renders_within_budget(tmp_path):
    env = _env(tmp_path)
    assert render_bounded(env.from_string("{% for i in range(3) %}{{ i }}{% endfor %}"), {}) == (
        "012"
    )
    source = "{{ '%5.2f' % 1.5 }}|{{ '{:>4}'.format('x') }}|{{ 'y' | center(5) }}|{{ 2 ** 10 }}"
    assert render_bounded(env.from_string(source), {}) == " 1.50|   x|  y  |1024"


def test_validate_refuses_a_template_over_budget(tmp_path):
    from flows.config import check_assets, load_runbook

    (tmp_path / "bomb.md.j2").write_text(BOMB)
    rb = load_runbook(write_runbook(tmp_path, postmortem={"template": "bomb.md.j2"}))
    started = time.monotonic()
    problems = [p for p in check_assets(rb) if p.startswith("postmortem.template")]
    assert time.monotonic() - started < 30
    assert problems and ("budget" in problems[0] or "range()" in problems[0]), problems


def test_validate_accepts_the_shipped_templates(tmp_path):
    from flows.config import _template_problems, load_runbook

    rb = load_runbook(write_runbook(tmp_path))
    assert _template_problems(rb, rb.postmortem.template) == []
    assert _template_problems(rb, rb.notify.user_notice_template) == []


def test_a_template_over_budget_at_run_time_leaves_a_plain_postmortem(tmp_path):
    from flows.steps.postmortem import render_postmortem
    from flows.templating import sample_contexts

    (tmp_path / "bomb.md.j2").write_text(DEEP_BOMB)
    ctx = sample_contexts()["restored"]
    started = time.monotonic()
    text, error = render_postmortem(tmp_path / "bomb.md.j2", ctx)
    assert time.monotonic() - started < 30
    assert error is not None and error.startswith("TemplateBudgetExceeded")
    assert "template failed (TemplateBudgetExceeded" in text
    assert "Post-mortem draft: sample rollback in production" in text
