"""Make outside text inert for where it is shown: one function per destination.

Alert labels, annotations and summaries, a runbook author's strings and a person's reason
or comment end up in a post-mortem (Markdown, also the Prefect markdown artifact), in
Slack (mrkdwn) and possibly in a web page (HTML). Unescaped, an alert summary could add a
heading "Outcome: FALSE ALARM" to a post-mortem, a ``<!channel>`` ping or a disguised
link ``<https://evil|Prefect run>`` to Slack, or a script to a page. Each function below
turns any value into text that shows as written, and nothing else, in its destination:

- ``markdown``: CommonMark and GitHub's tables. Backslash-escapes what starts a construct
  (emphasis, code, links, images, raw HTML, tables, strikethrough, headings, block quotes,
  list items, setext underlines) and folds line breaks into spaces, so a value can never
  start a line of its own. Words, versions (``1.2.0``) and names with inner underscores
  (``latency_p99_ms``) stay readable in the raw file.
- ``mrkdwn``: Slack's escaping of ``&``, ``<`` and ``>`` (the only characters Slack's own
  docs ask to escape), which is what makes a mention, a ``<!channel>`` or a link; plus
  the formatting marks ``*``, ``~``, backquotes and an underscore at a word's edge replaced
  by look-alikes, since mrkdwn has no escape character (``latency_p99_ms`` stays as is).
- ``html``: ``html.escape`` with quotes, for text and attribute values alike.
- ``terminal``: control characters (ESC, BEL, backspace, carriage return, C1 codes, ...)
  as visible ``\\xNN`` escapes, so text printed by the CLI cannot move the cursor, clear
  the screen, retitle the window or plant a hidden hyperlink. Newlines and tabs stay.

Import cost: the standard library only; safe on any CLI path.
"""

from __future__ import annotations

import html as _html
import re
from typing import Any

__all__ = ["html", "markdown", "mrkdwn", "terminal", "text_of"]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NEWLINES = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]+")
#: characters that start or end a Markdown construct anywhere on a line
_MD_ANYWHERE = re.compile(r"([\\`*\[\]<>|~#!&])")
#: an underscore that can open or close emphasis (not one inside a word)
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
#: what makes a line a list item, a quote or a setext underline when the value starts it
_MD_LINE_START = re.compile(r"^(\s*)(?:([-+=])|(\d{1,9})([.)])(?=\s|$))")

_SLACK_MARKS = str.maketrans(
    {
        "*": "\u2217",  # ASTERISK OPERATOR
        "~": "\u223c",  # TILDE OPERATOR
        "`": "\u02cb",  # MODIFIER LETTER GRAVE ACCENT
    }
)


def text_of(value: Any) -> str:
    """``value`` as text: ``None`` is empty, anything else ``str()``."""
    return "" if value is None else str(value)


def markdown(value: Any) -> str:
    """``value`` as Markdown text that renders exactly as written, on one line."""
    text = _NEWLINES.sub(" ", text_of(value))
    text = _MD_ANYWHERE.sub(r"\\\1", text)
    text = _MD_UNDERSCORE.sub(r"\\_", text)
    # a leading "- ", "+ ", "1. " or "===" makes a list or a heading: escape its first mark
    return _MD_LINE_START.sub(_escape_line_start, text, count=1)


def _escape_line_start(m: re.Match[str]) -> str:
    if m.group(2):
        return f"{m.group(1)}\\{m.group(2)}"
    return f"{m.group(1)}{m.group(3)}\\{m.group(4)}"


def mrkdwn(value: Any, *, formatting: bool = True) -> str:
    """``value`` as Slack mrkdwn that shows as written: no mention, link or markup.

    ``formatting=False`` keeps ``*_~``` `` as they are (for text inside a code span, or
    where formatting from the value is harmless); ``&<>`` are always escaped.
    """
    text = text_of(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if not formatting:
        return text
    return _MD_UNDERSCORE.sub("\uff3f", text.translate(_SLACK_MARKS))  # FULLWIDTH LOW LINE


def html(value: Any) -> str:
    """``value`` as HTML text (or a quoted attribute value) that shows as written."""
    return _html.escape(text_of(value), quote=True)


def terminal(value: Any) -> str:
    """``value`` with every control character but newline and tab shown as ``\\xNN``
    (``\\u2028`` for the Unicode line separators): safe to print to a terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text_of(value))
