"""Rendering runbook templates with a time and an output-size budget.

A template is runbook data anyone may edit; Jinja2's sandbox keeps it from reading files
or calling into Python, but not from looping: two nested ``range(100000)`` loops passed
``runbook validate`` and held the post-mortem for a minute. Here every render:

- stops after ``TEMPLATE_SECONDS`` of wall-clock time: while a template's own code runs, a
  trace function (this thread only) checks the clock on each line of it, so a loop with an
  empty body is stopped too, mid-loop;
- stops once the output passes ``TEMPLATE_MAX_CHARS`` (checked between chunks), and before
  any one step would build a string, list or number over that budget at once
  (``BudgetedSandbox``): the operators ``*``, ``**``, ``%``, ``+`` and ``~``; string methods
  that pad, replace, join or translate (``ljust``, ``zfill``, ``expandtabs``, ``replace``...);
  the widths and precisions of ``str.format``/``format_map``, nested ``{}`` included; every
  filter (its input, its arguments, and for those that can grow, such as ``center``,
  ``indent``, ``replace``, ``join``, ``format``, ``wordwrap``, ``tojson``, its output
  computed from them first); a macro's or ``{% set %}`` block's joined output; and printing
  a value (a list holding one long string a million times is refused, not printed);
- caps ``range()`` at ``MAX_RANGE`` items, ``lipsum()`` within the budget, and integers at
  ``MAX_INT_BITS`` bits.

A template over budget raises ``TemplateBudgetExceeded``. ``runbook validate`` renders each
template with sample data (``sample_contexts``) under the same budget and refuses one that
exceeds it; at run time the post-mortem falls back to a plain draft with the error noted.
"""

from __future__ import annotations

import builtins
import inspect
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, KeysView, Mapping, ValuesView
from contextvars import ContextVar
from datetime import UTC, datetime
from functools import update_wrapper
from types import BuiltinMethodType, MethodType
from typing import Any

from jinja2 import Template, nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import SandboxedEnvironment, SandboxedFormatter
from markupsafe import EscapeFormatter, Markup

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


#: most bits an integer computed in a template may have (about 19,700 decimal digits; Python
#: refuses to print more than 4,300 anyway, and multiplying bigger ones takes seconds)
MAX_INT_BITS = 1 << 16

#: the output budget of the render under way (``render_bounded`` sets it; outside a render,
#: ``TEMPLATE_MAX_CHARS``): no single value a template builds may be larger
_LIMIT: ContextVar[int] = ContextVar("template_max_chars", default=TEMPLATE_MAX_CHARS)

#: a printf-style conversion (``%(name)-*.*s``): mapping key, width, precision, type
_PRINTF = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.?)", re.DOTALL)
#: a number in a ``str.format`` spec (width, precision, a date format's digits...)
_SPEC_NUMBER = re.compile(r"\d+")

#: what the values a render prints may add up to, in output budgets: each is kept in an
#: output buffer (a macro's, a ``{% set %}`` block's) before any join could be checked, and a
#: macro's output is printed again by its caller
PRINTED_BUDGETS = 8
#: characters printed so far in the render under way (``None`` outside ``render_bounded``)
_PRINTED: ContextVar[list[int] | None] = ContextVar("template_printed", default=None)

_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)


def budget() -> int:
    """Most characters any one value of the render under way may have."""
    return _LIMIT.get()


def over_budget(what: str, size: int | str) -> TemplateBudgetExceeded:
    return TemplateBudgetExceeded(
        f"{what} would build {size} characters or items, over the template output budget "
        f"of {budget()}"
    )


def _number(digits: str) -> int:
    """A width or precision from a format spec; absurdly long ones count as huge."""
    return int(digits) if len(digits) <= 12 else 10**12


