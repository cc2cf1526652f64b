"""Hostile runbook files: refused quickly with one clear problem, never a hang or a traceback.

"Quickly" is measured by counting, not by a clock: every YAML node PyYAML builds goes
through ``ScalarNode.__init__`` or ``CollectionNode.__init__``, and the loader must refuse
before it has built more than ``MAX_NODES`` of them, whatever the file says.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml
import yaml.nodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.config import (
    MAX_BYTES,
    MAX_DEPTH,
    MAX_NODES,
    MAX_PROBLEMS,
    QUOTE_CHARS,
    Runbook,
    RunbookError,
    find_runbook,
    load_runbook,
)
from tests.conftest import BASE_RUNBOOK, write_runbook

#: a message may quote input, but never more than this in all
MESSAGE_BOUND = 8_000


class NodeCounter:
    """Counts YAML nodes as PyYAML builds them (the C loader builds the same classes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for cls in (yaml.nodes.ScalarNode, yaml.nodes.CollectionNode):
            original = cls.__init__

            def counting(node, *args, _original=original, **kwargs):
                self.count += 1
                _original(node, *args, **kwargs)

            monkeypatch.setattr(cls, "__init__", counting)


@pytest.fixture
def nodes(monkeypatch):
    return NodeCounter(monkeypatch)


def _refused(path: Path) -> RunbookError:
    with pytest.raises(RunbookError) as exc:
        load_runbook(path)
    assert len(str(exc.value)) < MESSAGE_BOUND
    return exc.value


def _file(tmp_path: Path, content: bytes | str, name: str = "hostile.yaml") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


# -- bounded parsing ----------------------------------------------------------------------

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
model: *i
"""


def test_alias_bomb_is_refused_before_it_expands(tmp_path, nodes):
    error = _refused(_file(tmp_path, BILLION_LAUGHS))
    (problem,) = error.problems
    assert "line 4" in problem and f"more than {MAX_NODES} values" in problem
    assert nodes.count < 100


def test_aliases_within_the_caps_are_read(tmp_path):
    text = (
        BASE_RUNBOOK.read_text()
        .replace("restore: {to: last_known_good}", "restore: &r {to: last_known_good}")
        .replace("verify:", "x: *r\nverify:")
    )
    problems = _refused(_file(tmp_path, text)).problems
    assert problems == ["x: unknown key (check its spelling and indentation)"]


def test_nesting_through_aliases_counts(tmp_path):
    inner = "[" * 10 + "]" * 10
    text = f"a: &a {inner}\nb: [[[[[[[[*a]]]]]]]]\n"
    (problem,) = _refused(_file(tmp_path, text)).problems
    assert "line 2" in problem and f"nested deeper than {MAX_DEPTH}" in problem


def test_deep_nesting_stops_at_the_limit(tmp_path, nodes):
    deep = "model: " + "[" * 200_000 + "]" * 200_000
    (problem,) = _refused(_file(tmp_path, deep[: MAX_BYTES - 1])).problems
    assert f"nested deeper than {MAX_DEPTH} levels" in problem
    assert nodes.count <= MAX_DEPTH + 2


def test_deep_block_nesting_stops_at_the_limit(tmp_path):
    deep = "".join(f"{' ' * i}k{i}:\n" for i in range(200))
    (problem,) = _refused(_file(tmp_path, deep)).problems
    assert "nested deeper" in problem


def test_too_many_values_stop_the_parser(tmp_path, nodes):
    wide = "triggers: [" + ",".join(["1"] * 100_000) + "]\n"
    (problem,) = _refused(_file(tmp_path, wide)).problems
    assert f"more than {MAX_NODES} values" in problem
    assert nodes.count <= MAX_NODES + 1


def test_file_over_the_size_cap_is_refused_unread(tmp_path, nodes):
    path = _file(tmp_path, "# " + "x" * MAX_BYTES + "\nmodel: a\n")
    (problem,) = _refused(path).problems
    assert f"at most {MAX_BYTES}" in problem
    assert nodes.count == 0


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert _refused(fifo).problems == ["not a regular file"]


def test_a_directory_is_refused(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    assert _refused(tmp_path / "dir.yaml").problems == ["not a regular file"]


# -- encodings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [
        ("utf-16", "UTF-16 or UTF-32"),
        ("utf-16-le", "UTF-16 or UTF-32"),
        ("utf-16-be", "UTF-16 or UTF-32"),
        ("utf-32", "UTF-16 or UTF-32"),
        ("utf-32-be", "NUL bytes"),
        ("latin-1", "not UTF-8 text (byte 0xe9 at offset"),
    ],
)
def test_other_encodings_give_one_clear_problem(tmp_path, encoding, expected):
    text = "model: caf\u00e9\ndescription: d\u00e9j\u00e0 vu\n"
    (problem,) = _refused(_file(tmp_path, text.encode(encoding))).problems
    assert expected in problem


def test_binary_gives_one_clear_problem(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256))
    (problem,) = _refused(_file(tmp_path, png)).problems
    assert "NUL bytes" in problem


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = write_runbook(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_runbook(path).model == "churn-classifier"


def test_control_characters_are_a_yaml_problem(tmp_path):
    (problem,) = _refused(_file(tmp_path, "model: a\x07b\n")).problems
    assert "not valid YAML" in problem


@pytest.mark.parametrize(
    "value",
    ["1" * 5_000, "2026-02-31", "2026-01-01 25:61:00", "!!timestamp x", "!!int x"],
)
def test_values_yaml_cannot_build_are_problems(tmp_path, value):
    (problem,) = _refused(_file(tmp_path, f"model: a\ndescription: {value}\n")).problems
    assert "not valid YAML" in problem and len(problem) < 500


def test_a_huge_hexadecimal_number_is_quoted_short(tmp_path):
    path = write_runbook(tmp_path)
    path.write_text(
        path.read_text().replace("description:", "description: 0x" + "f" * 5_000 + "\nx:")
    )
    problems = _refused(path).problems
    assert (
        "description: Input should be a valid string (got <an integer of 20000 bits>)" in problems
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("cooldown", ".nan", "cooldown: expected at most"),
        ("cooldown", ".inf", "cooldown: expected at most"),
        ("cooldown", "0x" + "f" * 2_000, "cooldown: expected at most"),
        ("cooldown", "9" * 60 + "s", "cooldown: expected at most"),
        ("cooldown", "-.inf", "cooldown: a duration cannot be negative"),
        ("triggers", "[{metric: accuracy, below: .nan}]", "triggers.0.below: Input should be"),
        ("triggers", "[{metric: accuracy, above: .inf}]", "triggers.0.above: Input should be"),
    ],
)
def test_numbers_must_be_finite_and_durations_at_most_a_year(tmp_path, field, value, expected):
    path = write_runbook(tmp_path)
    data = path.read_text().replace(f"\n{field}:", f"\nreplaced_{field}:", 1)
    path.write_text(data.replace(f"\nreplaced_{field}:", f"\n{field}: {value}\nunused_{field}:"))
    problems = _refused(path).problems
    assert any(p.startswith(expected) for p in problems), problems


def test_lone_surrogate_names_the_field(tmp_path):
    path = write_runbook(tmp_path, description="\ud800")
    (problem,) = _refused(path).problems
    assert problem.startswith("description: text holds a lone surrogate")
    problem.encode("utf-8")  # the message itself can be printed


def test_control_characters_in_keys_are_quoted(tmp_path):
    path = write_runbook(tmp_path, approval={"\x1b[31mred": 1})
    problems = _refused(path).problems
    assert any(p.startswith("approval.'\\x1b[31mred': unknown key") for p in problems), problems
    assert all(p.isprintable() for p in problems)


# -- bounded messages ---------------------------------------------------------------------


def test_offending_input_is_quoted_short(tmp_path):
    huge = "x" * 20_000
    path = write_runbook(
        tmp_path,
        cooldown=huge,
        restore={"to": huge},
        approval={huge: 1},
        environments={huge: {"registry": huge}},
        verify={"predictor": huge},
    )
    error = _refused(path)
    assert len(error.problems) >= 5
    for problem in error.problems:
        assert len(problem) <= 2 * QUOTE_CHARS + 200, problem


def test_thousands_of_problems_list_the_first_ones_and_count_the_rest(tmp_path):
    path = write_runbook(tmp_path, triggers=[{"metric": f"m{i}"} for i in range(1_200)])
    error = _refused(path)
    assert error.total >= 1_200
    assert len(error.problems) == MAX_PROBLEMS + 1
    assert error.problems[-1] == f"... and {error.total - MAX_PROBLEMS} more problem(s)"


def test_a_model_name_of_ten_thousand_characters_is_refused_short():
    with pytest.raises(ValueError) as exc:
        find_runbook("m" * 10_000)
    assert "invalid model name" in str(exc.value) and len(str(exc.value)) < 300


# -- properties ---------------------------------------------------------------------------

_FOLDER = Path(tempfile.mkdtemp(prefix="hostile-runbooks-"))
PROPERTY = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load_counted(nodes: NodeCounter, content: bytes) -> None:
    path = _FOLDER / "generated.yaml"
    path.write_bytes(content)
    nodes.count = 0
    try:
        result = load_runbook(path)
    except RunbookError as e:
        assert e.problems and len(str(e)) < MESSAGE_BOUND
        str(e).encode("utf-8")
    else:
        assert isinstance(result, Runbook)
    assert nodes.count <= MAX_NODES + 1


@PROPERTY
@given(content=st.binary(max_size=2_000))
def test_arbitrary_bytes_only_ever_raise_runbook_error(nodes, content):
    _load_counted(nodes, content)


YAMLISH = st.lists(
    st.sampled_from(
        [*"[]{}:,-&*!|>'\"#%@?`\n\n\t   ", "&a ", "*a", "<<: ", "!!python/object ", "!!binary ",
         "!!timestamp ", "\\ud800", "\u00e9", "\x85", "\ufeff", "model: ", "x", "1", "0x",
         "1e999", ".nan", ".inf", "0x" + "f" * 2_000, "2026-02-31", "~", "null", "yes", "--- ",
         "...", "%YAML 1.1\n", "  ", "\n- "]
    ),
    max_size=80,
).map("".join)  # fmt: skip


@PROPERTY
@given(text=YAMLISH)
def test_yaml_like_text_only_ever_raises_runbook_error(nodes, text):
    _load_counted(nodes, text.encode("utf-8", "surrogatepass"))


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["5m", "file://x", "s3://b/p", "last_known_good", "always", "a:b"])
)
STRUCTURES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=12) | st.sampled_from(["for", "below", "metric"]), inner)
    ),
    max_leaves=40,
)
_BASE = yaml.safe_load(BASE_RUNBOOK.read_text())


def _places(data, here=()):
    """Every key path in the runbook: ("approval", "timeout"), ("triggers", 1, "for"), ..."""
    yield here
    if isinstance(data, dict | list):
        for key, value in data.items() if isinstance(data, dict) else enumerate(data):
            yield from _places(value, (*here, key))


PLACES = sorted(set(_places(_BASE)) - {()}, key=repr)


def _replaced(data, place, value):
    if not place:
        return value
    copy = dict(data) if isinstance(data, dict) else list(data)
    copy[place[0]] = _replaced(data[place[0]], place[1:], value)
    return copy


@PROPERTY
@given(
    place=st.sampled_from(PLACES),
    value=STRUCTURES,
    deep=st.integers(min_value=0, max_value=MAX_DEPTH + 4),
)
@pytest.mark.slow
def test_arbitrary_structures_in_a_runbook_only_ever_raise_runbook_error(nodes, place, value, deep):
    for _ in range(deep):
        value = [value]
    data = _replaced(_BASE, place, value)
    _load_counted(nodes, yaml.safe_dump(data, allow_unicode=True).encode("utf-8", "surrogatepass"))


# -- contained paths ----------------------------------------------------------------------

FILE_FIELDS = {
    "verify.suite": ("verify", "suite"),
    "verify.dataset": ("verify", "dataset"),
    "postmortem.template": ("postmortem", "template"),
    "notify.user_notice_template": ("notify", "user_notice_template"),
}


def _with_file(tmp_path: Path, field: str, value: str) -> Path:
    section, key = FILE_FIELDS[field]
    return write_runbook(tmp_path, **{section: {key: value}})


@pytest.mark.parametrize("field", sorted(FILE_FIELDS))
@pytest.mark.parametrize("named", ["/proc/self/environ", "../../../../../../proc/self/environ"])
def test_files_outside_the_runbook_folders_are_refused_at_load(tmp_path, field, named):
    (problem,) = _refused(_with_file(tmp_path, field, named)).problems
    assert problem.startswith(f"{field}: ") and "environ" in problem
    assert "is outside the runbook's folders" in problem


def test_a_symlink_out_of_the_runbook_folder_is_refused(tmp_path):
    book, elsewhere = tmp_path / "book", tmp_path / "elsewhere"
    (book / "templates").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "secret.j2").write_text("{{ secret }}")
    (book / "templates" / "pm.j2").symlink_to(elsewhere / "secret.j2")
    path = _with_file(book, "postmortem.template", "templates/pm.j2")
    (problem,) = _refused(path).problems
    assert problem.startswith("postmortem.template: 'templates/pm.j2' (resolves to ")
    assert "secret.j2" in problem


def test_a_symlink_to_proc_is_refused_even_inside_allowed_paths(tmp_path, monkeypatch):
    (tmp_path / "environ.j2").symlink_to("/proc/self/environ")
    monkeypatch.setenv("RUNBOOK_ALLOWED_PATHS", "/proc")
    (problem,) = _refused(_with_file(tmp_path, "postmortem.template", "environ.j2")).problems
    assert "environ.j2' (resolves to '/proc/" in problem and "environ" in problem


def test_allowed_paths_let_a_runbook_use_a_shared_folder(tmp_path, monkeypatch):
    book, shared = tmp_path / "book", tmp_path / "shared"
    book.mkdir()
    shared.mkdir()
    (shared / "pm.j2").write_text("{{ model }}")
    path = _with_file(book, "postmortem.template", str(shared / "pm.j2"))
    assert "is outside" in _refused(path).problems[0]
    monkeypatch.setenv("RUNBOOK_ALLOWED_PATHS", f"/nonexistent{os.pathsep}{shared}")
    rb = load_runbook(path)
    assert rb.resolve(rb.postmortem.template) == (shared / "pm.j2").resolve()


@pytest.mark.parametrize("named", ["a\x00b", "", "x" * 2_000, "tab\there"])
def test_unprintable_or_huge_paths_name_the_field(tmp_path, named):
    problems = _refused(_with_file(tmp_path, "verify.dataset", named)).problems
    assert any(p.startswith("verify.dataset: expected a file path") for p in problems), problems


def test_a_file_swapped_for_a_symlink_after_loading_is_refused_on_use(tmp_path):
    from jinja2.exceptions import SecurityError

    from flows.steps.postmortem import render_template

    (tmp_path / "pm.j2").write_text("{{ model }}")
    rb = load_runbook(_with_file(tmp_path, "postmortem.template", "pm.j2"))
    (tmp_path / "pm.j2").unlink()
    (tmp_path / "pm.j2").symlink_to("/proc/self/environ")
    with pytest.raises(RunbookError, match="postmortem.template: .*environ"):
        rb.resolve(rb.postmortem.template)
    with pytest.raises(SecurityError, match="environ"):
        render_template(tmp_path / "pm.j2", {"model": "m"}, rb.allowed_roots())
    with pytest.raises(SecurityError, match="environ"):
        render_template(tmp_path / "pm.j2", {"model": "m"})
    with pytest.raises(SecurityError, match="environ"):
        render_template(Path("/proc/self/environ"), {})


def test_template_includes_stay_inside_the_folders(tmp_path):
    from jinja2.exceptions import SecurityError, TemplateNotFound

    from flows.steps.postmortem import render_template

    book = tmp_path / "book"
    book.mkdir()
    (tmp_path / "outside.j2").write_text("SECRET")
    (book / "part.j2").write_text("part {{ x }}")
    (book / "link.j2").symlink_to(tmp_path / "outside.j2")
    (book / "main.j2").write_text('{% include "part.j2" %}')
    assert render_template(book / "main.j2", {"x": 1}) == "part 1"
    (book / "main.j2").write_text('{% include "../outside.j2" %}')
    with pytest.raises(TemplateNotFound):
        render_template(book / "main.j2", {})
    (book / "main.j2").write_text('{% include "link.j2" %}')
    with pytest.raises(SecurityError):
        render_template(book / "main.j2", {})


@pytest.mark.parametrize(
    "predictor",
    ["examples.churn", "examples..churn:predict", "a:b:c", ":f", "m:", "caf\u00e9:f", "a.:f",
     "m:f()", "x" * 300 + ":f", "os.path:join\n"],
)  # fmt: skip
def test_predictor_must_be_module_colon_function(tmp_path, predictor):
    path = write_runbook(tmp_path, verify={"predictor": predictor})
    problems = _refused(path).problems
    assert any(
        p.startswith("verify.predictor: expected 'package.module:function'") for p in problems
    )
    assert all(len(p) < 300 for p in problems)


def test_a_path_of_ten_thousand_characters_is_one_short_problem(tmp_path):
    with pytest.raises(RunbookError) as exc:
        find_runbook(str(tmp_path / ("r" * 10_000 + ".yaml")))
    assert exc.value.problems == ["cannot read file: File name too long"]
    assert len(str(exc.value)) < 500
