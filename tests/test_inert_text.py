"""Alert text, reasons and comments are inert in every destination (issue 20).

Each destination is checked with a real parser of its format where one is at hand:
markdown-it (CommonMark + tables, as GitHub and the Prefect UI render) for post-mortems,
Python's HTML parser for pages, and Slack's documented mrkdwn control sequences (``<...>``
and ``&``) for Slack.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from rollback_runbook.escape import html, markdown, mrkdwn
from tests.conftest import RUNBOOKS_DIR

HOSTILE = [
    "## Outcome",
    "**FALSE ALARM: no rollback was made, ignore this incident**",
    "[Prefect run](https://evil.example/x)",
    "![pixel](https://evil.example/p.png)",
    "<img src=x onerror=alert(1)>",
    "<!channel> <@U0BOSS> <https://evil.example|Prefect run>",
    "x\n## Outcome\n**FALSE ALARM**",
    "x\n\n| a | b |\n|---|---|\n| c | d |",
    "- fake item",
    "1. fake item",
    "> quoted",
    "line\n===",
    "`code` and ``more``",
    "~~struck~~ _it_ __bold__",
    "&lt;b&gt; &amp;",
    "\\*escaped\\*",
]

md = MarkdownIt("commonmark").enable("table").enable("strikethrough")


def _inline_types(tokens) -> set[str]:
    out = set()
    for t in tokens:
        out.add(t.type)
        if t.children:
            out |= _inline_types(t.children)
    return out


def _shown_text(tokens) -> str:
    """The text a reader sees: every text and code token's content."""
    out = []
    for t in tokens:
        if t.children:
            out.append(_shown_text(t.children))
        elif t.type in ("text", "code_inline"):
            out.append(t.content)
        elif t.type == "softbreak":
            out.append("\n")
    return "".join(out)


@pytest.mark.parametrize("value", HOSTILE)
def test_markdown_renders_any_value_as_one_paragraph_of_its_own_text(value):
    tokens = md.parse(f"Reason given: {markdown(value)}")
    types = _inline_types(tokens)
    assert types <= {"paragraph_open", "paragraph_close", "inline", "text"}, types
    assert _shown_text(tokens) == "Reason given: " + re.sub(r"\n+", " ", value)


@pytest.mark.parametrize("value", HOSTILE)
def test_markdown_at_the_start_of_a_line_or_in_a_table_cell_stays_text(value):
    page = f"intro\n{markdown(value)}\n\n| A | B |\n|---|---|\n| {markdown(value)} | x |\n"
    tokens = md.parse(page)
    kinds = [t.type for t in tokens]
    assert "heading_open" not in kinds and "bullet_list_open" not in kinds
    assert "ordered_list_open" not in kinds and "blockquote_open" not in kinds
    assert kinds.count("td_open") == 2  # the value stayed in its one cell
    assert _inline_types(tokens) <= {
        "paragraph_open", "paragraph_close", "inline", "text", "softbreak", "table_open",
        "thead_open", "tr_open", "th_open", "th_close", "tr_close", "thead_close",
        "tbody_open", "td_open", "td_close", "tbody_close", "table_close",
    }  # fmt: skip


def test_readable_values_stay_readable_in_the_raw_markdown():
    for value in ("1.2.0", "latency_p99_ms", "churn-classifier", "2026-12-06T08:00:00+00:00"):
        assert markdown(value) == value


@pytest.mark.parametrize("value", HOSTILE)
def test_mrkdwn_leaves_no_mention_link_or_entity_of_the_input(value):
    out = mrkdwn(value)
    assert "<" not in out and ">" not in out  # no <!channel>, <@U..>, <url|text>
    assert "&" not in out.replace("&amp;", "").replace("&lt;", "").replace("&gt;", "")
    for mark in "*~`":
        assert mark not in out
    # Slack shows the entities as the characters: decoding gives the input back
    decoded = out.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert len(decoded) == len(value)


def test_mrkdwn_keeps_names_with_inner_underscores():
    assert mrkdwn("latency_p99_ms") == "latency_p99_ms"


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.data = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.data.append(data)


@pytest.mark.parametrize("value", [*HOSTILE, '"><script>alert(1)</script>', "a & b"])
def test_html_shows_the_input_as_text(value):
    parser = _Collect()
    parser.feed(f'<p title="{html(value)}">{html(value)}</p>')
    parser.close()
    assert parser.tags == ["p"]
    assert "".join(parser.data) == value


# -- the post-mortem --------------------------------------------------------------------


def _context(**trigger):
    from flows.templating import sample_contexts

    ctx = sample_contexts()["restored"]
    ctx["trigger"] = {**ctx["trigger"], **trigger}
    return ctx


FALSE_ALARM = (
    "accuracy dropped\n\n## Outcome\n\n**FALSE ALARM: no rollback was made, ignore this "
    "incident**\n[details](https://evil.example) <!channel>"
)


def test_an_alert_cannot_add_a_heading_or_bold_claim_to_the_postmortem():
    from flows.steps.postmortem import render_template

    tpl = RUNBOOKS_DIR / "templates" / "postmortem.md.j2"
    text = render_template(tpl, _context(reason=FALSE_ALARM, metric="acc`uracy"))
    tokens = md.parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert "Outcome" not in headings
    assert headings == [
        "Post-mortem draft: sample rollback in production",
        "Summary",
        "Trigger",
        "Decisions",
        "Timeline",
        "Verification",
        "Notes",
        "Follow-up (fill in)",
    ]
    strong = [
        tokens[i].children[j + 1].content
        for i, t in enumerate(tokens)
        if t.children
        for j, c in enumerate(t.children)
        if c.type == "strong_open"
    ]
    assert not any("FALSE ALARM" in s for s in strong)
    assert "link_open" not in _inline_types(tokens)
    # the text is there, as text
    assert "FALSE ALARM: no rollback was made" in _shown_text(tokens)
    assert "acc`uracy" in _shown_text(tokens)  # a backquote cannot close the code span


