"""One name, one meaning: no two modules of ``qwen_cls`` define a module-level function (``def`` or ``async def``,
private ones included) of the same name, except the names in :data:`ALLOWED`, each with the modules that share it
and why it means the same thing in each. ``pipeline.folder_state`` and ``files.folder_state`` were two different
functions with one name (issue 35); this test keeps such pairs from coming back, and fails once an entry of
:data:`ALLOWED` no longer matches the code (so it is removed then).
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_layout import PACKAGE, modules

ANY = None  # an entry that any number of modules may share

# name -> (the modules that define it, or ANY; why it is one meaning)
ALLOWED: dict[str, tuple[frozenset[str] | None, str]] = {
    "register": (ANY, "each command module's `register(subparsers)` adds its sub-command to `qwen-cls` "
                      "(commands.cli.COMMAND_MODULES calls them all)"),
    "accuracy_coverage": (frozenset({"metrics", "plots"}),
                          "plots names each figure for what it shows: plots.accuracy_coverage draws the curve "
                          "metrics.accuracy_coverage computes (notebook 04 calls both, always module-qualified)"),
    "guarded_app": (frozenset({"serve", "serving.dashboard"}),
                    "each local server's ASGI app wrapped in its local_server.LocalGuard subclass"),
}


def module_functions(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Function name -> the modules (dotted, as ``test_layout.modules``) that define it at module level."""
    found: dict[str, set[str]] = {}
    for name, path in modules(package).items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.setdefault(node.name, set()).add(name)
    return found


def collisions(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Function names defined in more than one module, with those modules."""
    return {name: where for name, where in module_functions(package).items() if len(where) > 1}


def unexplained(found: dict[str, set[str]], allowed=ALLOWED) -> dict[str, list[str]]:
    """The collisions ``allowed`` does not explain: a name it lacks, or modules it does not name for that name."""
    wrong = {}
    for name, where in found.items():
        if name not in allowed:
            wrong[name] = sorted(where)
        elif allowed[name][0] is not ANY and where != allowed[name][0]:
            wrong[name] = sorted(where)
    return wrong


def test_no_function_name_means_two_things():
    wrong = unexplained(collisions())
    assert wrong == {}, (
        "functions of one name in several modules (rename one, or add the name to ALLOWED with why it means "
        f"the same thing in each): {wrong}")


def test_every_allowed_name_still_collides_where_it_says():
    found = collisions()
    stale = {name: sorted(where or ["any"]) for name, (where, _) in ALLOWED.items()
             if name not in found or where is not ANY and found[name] != where}
    assert stale == {}, f"ALLOWED entries the code no longer matches (remove or correct them): {stale}"
    assert all(reason.strip() for _, reason in ALLOWED.values())


def test_a_new_collision_fails_and_an_allowed_one_passes(tmp_path):
    package = tmp_path / "qwen_cls"
    (package / "chain").mkdir(parents=True)
    (package / "chain" / "__init__.py").write_text("")
    (package / "files.py").write_text("def folder_state(path):\n    return 'built'\n\ndef register(p):\n    pass\n")
    (package / "chain" / "run_folder.py").write_text(
        "class Run:\n    def folder_state(self):\n        pass\n\ndef register(p):\n    pass\n")
    assert collisions(package) == {"register": {"files", "chain.run_folder"}}  # a method is not a function here
    (package / "chain" / "run_folder.py").write_text("async def folder_state(path):\n    return 'finished'\n")
    found = collisions(package)
    assert found == {"folder_state": {"files", "chain.run_folder"}}
    assert unexplained(found) == {"folder_state": ["chain.run_folder", "files"]}
    allowed = {"folder_state": (frozenset({"files", "chain.run_folder"}), "the same state, read twice")}
    assert unexplained(found, allowed) == {}
    (package / "hub.py").write_text("def folder_state():\n    pass\n")  # a third module: not what the entry names
    assert unexplained(collisions(package), allowed) == {"folder_state": ["chain.run_folder", "files", "hub"]}
