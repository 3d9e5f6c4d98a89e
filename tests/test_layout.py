"""The library's structure: no import circles (lazy imports count), no module shadowing the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen_cls"


def imports_of(path: Path) -> set[str]:
    """Modules of ``qwen_cls`` that ``path`` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import a, b
                found |= {alias.name for alias in node.names}
            elif node.module and node.module.startswith("qwen_cls."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qwen_cls.")}
    return found - {"__version__"}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: imports_of(p) & modules for p in PACKAGE.glob("*.py") if p.stem != "__main__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_lazy_imports_and_cycles(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from .a import x\n\ndef f():\n    from .b import y\n    from qwen_cls.c import z\n")
    assert imports_of(module) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_inside_the_package():
    graph = import_graph()
    assert {"cli", "model", "data", "files", "hub", "run_record"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_ground_floor_modules_import_nothing_of_the_package():
    graph = import_graph()
    for leaf in ("files", "hub", "recipe", "prompt", "metrics", "faults", "measure"):
        assert graph[leaf] == set(), f"{leaf} imports {graph[leaf]}"


def test_nothing_imports_the_command_line_back():
    graph = import_graph()
    assert [name for name, deps in graph.items() if "cli" in deps] == []


def test_no_module_is_named_like_a_standard_library_module():
    names = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert names & set(sys.stdlib_module_names) == set()


def architecture_table() -> dict[str, set[str]]:
    """module -> the imports docs/ARCHITECTURE.md lists for it."""
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit() and cells[1].startswith("`"):
            imports = set() if cells[3] == "—" else {n.strip() for n in cells[3].split(",")}
            table[cells[1].strip("`")] = (int(cells[0]), imports)
    return table


def test_architecture_doc_lists_every_module_with_its_real_imports():
    graph = {name: deps for name, deps in import_graph().items() if name != "__init__"}
    table = architecture_table()
    missing, stale = set(graph) - set(table), set(table) - set(graph)
    assert not missing and not stale, f"missing from the doc: {missing}; stale: {stale}"
    wrong = {name: (sorted(table[name][1]), sorted(graph[name])) for name in graph if table[name][1] != graph[name]}
    assert wrong == {}, f"doc vs code imports: {wrong}"
    upside_down = {name: sorted(d for d in deps if table[d][0] >= table[name][0]) for name, deps in graph.items()}
    upside_down = {name: deps for name, deps in upside_down.items() if deps}
    assert upside_down == {}, "a module imports one of its own level or above"