def measure(value: Any, limit: int | None = None) -> tuple[int, int]:
    """How many characters ``str(value)`` may take, and how deeply ``value`` nests.

    An estimate from above for strings, numbers and the containers a template can build
    (each reference counted again: ``[s, s]`` is twice ``s``), cheap for large strings;
    the walk stops as soon as the size passes ``limit`` (default: the budget), so a huge
    or cyclic structure costs no more than ``limit`` steps.
    """
    from jinja2.utils import Namespace

    limit = budget() if limit is None else limit
    if isinstance(value, str | bytes | bytearray):
        return len(value), 0
    total, depth = 0, 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and total <= limit:
        item, level = stack.pop()
        depth = max(depth, level)
        if isinstance(item, str | bytes | bytearray):
            total += len(item) + (3 if level else 0)  # quotes and b when inside a container
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2  # at least the decimal digits and a sign
        elif isinstance(item, float | complex):
            total += 50
        elif isinstance(item, Mapping | Namespace):
            items = item._Namespace__attrs if isinstance(item, Namespace) else item
            total += 16 + 4 * len(items)
            if total <= limit:
                for key, val in items.items():
                    stack += ((key, level + 1), (val, level + 1))
        elif isinstance(item, list | tuple | set | frozenset | KeysView | ValuesView):
            total += 16 + 2 * len(item)
            if total <= limit:
                stack += ((v, level + 1) for v in item)
        else:  # Undefined, a loop, a macro, a range (capped), a date...: a short repr
            total += 100
    return total, depth


def check_size(value: Any, what: str) -> None:
    """Refuse ``value`` if its text would be over the budget (before anything prints it)."""
    size, _ = measure(value)
    if size > budget():
        raise over_budget(what, f"more than {size}")


def count_printed(text: str) -> str:
    """``text``, one value a template prints, counted against ``PRINTED_BUDGETS`` output
    budgets for the render: a loop printing a long value into a block is stopped early."""
    printed = _PRINTED.get()
    if printed is not None:
        printed[0] += len(text)
        if printed[0] > PRINTED_BUDGETS * budget():
            raise over_budget("the values the template prints", f"more than {printed[0]}")
    return text


def check_result(value: Any, what: str) -> Any:
    """``value``, refused if it is a string or container longer than the budget."""
    if isinstance(value, _SIZED) and len(value) > budget():
        raise over_budget(what, len(value))
    return value


def _check(size: int, what: str) -> None:
    if size > budget():
        raise over_budget(what, size)


def printf_size(fmt: str | bytes | bytearray, args: Any) -> int:
    """Most characters ``fmt % args`` can give: the format, every width and precision, and
    every argument as often as the format names it."""
    limit = budget()
    text = fmt.decode("latin-1") if isinstance(fmt, bytes | bytearray) else str(fmt)
    size = len(text)
    star = False
    for match in _PRINTF.finditer(text):
        key, width, precision, _ = match.groups()
        for number in (width, precision):
            if number == "*":
                star = True
            elif number:
                size += _number(number)
        if key is not None and isinstance(args, Mapping):
            size += measure(args.get(key), limit)[0]
        if size > limit:
            return size
    if not (isinstance(args, Mapping) and "%(" in text):
        size += measure(args, limit)[0]
    if star:
        values = args if isinstance(args, tuple) else (args,)
        size += sum(abs(v) for v in values if isinstance(v, int))
    return size


def format_spec_size(spec: str) -> int:
    """Most characters a ``str.format`` spec (``>10.3f``, ``%Y-%m-%d``) can add: the sum of
    its numbers, and the spec itself (a date repeats its directives)."""
    return 2 * len(spec) + sum(_number(d) for d in _SPEC_NUMBER.findall(spec))


