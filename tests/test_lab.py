"""One switch for the whole chain: copies of the notebooks with a profile injected (``prepare_notebooks``, used by
``qwen-cls lab`` and ``make test``'s nbval step), JupyterLab bound to 127.0.0.1, and ``qwen-cls run`` injecting
only the run folder into the committed (gemma3-270m) notebooks."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

from qwen_cls.chain import lab
from qwen_cls.chain.run import run_chain
from qwen_cls.chain.templating import INJECTED, PREPARED, injected_parameters, prepare_notebooks
from qwen_cls.chapters import NOTEBOOKS
from qwen_cls.commands.cli import main
from qwen_cls.profiles import PROFILES
from qwen_cls.tracking import default_mode

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"


def cells(path: Path) -> list[dict]:
    """The raw cells of a notebook file, sources joined (nbformat writes them as lists of lines)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    return [{**c, "source": "".join(c["source"]) if isinstance(c["source"], list) else c["source"]}
            for c in raw["cells"]]


def assigned(source: str) -> dict:
    return {s.targets[0].id: ast.literal_eval(s.value) for s in ast.parse(source).body}


@pytest.fixture(scope="module")
def tiny_copies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("copies")
    os.environ.pop("QWEN_CLS_SWANLAB_MODE", None)
    return folder, prepare_notebooks("tiny", folder)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_prepared_copy_differs_from_the_committed_notebook_only_by_the_injected_cell(name, tiny_copies):
    folder, done = tiny_copies
    assert done[name] == "written"
    committed, copy = cells(NB_DIR / name), cells(folder / name)
    at = next(i for i, c in enumerate(copy) if INJECTED in c["metadata"].get("tags", []))
    params_at = next(i for i, c in enumerate(committed) if "parameters" in c["metadata"].get("tags", []))
    assert at == params_at + 1  # papermill puts it right after the `parameters` cell, which stays as committed
    injected = copy.pop(at)
    assert copy == committed  # ids, tags, sources, metadata, empty outputs: all as committed
    assert injected["id"] == INJECTED and injected["outputs"] == [] and injected["execution_count"] is None
    raw = json.loads((folder / name).read_text(encoding="utf-8"))
    assert {k: v for k, v in raw["metadata"].items() if k != "papermill"} == \
        json.loads((NB_DIR / name).read_text(encoding="utf-8"))["metadata"]

    # The injected values: every declared key, the tiny profile's, paths absolute (nbval runs a copy in its folder).
    values = assigned(injected["source"])
    declared = assigned(committed[params_at]["source"])
    assert list(values) == list(declared)
    for key, value in values.items():
        if key.endswith(("_path", "_dir")) and PROFILES["tiny"][key]:
            assert value == str((NB_DIR / PROFILES["tiny"][key]).resolve())
        elif key == "swanlab_mode":
            assert value == default_mode()
        else:
            assert value == PROFILES["tiny"][key], key
    assert values["out_dir"] == str(ROOT / "runs" / "notebooks")  # where `make test`'s nbval step always wrote
    assert values["profile"] == "tiny"
    if "train_path" in values:
        assert values["train_path"] == str(ROOT / "data" / "sample" / "train.jsonl")
    if name.startswith("03"):
        assert (values["learning_rate"], values["num_train_epochs"], values["max_length"]) == (5e-3, 2, 384)


def test_prepared_copies_keep_what_a_learner_changed(tmp_path):
    two = NOTEBOOKS[:2]
    assert prepare_notebooks("tiny", tmp_path, notebooks=two) == dict.fromkeys(two, "written")
    edited = tmp_path / two[0]
    nb = json.loads(edited.read_text(encoding="utf-8"))
    nb["cells"][0]["source"] = ["my notes\n"]
    edited.write_text(json.dumps(nb), encoding="utf-8")
    before = edited.read_bytes()
    (tmp_path / two[1]).unlink()
    assert prepare_notebooks("qwen2-0.5b", tmp_path, notebooks=two) == {two[0]: "kept", two[1]: "written"}
    assert edited.read_bytes() == before
    assert "data/fudan-news/train.jsonl" in (tmp_path / two[1]).read_text(encoding="utf-8")  # 01 of qwen2-0.5b
    # an unchanged copy is ours: prepared again with another profile
    assert prepare_notebooks("tiny", tmp_path, notebooks=two) == {two[0]: "kept", two[1]: "written"}
    assert "data/fudan-news" not in (tmp_path / two[1]).read_text(encoding="utf-8")
    assert set(json.loads((tmp_path / PREPARED).read_text(encoding="utf-8"))) == set(two)


def test_bad_override_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        prepare_notebooks("tiny", tmp_path / "c", {"learning_rate": 0})
    assert not (tmp_path / "c").exists()


