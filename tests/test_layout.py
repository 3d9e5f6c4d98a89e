"""The library's structure: two tiers (the teaching core the notebooks import, the tools that run and serve the
tutorial), no import circles (lazy imports count), no module shadowing the standard library.

The core is the package's top level (``qwen_cls/*.py``); the tools tier is its subpackages (``qwen_cls/chain/``,
``qwen_cls/serving/``, ...). Notebooks import only the core, the core imports nothing of the tools tier, and each
core module names the notebooks that teach it in a ``Taught in: NN, NN`` line of its docstring (plumbing the
chapters run on without teaching it, such as file writes and model builds: ``Plumbing under: NN, NN``).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen_cls"
NOTEBOOKS = PACKAGE.parent / "notebooks"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``qwen_cls/chain/run.py`` -> ``chain.run``; a subpackage's ``__init__.py`` -> the subpackage."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def is_core(name: str) -> bool:
    return "." not in name and name not in {"__init__", "__main__"} and not (PACKAGE / name).is_dir()


def _resolve(target: list[str], names: list[str], known: set[str]) -> set[str]:
    """Modules of ``known`` that ``from <target> import <names>`` (or ``import <target>``) reaches."""
    found = set()
    base = ".".join(target)
    for name in names or [None]:
        if name and f"{base}.{name}".strip(".") in known:
            found.add(f"{base}.{name}".strip("."))
        elif base in known:
            found.add(base)
    return found


def imports_of(path: Path, package: Path = PACKAGE, known: set[str] | None = None) -> set[str]:
    """Modules of ``qwen_cls`` that ``path`` imports anywhere (top level or inside a function), as dotted names."""
    known = set(modules(package)) if known is None else known
    inside = path.is_relative_to(package)
    here = module_name(path, package).split(".") if inside else []
    package_parts = here if path.name == "__init__.py" and here != ["__init__"] else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                found |= _resolve(base + (node.module.split(".") if node.module else []), names, known)
            elif node.module and (node.module == "qwen_cls" or node.module.startswith("qwen_cls.")):
                found |= _resolve(node.module.split(".")[1:], names, known)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qwen_cls."):
                    found |= _resolve(alias.name.split(".")[1:], [], known)
    return found - {"__init__", ""}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = set(modules(package))
    graph = {name: imports_of(path, package, known) - {name} for name, path in modules(package).items()
             if name != "__main__" and path.read_text(encoding="utf-8").strip()}
    return graph


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Level 0: imports nothing of the package; else one above the highest module it imports."""
    done: dict[str, int] = {}

    def level(name):
        if name not in done:
            done[name] = 1 + max((level(d) for d in graph.get(name, ())), default=-1)
        return done[name]

    for name in graph:
        level(name)
    return done


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


def notebook_imports(notebook: Path, known: set[str] | None = None) -> set[str]:
    """Modules of ``qwen_cls`` a notebook's code cells import (magics and shell lines skipped)."""
    known = set(modules()) if known is None else known
    found = set()
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
        try:
            tree = ast.parse(source)
        except SyntaxError as err:
            raise AssertionError(f"{notebook.name}: a cell does not parse ({err})") from err
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qwen_cls":
                found |= _resolve(node.module.split(".")[1:], [a.name for a in node.names], known)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("qwen_cls."):
                        found |= _resolve(alias.name.split(".")[1:], [], known)
    return found


def chapter_notebooks() -> dict[str, Path]:
    """``"03"`` -> ``notebooks/03_lora_training.ipynb``."""
    return {p.name[:2]: p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))}