def check_format(spec: Any) -> None:
    """Refuse a printf-style format whose widths and precisions alone are over the budget."""
    if isinstance(spec, str | bytes | bytearray):
        _check(printf_size(spec, ()), f"format {spec[:40]!r}")


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse a ``*``, ``**``, ``%`` or ``+`` whose result would exceed the output budget
    (or ``MAX_INT_BITS``) in one step, before it is computed."""
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "%":
        if isinstance(left, str | bytes | bytearray):
            _check(printf_size(left, right), f"format {left[:40]!r}")
        return
    if operator == "**":
        if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise TemplateBudgetExceeded(
                f"'**' with exponent {right!r} is over the template limit of {MAX_EXPONENT}"
            )
        if ints and right > 0 and abs(left).bit_length() * right > MAX_INT_BITS:
            raise TemplateBudgetExceeded(f"'**' would build an integer over {MAX_INT_BITS} bits")
        return
    if operator == "+":
        if isinstance(left, _SIZED) and isinstance(right, _SIZED):
            _check(len(left) + len(right), "'+'")
        return
    if ints:  # '*' of two integers
        if abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
            raise TemplateBudgetExceeded(f"'*' would build an integer over {MAX_INT_BITS} bits")
        return
    for seq, times in ((left, right), (right, left)):
        sized = isinstance(seq, str | bytes | bytearray | list | tuple)
        if sized and isinstance(times, int):
            _check(len(seq) * times, "'*'")


def check_parts(parts: tuple[Any, ...]) -> tuple[Any, ...]:
    """The operands of ``~``, refused if joined they would be over the budget."""
    _check(sum(measure(p)[0] for p in parts), "'~'")
    return parts


def bounded_concat(chunks: Iterable[str]) -> str:
    """``"".join(chunks)`` for a template's output buffers (a macro's, a ``{% set %}`` or
    ``{% filter %}`` block's): refused before joining more than the budget."""
    limit, size, kept = budget(), 0, []
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise over_budget("a block of the template", f"more than {size}")
        kept.append(chunk)
    return "".join(kept)


def _materialize(items: Any, what: str) -> list[Any]:
    """``list(items)``, refused once its text passes the budget (a generator is read once)."""
    limit, size, kept = budget(), 0, []
    for item in items:
        size += measure(item, limit)[0] + 1
        if size > limit:
            raise over_budget(what, f"more than {size}")
        kept.append(item)
    return kept


def _replace_size(text: Any, old: Any, new: Any, count: Any) -> int | None:
    try:
        growth = len(new) - len(old)
        if growth <= 0:
            return len(text)
        found = len(text) + 1 if not old else text.count(old)
    except TypeError:
        return None  # the call itself will fail
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * growth


def _translate_size(text: str, table: Any) -> int:
    values = table.values() if isinstance(table, Mapping) else table
    widest = 1
    if isinstance(values, list | tuple | ValuesView):
        widest = max([len(v) for v in values if isinstance(v, str)] + [1])
    return len(text) * widest


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def check_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a call of a string or bytes method that would build more than the budget
    (``ljust``, ``rjust``, ``center``, ``zfill``, ``expandtabs``, ``replace``, ``join``,
    ``translate``); returns ``args``, with an iterable given to ``join`` read into a list."""
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, str | bytes | bytearray):
        return args
    name = getattr(obj, "__name__", "")
    what = f"{name}()"
    size: int | None = None
    if name in ("ljust", "rjust", "center", "zfill"):
        width = _arg(args, kwargs, 0, "width", 0)
        size = max(len(owner), width) if isinstance(width, int) else None
    elif name == "expandtabs":
        tabsize = _arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(tabsize, int):
            tab = "\t" if isinstance(owner, str) else b"\t"
            size = len(owner) + owner.count(tab) * max(tabsize - 1, 0)  # type: ignore[arg-type]
    elif name == "replace":
        old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
        size = _replace_size(owner, old, new, _arg(args, kwargs, 2, "count", -1))
    elif name == "translate" and isinstance(owner, str) and args:
        size = _translate_size(owner, args[0])
    elif name == "join" and len(args) == 1 and not kwargs:
        items = _materialize(args[0], what)
        size = sum(len(i) if isinstance(i, _SIZED) else 0 for i in items)
        size += len(owner) * max(len(items) - 1, 0)
        args = (items,)
    if size is not None:
        _check(size, what)
    return args


def check_call_result(obj: Any, result: Any) -> Any:
    """``result`` of a call, refused if over the budget; a list, dict or set a method grew in
    place (``l.extend(l)``) is refused too."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "call")
    if isinstance(owner, list | dict | set | bytearray):
        check_result(owner, f"{name}()")
    return check_result(result, f"{name}()")


def bounded_range(*args: int) -> range:
    """``range`` for templates: at most ``MAX_RANGE`` items."""
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() of {len(rng)} items is over the template limit {MAX_RANGE}")
    return rng


