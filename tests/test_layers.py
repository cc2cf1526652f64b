"""Layers point down only, and no two packages import each other (an AST walk, no imports).

settings (rollback_runbook.settings, .prefect_compat)  <-  blocks  <-  flows  <-  intake
<-  the application shell (rollback_runbook.cli, .stack, .demo, ...). Every import counts,
including the lazy ones inside functions: they are dependencies all the same.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import PROJECT_ROOT

PACKAGES = ("flows", "blocks", "intake", "rollback_runbook")
SHELL = ("cli", "stack", "demo", "local_run", "starter", "config_report")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Project modules ``path`` imports (absolute and relative), at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def unit(module: str) -> str:
    """The node of the package graph: a top-level package, or a part of rollback_runbook."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "rollback_runbook" and len(parts) > 1 else parts[0]


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            modules[module_name(path)] = imports_of(path)
    units: dict[str, set[str]] = defaultdict(set)
    for module, imported in modules.items():
        units[unit(module)]  # every unit appears, even one that imports nothing
        for other in imported:
            if unit(other) != unit(module) and unit(other) in _known_units(modules):
                units[unit(module)].add(unit(other))
    return modules, dict(units)


def _known_units(modules: dict[str, set[str]]) -> set[str]:
    return {unit(m) for m in modules}


def drawn(units: dict[str, set[str]]) -> str:
    return "\n".join(
        f"  {u} -> {', '.join(sorted(t)) or '(nothing)'}" for u, t in sorted(units.items())
    )


def cycle(units: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(units.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(units):
        if node not in state and (found := visit(node)):
            return found
    return None


def offenders(modules: dict[str, set[str]], source: str, allowed) -> list[str]:
    return sorted(
        f"{m} imports {i}"
        for m, imported in modules.items()
        if m == source or m.startswith(source + ".")
        for i in imported
        if not allowed(i)
    )


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycle_between_packages():
    _, units = graphs()
    found = cycle(units)
    assert found is None, f"import cycle {' -> '.join(found)}; the graph:\n{drawn(units)}"


def test_settings_import_nothing_of_the_project():
    modules, units = graphs()
    bad = offenders(
        modules, "rollback_runbook.settings", lambda i: under(i, "rollback_runbook.settings")
    )
    assert not bad, "\n".join(bad) + f"\nthe graph:\n{drawn(units)}"


def test_blocks_import_only_blocks_settings_and_the_prefect_compat_module():
    modules, units = graphs()
    # faults: the fault suite's test-only hook, a bottom-layer module beside settings
    base = ("blocks", "rollback_runbook.settings", "rollback_runbook.prefect_compat",
            "rollback_runbook.faults")  # fmt: skip
    bad = offenders(modules, "blocks", lambda i: under(i, *base) or i == "rollback_runbook")
    assert not bad, "\n".join(bad) + f"\nthe graph:\n{drawn(units)}"


def test_flows_import_neither_the_receiver_nor_the_shell():
    modules, units = graphs()
    shell = tuple(f"rollback_runbook.{s}" for s in SHELL)
    bad = offenders(modules, "flows", lambda i: not under(i, "intake", *shell))
    assert not bad, "\n".join(bad) + f"\nthe graph:\n{drawn(units)}"


def test_the_receiver_does_not_import_the_cli_or_the_shell():
    modules, units = graphs()
    shell = tuple(f"rollback_runbook.{s}" for s in SHELL)
    bad = offenders(modules, "intake", lambda i: not under(i, *shell))
    assert not bad, "\n".join(bad) + f"\nthe graph:\n{drawn(units)}"


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    sample = PROJECT_ROOT / "rollback_runbook" / "cli" / "commands" / "history.py"
    assert "rollback_runbook.cli.common" in imports_of(sample)
    modules, _ = graphs()
    assert "flows.config" in modules["rollback_runbook.cli.common"]  # imported inside a function
