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


#: a string of the budget's size, for the tests below that grow one
_BIG = '{% set s = "a" * 99999 %}'
_LIST = _BIG + "{% set l = [s] * 99 %}"


@pytest.mark.parametrize(
    "source",
    [
        # padding methods with a width
        '{{ "a".ljust(300000000)|length }}',
        '{{ "a".rjust(300000000)|length }}',
        '{{ "a".center(300000000)|length }}',
        '{{ "a".zfill(300000000)|length }}',
        '{{ "\\t".expandtabs(300000000)|length }}',
        '{{ "a".encode().ljust(300000000)|length }}',
        # replacing or translating a short string by a long one, many times
        '{% set s="a"*20000 %}{{ s.replace("a", s)|length }}',
        '{% set s="a"*20000 %}{{ s|replace("a", s)|length }}',
        '{% set s="a"*20000 %}{{ s.replace("", s)|length }}',
        '{{ ("a"*20000).translate({97: "b"*20000})|length }}',
        # concatenation doubling a string
        _BIG + "{% set s = s ~ s %}{{ s|length }}",
        _BIG + "{% set s = s + s %}{{ s|length }}",
        "{% set l = [1] * 60000 %}{{ (l + l)|length }}",
        # format widths and precisions, nested ones included
        '{{ "{:{}}".format("a", 300000000)|length }}',
        '{{ "{a:{w}}".format_map({"a": "x", "w": 300000000})|length }}',
        '{{ "{:.{}f}".format(1.5, 300000000)|length }}',
        '{{ ("%*s" % (300000000, "a"))|length }}',
        _BIG + '{{ ("{0}" * 500).format(s)|length }}',
        _BIG + '{{ ("%s" * 500) % ((s,) * 500) }}',
        _BIG + '{{ "%(a)s%(a)s"|format(a=s)|length }}',
        # joining or printing many references to one long string
        _LIST + "{{ l|join|length }}",
        _LIST + '{{ "".join(l)|length }}',
        _LIST + "{{ l }}",
        _LIST + "{{ l|string|length }}",
        _LIST + '{{ (l ~ "")|length }}',
        _LIST + '{{ "{}".format(l)|length }}',
        _LIST + "{{ [l]|tojson|length }}",
        # filters and globals with a count or a string inserted per line
        '{{ ("a\\n" * 40000)|indent(400)|length }}',
        '{{ "a b c"|wordwrap(1, wrapstring="x" * 99999)|length }}',
        "{{ [1]|batch(300000000, 0)|list|length }}",
        "{{ [1]|slice(300000000)|list|length }}",
        "{{ lipsum(100000000)|length }}",
        # a list grown in place, a block's output, integers
        "{% set l = [1] %}{% for i in range(60) %}{% set _ = l.extend(l) %}{% endfor %}",
        "{% macro m() %}{% for i in range(5000) %}" + "x" * 100 + "{% endfor %}{% endmacro %}"
        "{{ m()|length }}",
        # a long value printed over and over into a block, before the block is joined
        '{% set s = "*" * 9999 %}{% set x %}{% for i in range(3000) %}{{ s ~ i }}{% endfor %}'
        "{% endset %}",
        # a format reached through a filter, on Markup
        '{{ (("{:{}}"|safe)|attr("format"))("a", 300000000)|length }}',
        '{{ ("%s"|safe).ljust(300000000)|length }}',
        "{{ (2 ** 1000) ** 1000 }}",
        "{% set x = 10 ** 300 %}" + "{% set x = x * x %}" * 12,
    ],
)
def test_every_step_that_can_grow_a_value_is_bounded_before_it_runs(tmp_path, source):
    env = _env(tmp_path)
    started = time.monotonic()
    with pytest.raises(TemplateBudgetExceeded):
        render_bounded(env.from_string(source), {}, seconds=20, max_chars=100_000)
    assert time.monotonic() - started < 5  # refused up front, not built and then measured


def test_the_bounded_steps_still_work_within_budget(tmp_path):
    env = _env(tmp_path)
    source = (
        '{{ "x".ljust(3) }}|{{ "7".zfill(3) }}|{{ "a\\tb".expandtabs(2) }}|'
        '{{ "a-b"|replace("-", "+") }}|{{ "a-b".replace("-", "==") }}|{{ "{:{}}".format("y", 3) }}|'
        '{{ "{a}".format_map({"a": 1}) }}|{{ "%s=%s" % ("k", 2) }}|{{ "%s"|format("f") }}|'
        '{{ [1, 2]|join(",") }}|{{ ",".join(["p", "q"]) }}|{{ "ab" ~ 1 }}|{{ [1] + [2] }}|'
        "{{ [[1], [2]]|sum(start=[])|length }}|{{ [1, 2, 3]|slice(2)|list|length }}|"
        "{{ (10 ** 30 * 10 ** 30) > 0 }}|{{ lipsum(1, html=False)|length > 0 }}|"
        '{{ "a\\nb"|indent(2)|length }}'
    )
    assert render_bounded(env.from_string(source), {}) == (
        "x  |007|a b|a+b|a==b|y  |1|k=2|f|1,2|p,q|ab1|\\[1, 2\\]|2|2|True|True|5"
    )


def test_a_value_within_budget_outside_a_render_is_checked_against_the_default(tmp_path):
    from flows.templating import TEMPLATE_MAX_CHARS, budget

    assert budget() == TEMPLATE_MAX_CHARS
    env = _env(tmp_path)
    with pytest.raises(TemplateBudgetExceeded):
        env.from_string(f'{{{{ "a".ljust({TEMPLATE_MAX_CHARS + 1}) }}}}').render()
    assert budget() == TEMPLATE_MAX_CHARS