def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """``lipsum`` for templates: ``n`` paragraphs of up to ``max`` words within the budget."""
    from jinja2.utils import generate_lorem_ipsum

    for value in (n, min, max):
        if not isinstance(value, int):
            raise TypeError("lipsum() takes integer counts")
    _check(n * (builtins.max(min, max, 0) * 15 + 16), "lipsum()")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _filter_size(name: str, a: dict[str, Any], value: Any) -> int | None:
    """Most characters filter ``name`` can give for its bound arguments ``a``, where that
    can be more than a small multiple of its input (``None``: it cannot)."""
    text = value if isinstance(value, str) else None
    if name == "center" and text is not None and isinstance(a.get("width"), int):
        return builtins.max(len(text), a["width"])
    if name == "indent" and text is not None:
        width = a.get("width", 4)
        pad = width if isinstance(width, int) else len(str(width))
        return len(text) + (text.count("\n") + 1) * builtins.max(pad, 0)
    if name == "format":
        return printf_size(str(value), a.get("kwargs") or a.get("args") or ())
    if name == "replace" and text is not None:
        return _replace_size(text, str(a.get("old", "")), str(a.get("new", "")), a.get("count"))
    if name == "wordwrap" and text is not None and a.get("wrapstring") is not None:
        width = a.get("width", 79)
        breaks = sum(text.count(c) for c in " \t\n") + 1
        breaks += len(text) // builtins.max(width if isinstance(width, int) else 1, 1)
        return len(text) + breaks * len(str(a["wrapstring"]))
    if name == "urlize" and text is not None:
        extra = sum(len(str(a.get(k) or "")) for k in ("target", "rel")) + 64
        links = builtins.min(
            sum(text.count(c) for c in " \t\n") + 1, sum(text.count(c) for c in ".@:") + 1
        )
        return 3 * len(text) + links * extra
    if name in ("batch", "slice"):
        count = a.get("linecount", a.get("slices"))
        return count if isinstance(count, int) else None
    if name == "tojson" and a.get("indent") not in (None, 0):
        indent = a["indent"]
        pad = indent if isinstance(indent, int) else len(str(indent))
        size, depth = measure(value)
        return size * (2 + builtins.max(pad, 0) * (depth + 1))
    if name == "pprint":
        size, depth = measure(value)
        return size * (2 + depth)
    if name == "sum":
        return measure(value)[0] + measure(a.get("start", 0))[0]
    return None