def test_lab_launches_jupyterlab_on_localhost_only(tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(lab.os, "execv", lambda path, argv: launched.append((path, argv)))
    folder = tmp_path / "lab"
    assert main(["lab", "--profile", "tiny", "--dir", str(folder), "--no-browser", "--port", "8899"]) == 0
    [(path, argv)] = launched
    assert path == sys.executable and argv[:4] == [sys.executable, "-m", "jupyter", "lab"]
    assert "--ServerApp.ip=127.0.0.1" in argv and f"--ServerApp.root_dir={folder}" in argv
    assert "--no-browser" in argv and "--ServerApp.port=8899" in argv
    assert sorted(p.name for p in folder.glob("*.ipynb")) == sorted(NOTEBOOKS)
    assert '"profile = \\"tiny\\"\\n"' in (folder / NOTEBOOKS[3]).read_text(encoding="utf-8")

    launched.clear()
    assert main(["lab", "--profile", "tiny", "--dir", str(folder), "--prepare-only"]) == 0
    assert launched == []  # nothing started
    out = capsys.readouterr().out
    assert f"--ServerApp.ip=127.0.0.1 --ServerApp.root_dir={folder}" in out and "--no-browser" not in out


def test_lab_default_folder_is_git_ignored():
    assert lab.lab_folder("tiny") == ROOT / "runs" / "lab-tiny" / "notebooks"
    assert "runs/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_committed_profile_injects_only_the_run_folder_overrides_and_edited_defaults():
    lr = PROFILES["gemma3-270m"]["learning_rate"]  # the committed profile's value
    params = {"profile": "gemma3-270m", "out_dir": "/abs/run", "seed": 7, "learning_rate": lr, "max_length": 128}
    defaults = {"profile": "gemma3-270m", "max_length": 128, "learning_rate": lr, "seed": 42,
                "out_dir": "../runs/gemma3-270m"}
    assert injected_parameters("gemma3-270m", params, defaults) == {"out_dir": "/abs/run"}
    assert injected_parameters("gemma3-270m", params, defaults, {"seed": 7}) == {"seed": 7, "out_dir": "/abs/run"}
    edited = {**defaults, "learning_rate": 5e-3}  # a learner changed the committed cell: the profile still rules
    assert injected_parameters("gemma3-270m", params, edited) == {"learning_rate": lr, "out_dir": "/abs/run"}
    assert injected_parameters("tiny", params, defaults) == {k: params[k] for k in defaults}  # another profile: all


def test_run_injects_only_the_run_folder_for_the_committed_profile(tmp_path, monkeypatch):
    import papermill

    calls = {}

    def execute(input_path, output_path, parameters=None, cwd=None, **kwargs):
        calls[Path(input_path).name] = (parameters, cwd)
        Path(output_path).write_text("{}", encoding="utf-8")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    run = run_chain("gemma3-270m", tmp_path / "demo", progress=False, log_output=False)
    assert list(calls) == list(NOTEBOOKS)
    for name, (parameters, cwd) in calls.items():
        assert parameters == {"out_dir": str(tmp_path / "demo")}, name
        assert cwd == str(NB_DIR)  # the committed relative paths (../data/thucnews/...) resolve from here
    assert json.loads((run / "params.json").read_text(encoding="utf-8"))["learning_rate"] == 5e-4  # 03's cell

    calls.clear()
    run_chain("tiny", tmp_path / "tiny", {"seed": 3}, progress=False, log_output=False)
    parameters, _ = calls["03_lora_training.ipynb"]
    assert parameters["learning_rate"] == 5e-3 and parameters["seed"] == 3 and parameters["base_model"] == "tiny"
    assert len(parameters) == 18  # every key 03 declares, precision included


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones included) -> its bytes and mode."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["itself", "a symlink to it"])
def test_lab_refuses_the_committed_notebooks_folder_as_dir(how, tmp_path, monkeypatch, capsys):
    """Issue 33: --dir at the package's own notebooks/ (or a link to it) would mix prepared copies into the
    committed notebooks: refused, exit 2, saying why and what to pass, the folder byte-identical, nothing started."""
    launched = []
    monkeypatch.setattr(lab.os, "execv", lambda path, argv: launched.append(argv))
    target = NB_DIR
    if how == "a symlink to it":
        target = tmp_path / "nb"
        target.symlink_to(NB_DIR, target_is_directory=True)
    before = _snapshot(NB_DIR)
    assert main(["lab", "--profile", "tiny", "--dir", str(target), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert f"error: --dir {NB_DIR} is the package's own notebooks folder" in err
    assert "Leave --dir out (the copies go to runs/lab-<profile>/notebooks) or give another folder" in err
    assert "Traceback" not in err and launched == []
    assert _snapshot(NB_DIR) == before and not (NB_DIR / PREPARED).exists()


@pytest.mark.parametrize("euid", [0, 1000])
def test_lab_as_root_passes_allow_root_with_a_note(euid, tmp_path, monkeypatch, capsys):
    """Issue 33: JupyterLab refuses to start as root without --allow-root (containers, Colab-like machines)."""
    launched = []
    monkeypatch.setattr(lab.os, "execv", lambda path, argv: launched.append(argv))
    monkeypatch.setattr(lab.os, "geteuid", lambda: euid)
    folder = tmp_path / "lab"
    assert main(["lab", "--profile", "tiny", "--dir", str(folder), "--no-browser"]) == 0
    [argv] = launched
    out = capsys.readouterr().out
    if euid == 0:
        assert argv[-1] == "--allow-root" and "--ServerApp.ip=127.0.0.1" in argv
        assert "note: running as root (a container?): JupyterLab gets --allow-root; it still listens on 127.0.0.1" \
            in out
    else:
        assert "--allow-root" not in argv and "running as root" not in out
    launched.clear()
    assert main(["lab", "--profile", "tiny", "--dir", str(folder), "--prepare-only"]) == 0  # the printed command too
    assert launched == [] and ("--allow-root" in capsys.readouterr().out) == (euid == 0)