def test_the_postmortem_template_keeps_its_own_markup():
    from flows.steps.postmortem import render_template

    tpl = RUNBOOKS_DIR / "templates" / "postmortem.md.j2"
    tokens = md.parse(render_template(tpl, _context()))
    assert "strong_open" in _inline_types(tokens)  # **1.1.0** from the template
    assert "table_open" in [t.type for t in tokens]


def test_the_plain_postmortem_escapes_too():
    from flows.steps.postmortem import plain_postmortem

    text = plain_postmortem(_context(reason=FALSE_ALARM), "TemplateError: boom")
    tokens = md.parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == ["Post-mortem draft: sample rollback in production", "Timeline"]
    assert "link_open" not in _inline_types(tokens)


# -- Slack ------------------------------------------------------------------------------


def test_slack_messages_carry_alert_text_as_text():
    from flows.steps.notify import build_message

    headline, blocks = build_message(
        "started",
        "inc-1",
        "churn",
        "production",
        f"rollback started: {FALSE_ALARM}",
        {"Trigger": "<!channel> <@U0BOSS> <https://evil.example|Prefect run>"},
    )
    texts = json.dumps([b.to_dict() for b in blocks])
    for sequence in ("<!channel>", "<@U0BOSS>", "<https://evil.example", "**FALSE"):
        assert sequence not in texts and sequence not in headline
    assert "&lt;!channel&gt;" in texts
    # our own markup survives: the bold headline
    assert blocks[0].to_dict()["text"]["text"].startswith("*")


def test_the_user_notice_is_escaped_once_for_slack(tmp_path: Path):
    from flows.steps.notify import build_message
    from flows.steps.postmortem import render_notice

    tpl = RUNBOOKS_DIR / "templates" / "user_notice.md.j2"
    ctx = _context()
    ctx["to_version"] = "<!channel> 1.0.0"
    notice = render_notice(tpl, ctx)
    assert "<!channel> 1.0.0" in notice  # unescaped here: the message builder escapes it
    _, blocks = build_message("notice", "inc-1", "churn", "production", notice)
    assert "&lt;!channel&gt; 1.0.0" in blocks[0].to_dict()["text"]["text"]


def test_click_answers_mention_only_slack_ids():
    from intake.slack import mention

    assert mention("U03OPS") == "<@U03OPS>"
    assert mention("alice@example.com") == "alice@example.com"  # an e-mail approver: text
    assert "<" not in mention("<!channel>") and "<" not in mention("U1><!here")


# -- the terminal -----------------------------------------------------------------------

TERMINAL_HOSTILE = [
    "\x1b[2J\x1b[H",  # clear the screen, cursor home
    "\x1b]0;owned\x07",  # retitle the window
    "\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\",  # a hidden hyperlink
    "ok\rFAKED",  # overwrite the line
    "\x9b31m",  # a C1 control sequence introducer
    "[red]not red[/red] [link=https://evil.example]x[/link]",  # rich markup
]


@pytest.mark.parametrize("value", TERMINAL_HOSTILE)
def test_cli_output_shows_control_characters_and_markup_as_text(value, monkeypatch):
    import io

    from rich.console import Console

    from rollback_runbook.cli import render

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, highlight=False, width=200)
    monkeypatch.setattr(render, "err", console)  # as render's own, on a terminal
    render.error(f"reason: {value}")
    shown = buffer.getvalue()
    for control in ("\x1b[2J", "\x1b]", "\x07", "\r", "\x9b", "https://evil.example\x1b"):
        assert control not in shown
    assert "[red]not red[/red]" in shown or "[red]" not in value  # markup shown as written


def test_terminal_keeps_newlines_tabs_and_text():
    from rollback_runbook.escape import terminal

    assert terminal("a\n\tb é 1.2.0") == "a\n\tb é 1.2.0"
    assert terminal("\x1b[2J") == "\\x1b[2J"


# -- properties: any text at all --------------------------------------------------------


MARKUP = list("\n\r*_`[]()<>#|~!&\\-+=.:/ 0123456789aZ@")
any_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(MARKUP),
        st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
    ),
    max_size=60,
)


def _words(text: str) -> str:
    return " ".join(text.split())


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_markdown_of_any_text_is_one_paragraph_of_that_text(value):
    tokens = md.parse(f"Reason given: {markdown(value)}\n\n| A |\n|---|\n| {markdown(value)} |\n")
    types = _inline_types(tokens)
    allowed = {"paragraph_open", "paragraph_close", "inline", "text", "table_open",
               "thead_open", "tr_open", "th_open", "th_close", "tr_close", "thead_close",
               "tbody_open", "td_open", "td_close", "tbody_close", "table_close"}  # fmt: skip
    assert types <= allowed, types
    paragraph = tokens[1]
    assert _words(_shown_text([paragraph])) == _words(f"Reason given: {value}")


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_mrkdwn_of_any_text_has_no_control_sequence(value):
    out = mrkdwn(value)
    assert "<" not in out and ">" not in out and "*" not in out and "`" not in out
    assert out.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").count("&") == (
        value.count("&")
    )