def bounded_filter(filter_: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``filter_`` refusing input, arguments or output over the budget.

    Its input and arguments must each print within the budget; a filter whose output can
    grow beyond its input (a width, a count, a string inserted per line or match) is
    checked before it runs, from its arguments (``_filter_size``); any string or list it
    returns is checked after. ``join`` reads a generator into a list first."""
    from jinja2.utils import _PassArg

    signature = inspect.signature(filter_)  # of the function it wraps, if any
    passes = _PassArg.from_obj(filter_) is not None  # given an eval context or environment
    # Jinja's async-aware filters take the eval context but do not declare it
    declared = _PassArg.from_obj(inspect.unwrap(filter_)) is not None

    def bounded(*args: Any, **kwargs: Any) -> Any:
        passed = args[:1] if passes and not declared else ()
        try:
            bound = signature.bind(*args[len(passed) :], **kwargs)
        except TypeError:
            return filter_(*args, **kwargs)  # let the filter say what is wrong
        params = list(bound.arguments)
        first = 1 if passes and declared else 0
        if len(params) > first:
            value = bound.arguments[params[first]]
            if name == "join":
                value = _materialize(value, "join")
                d = bound.arguments.get("d", "")
                _check(measure(value)[0] + len(str(d)) * len(value), "join")
                bound.arguments[params[first]] = value
            for arg in params[first:]:
                check_size(bound.arguments[arg], name)
            flat = dict(bound.arguments)
            for key, param in signature.parameters.items():
                if param.kind is param.VAR_KEYWORD and key in flat:
                    flat.update(flat[key])
            size = _filter_size(name, flat, value)
            if size is not None:
                _check(size, name)
        result = filter_(*passed, *bound.args, **bound.kwargs)
        return check_result(result, name)

    bounded.__name__ = getattr(filter_, "__name__", name)
    bounded.__doc__ = filter_.__doc__
    if passes:  # keep pass_eval_context & co. as declared
        bounded.jinja_pass_arg = filter_.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


#: kept for callers of the old name: every filter is now bounded the same way
bounded_width = bounded_filter


class _BudgetFormatter(SandboxedFormatter):
    """Jinja's sandboxed ``str.format``, refusing a field (its width and precision read
    after nested ``{}`` are filled in) or a total over the budget before building it."""

    def __init__(self, env: Any, used: int, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._used = used

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion:
            check_size(value, f"format conversion !{conversion}")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        self._used += measure(value)[0] + format_spec_size(format_spec)
        _check(self._used, f"format field {format_spec[:20]!r}")
        return super().format_field(value, format_spec)


class _BudgetEscapeFormatter(_BudgetFormatter, EscapeFormatter):
    pass


def budgeted_str_format(env: Any, value: Any) -> Callable[..., str] | None:
    """``SandboxedEnvironment.wrap_str_format`` with ``_BudgetFormatter``: the wrapper for a
    string's ``format`` or ``format_map`` (``None`` for anything else)."""
    if not isinstance(value, MethodType | BuiltinMethodType) or value.__name__ not in (
        "format",
        "format_map",
    ):
        return None
    f_self = value.__self__
    if not isinstance(f_self, str):
        return None
    str_type: type[str] = type(f_self)
    is_format_map = value.__name__ == "format_map"

    def wrapper(*args: Any, **kwargs: Any) -> str:
        if is_format_map:
            if kwargs:
                raise TypeError("format_map() takes no keyword arguments")
            if len(args) != 1:
                raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
            kwargs, args = args[0], ()
        formatter: _BudgetFormatter
        if isinstance(f_self, Markup):
            formatter = _BudgetEscapeFormatter(env, len(f_self), escape=f_self.escape)
        else:
            formatter = _BudgetFormatter(env, len(f_self))
        return str_type(formatter.vformat(f_self, args, kwargs))

    return update_wrapper(wrapper, value)


class BudgetCodeGenerator(CodeGenerator):
    """Jinja's code generator, with the operands of ``~`` checked against the budget before
    they are joined (``~`` is no binary operator the sandbox can intercept)."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"{func_name}(environment.check_parts((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")


class BudgetedSandbox(SandboxedEnvironment):
    """Jinja2's sandbox with no step able to build a value over the output budget: ``*``,
    ``**``, ``%`` and ``+`` (``check_binop``), ``~`` (``BudgetCodeGenerator``), string
    methods (``check_call``), ``str.format`` (``_BudgetFormatter``), output blocks
    (``bounded_concat``), every filter (``bounded_filter``), ``range`` and ``lipsum``."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = BudgetCodeGenerator
    concat = staticmethod(bounded_concat)  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals["range"] = bounded_range
        self.globals["lipsum"] = bounded_lipsum
        for name, filter_ in list(self.filters.items()):
            self.filters[name] = bounded_filter(filter_, name)

    def add_filter(self, name: str, filter_: Callable[..., Any]) -> None:
        """Register a filter of ours, bounded like the built-in ones."""
        self.filters[name] = bounded_filter(filter_, name)

    @staticmethod
    def check_parts(parts: tuple[Any, ...]) -> tuple[Any, ...]:
        return check_parts(parts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        check_binop(operator, left, right)
        return check_result(super().call_binop(context, operator, left, right), repr(operator))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        return budgeted_str_format(self, value)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if isinstance(obj, MethodType | BuiltinMethodType):
            obj = budgeted_str_format(self, obj) or obj  # a format reached some other way
        args = check_call(obj, args, kwargs)
        return check_call_result(obj, super().call(context, obj, *args, **kwargs))


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
    limit = _LIMIT.set(max_chars)  # no value the template builds may be larger either
    printed = _PRINTED.set([0])
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
        _LIMIT.reset(limit)
        _PRINTED.reset(printed)
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