def taught_in(path: Path) -> set[str] | None:
    """The notebook numbers a module's docstring names in its ``Taught in:`` line; ``None`` without one."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    match = re.search(r"^(?:Taught in|Plumbing under): ([0-9, ]+)", doc, re.MULTILINE)
    return None if match is None else {n.strip() for n in match.group(1).split(",") if n.strip()}


def test_the_graph_reader_sees_lazy_imports_subpackages_and_cycles(tmp_path):
    package = tmp_path / "qwen_cls"
    (package / "tools").mkdir(parents=True)
    for name in ("a", "b", "c", "d", "tools/__init__", "tools/e", "tools/f"):
        (package / f"{name}.py").write_text("")
    module = package / "m.py"
    module.write_text("from .a import x\n\ndef f():\n    from .b import y\n    from qwen_cls.c import z\n"
                      "    from .tools import e\n")
    assert imports_of(module, package) == {"a", "b", "c", "tools.e"}
    (package / "tools" / "f.py").write_text("from .e import g\nfrom ..d import h\nfrom qwen_cls import a\n")
    assert imports_of(package / "tools" / "f.py", package) == {"tools.e", "d", "a"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert levels({"a": set(), "b": {"a"}, "c": {"a", "b"}}) == {"a": 0, "b": 1, "c": 2}


def test_the_notebook_reader_sees_every_form_of_import(tmp_path):
    notebook = tmp_path / "09_x.ipynb"
    cells = ["%matplotlib inline\nfrom qwen_cls import plots\n", "import qwen_cls\nfrom qwen_cls.chain.run import X\n",
             "def f():\n    from qwen_cls.serving import export\n"]
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "source": c} for c in cells]}))
    assert notebook_imports(notebook, {"plots", "chain.run", "serving.export", "data"}) == {
        "plots", "chain.run", "serving.export"}


def test_no_import_circle_inside_the_package():
    graph = import_graph()
    assert {"commands.cli", "model", "data", "files", "hub", "run_record", "chain.run"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_ground_floor_modules_import_nothing_of_the_package():
    graph = import_graph()
    for leaf in ("files", "hub", "recipe", "prompt", "metrics", "commands.faults", "measure"):
        assert graph[leaf] == set(), f"{leaf} imports {graph[leaf]}"


def test_nothing_imports_the_command_line_back():
    graph = import_graph()
    assert [name for name, deps in graph.items() if "commands.cli" in deps] == []


def test_no_module_is_named_like_a_standard_library_module():
    names = {part for name in modules() for part in name.split(".")} - {"__init__", "__main__"}
    assert names & set(sys.stdlib_module_names) == set()


def test_notebooks_import_only_the_core():
    known = set(modules())
    assert len(chapter_notebooks()) == 8
    wrong = {number: sorted(m for m in notebook_imports(path, known) if not is_core(m))
             for number, path in chapter_notebooks().items()}
    assert {n: m for n, m in wrong.items() if m} == {}, "a notebook imports the tools tier"


def test_the_core_imports_nothing_of_the_tools_tier():
    graph = import_graph()
    assert {name for name in graph if is_core(name)} >= {"data", "prompt", "tokenization", "train", "evaluate",
                                                          "rag", "approaches", "metrics", "plots", "exercises"}
    wrong = {name: sorted(d for d in deps if not is_core(d)) for name, deps in graph.items() if is_core(name)}
    assert {n: d for n, d in wrong.items() if d} == {}, "a core module imports a tool"


def test_every_core_module_names_the_notebooks_that_teach_it():
    known = set(modules())
    importers: dict[str, set[str]] = {}
    for number, path in chapter_notebooks().items():
        for name in notebook_imports(path, known):
            importers.setdefault(name, set()).add(number)
    for name, path in modules().items():
        if not is_core(name):
            continue
        named = taught_in(path)
        assert named, f"qwen_cls/{name}.py: no 'Taught in: NN' line in its docstring"
        assert named <= set(chapter_notebooks()), f"qwen_cls/{name}.py names a notebook that does not exist: {named}"
        assert importers.get(name, set()) <= named, (
            f"qwen_cls/{name}.py: imported by notebooks {sorted(importers[name])}, names {sorted(named)}")


def test_the_tier_checks_fail_on_a_wrong_import(tmp_path):
    package = tmp_path / "qwen_cls"
    (package / "chain").mkdir(parents=True)
    (package / "chain" / "__init__.py").write_text("")
    (package / "chain" / "run.py").write_text("from ..data import x\n")
    (package / "data.py").write_text("def f():\n    from .chain.run import y\n")
    graph = import_graph(package)
    assert graph["data"] == {"chain.run"} and graph["chain.run"] == {"data"}
    assert [d for d in graph["data"] if "." in d] == ["chain.run"]  # what the core test rejects
    notebook = tmp_path / "01_x.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "source": "from qwen_cls.chain.run import y"}]}))
    assert notebook_imports(notebook, set(graph)) == {"chain.run"}


def architecture_table() -> dict[str, tuple[int, set[str]]]:
    """module -> (level, the imports docs/ARCHITECTURE.md lists for it)."""
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit() and cells[1].startswith("`"):
            imports = set() if cells[3] == "—" else {n.strip() for n in cells[3].split(",")}
            table[cells[1].strip("`")] = (int(cells[0]), imports)
    return table


def test_architecture_doc_lists_every_module_with_its_real_imports():
    graph = {name: deps for name, deps in import_graph().items()
             if name != "__init__" and not (PACKAGE / name).is_dir()}
    table = architecture_table()
    missing, stale = set(graph) - set(table), set(table) - set(graph)
    assert not missing and not stale, f"missing from the doc: {missing}; stale: {stale}"
    wrong = {name: (sorted(table[name][1]), sorted(graph[name])) for name in graph if table[name][1] != graph[name]}
    assert wrong == {}, f"doc vs code imports: {wrong}"
    wrong_levels = {name: (table[name][0], level) for name, level in levels(graph).items() if table[name][0] != level}
    assert wrong_levels == {}, f"doc vs computed levels: {wrong_levels}"
