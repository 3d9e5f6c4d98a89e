"""Built model folders verify themselves (issue 23): a manifest written last, sizes checked on every use, hashes
with ``--verify``; a damaged folder is named with the command that rebuilds it (exit 2, no traceback); a folder
that is not a build is never taken for one; temp folders of killed builds go with the next build.

The real caches are never touched: every test points ``QWEN_CLS_CACHE`` at its own folder, and the Gemma
folder is copied by hard links, whose damage is done by replacing a link, never by writing through it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qwen_cls import manifests as MF
from qwen_cls import model as M
from qwen_cls import model_cache as MC
from qwen_cls.chain import locks as L
from qwen_cls.commands.cli import main
from qwen_cls.model_builds import folders as BF
from qwen_cls.model_builds import gemma as G
from qwen_cls.model_builds import tiny as T

ROOT = Path(__file__).resolve().parents[1]
ROW = '{"text": "国足晋级决赛圈", "category": ["Sports", "Finance"]}\n'


@pytest.fixture(scope="module")
def real_gemma() -> Path:
    """The Gemma folder `make setup` built into the real cache: only read (hard-linked), never built here."""
    folder = MC.GEMMA_BUILD.default_dir()
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"no Gemma build in {folder}; run `make setup`")
    return folder


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("QWEN_CLS_CACHE", str(folder))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def replace_truncated(path: Path, size: int) -> None:
    """``path`` replaced by a new file holding its first ``size`` bytes (a hard-linked original stays whole)."""
    head = path.open("rb").read(size)
    path.unlink()
    path.write_bytes(head)


def linked_copy(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            os.link(path, target / path.name)
    return target


def predict(capsys, tmp_path, *source) -> tuple[int, str]:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(ROW, encoding="utf-8")
    capsys.readouterr()
    rc = main(["predict", *source, "--input", str(rows), "--output", str(tmp_path / "out.jsonl"), "--quiet"])
    return rc, capsys.readouterr().err


def test_build_writes_a_manifest_of_every_file_with_size_and_sha256(tiny_dir):
    manifest = json.loads((tiny_dir / MF.MANIFEST).read_text(encoding="utf-8"))
    assert manifest["model"] == "tiny" and manifest["version"] == MC.TINY_VERSION
    on_disk = sorted(p.name for p in tiny_dir.iterdir() if p.name != MF.MANIFEST)
    assert sorted(manifest["files"]) == on_disk and "model.safetensors" in on_disk
    for name, info in manifest["files"].items():
        data = (tiny_dir / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert not any(p.name.startswith(".") for p in tiny_dir.parent.iterdir())  # no temp folder, no owner mark


def test_truncated_weights_are_named_with_the_rebuild_command(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_dir, folder)
    replace_truncated(folder / "model.safetensors", 4096)
    before = snapshot(folder)
    rc, err = predict(capsys, tmp_path, "--model", str(folder))
    assert rc == 2 and "Traceback" not in err
    assert f"{folder}: damaged model folder (model.safetensors: 4096 bytes, expected " in err
    assert f"rebuild it with `qwen-cls tiny-model --out {folder}`" in err
    assert snapshot(folder) == before and not (tmp_path / "out.jsonl").exists()


def test_cached_tiny_without_config_is_reported_not_loaded(tiny_dir, cache, tmp_path, capsys):
    folder = cache / f"tiny-qwen2-v{MC.TINY_VERSION}-seed0"
    shutil.copytree(tiny_dir, folder)
    (folder / "config.json").unlink()
    before = snapshot(folder)
    rc, err = predict(capsys, tmp_path, "--model", "tiny")
    assert rc == 2 and "Traceback" not in err and "model_type" not in err
    assert "config.json: missing" in err and "rebuild it with `qwen-cls tiny-model`" in err
    assert snapshot(folder) == before
    # the command named rebuilds it, and the model loads again
    assert main(["tiny-model"]) == 0
    assert snapshot(folder)["config.json"] == (tiny_dir / "config.json").read_bytes()
    assert M.resolve_model("tiny") == folder


def test_same_size_change_is_caught_with_verify_only(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_dir, folder)
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # same size, other content
    (folder / "model.safetensors").write_bytes(bytes(weights))
    assert M.resolve_model(folder) == folder  # sizes match: the cheap check passes
    rc, err = predict(capsys, tmp_path, "--model", str(folder), "--verify")
    assert rc == 2 and "model.safetensors: content changed since the build" in err
    assert main(["tiny-model", "--out", str(folder), "--verify"]) == 0  # the build command repairs its own folder
    assert "is damaged (model.safetensors: content changed" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()


def test_folder_built_before_manifests_is_checked_and_recorded_once(tiny_dir, cache, capsys):
    folder = cache / f"tiny-qwen2-v{MC.TINY_VERSION}-seed0"
    shutil.copytree(tiny_dir, folder)
    (folder / MF.MANIFEST).unlink()  # as `make setup` left it before this change
    before = snapshot(folder)
    assert main(["tiny-model"]) == 0
    assert "was built before model folders carried qwen_cls_manifest.json; recorded it now" in capsys.readouterr().err
    after = snapshot(folder)
    assert after.pop(MF.MANIFEST) == (tiny_dir / MF.MANIFEST).read_bytes()  # the same manifest a build writes
    assert after == before  # nothing rebuilt
    assert main(["tiny-model"]) == 0 and "recorded" not in capsys.readouterr().err


def test_pre_manifest_folder_with_truncated_weights_is_rebuilt_not_recorded(tiny_dir, cache, capsys):
    folder = cache / f"tiny-qwen2-v{MC.TINY_VERSION}-seed0"
    shutil.copytree(tiny_dir, folder)
    (folder / MF.MANIFEST).unlink()
    replace_truncated(folder / "model.safetensors", 10_000)
    with pytest.raises(MF.DamagedModel, match=r"model\.safetensors: 10000 bytes, expected \d+ from its header"):
        M.resolve_model("tiny")
    assert main(["tiny-model"]) == 0
    assert "is damaged (model.safetensors: 10000 bytes" in capsys.readouterr().err
    assert snapshot(folder) == snapshot(tiny_dir)


@pytest.mark.parametrize("command", ["gemma-model", "tiny-model"])
def test_a_folder_that_is_not_the_build_is_neither_used_nor_replaced(command, tiny_dir, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr(G, "chunk_files", lambda: pytest.fail("started a build"))
    export = tmp_path / "export"  # a merged Qwen export: config, weights, tokenizer, its own card
    export.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / name, export / name)
    (export / "README.md").write_text("# my classifier\n", encoding="utf-8")
    folders = [export]
    if command == "gemma-model":
        folders.append(tiny_dir)  # a tiny build (manifest of another model)
    for folder in folders:
        before = snapshot(folder)
        capsys.readouterr()
        assert main([command, "--out", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"{folder}: holds files but is not a " in err and "nothing was changed" in err
        assert snapshot(folder) == before


def test_damaged_gemma_cache_is_reported_by_predict_and_run_and_rebuilt_by_gemma_model(real_gemma, cache, tmp_path,
                                                                                       capsys, monkeypatch):
    folder = linked_copy(real_gemma, cache / real_gemma.name)
    if (folder / MF.MANIFEST).exists():
        (folder / MF.MANIFEST).unlink()  # as a pre-manifest `make setup` left it
    replace_truncated(folder / "model.safetensors", 1 << 20)
    rc, err = predict(capsys, tmp_path, "--model", "gemma3-270m")
    assert rc == 2 and "Traceback" not in err and "SafetensorError" not in err
    assert f"{folder}: damaged model folder (model.safetensors: 1048576 bytes, expected 1072419256" in err
    assert "rebuild it with `qwen-cls gemma-model`" in err

    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["run", "--profile", "tiny", "-p", "base_model", "gemma3-270m", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: 1048576 bytes" in err and "qwen-cls gemma-model" in err
    assert not run.exists()  # refused before the chain

    # `gemma-model` rebuilds it; the dequantization is replaced by the tiny model to keep this test short
    def fake_gguf(path):
        assert path.stat().st_size == 253_113_024  # the joined, checked GGUF
        return M.load_model(T.build_tiny_model(tmp_path / "tiny"), device="cpu")

    monkeypatch.setattr(G, "load_gemma_gguf", fake_gguf)
    capsys.readouterr()
    assert main(["gemma-model"]) == 0
    err = capsys.readouterr().err
    assert f"note: {folder} is damaged (model.safetensors: 1048576 bytes" in err
    manifest = json.loads((folder / MF.MANIFEST).read_text(encoding="utf-8"))
    assert manifest["model"] == "gemma3-270m" and G.build_gemma_model() == folder
    assert (folder / "README.md").read_text(encoding="utf-8").startswith(G.GEMMA_CARD)


def test_gemma_cache_without_config_is_reported(real_gemma, cache, tmp_path, capsys):
    folder = linked_copy(real_gemma, cache / real_gemma.name)
    (folder / "config.json").unlink()
    rc, err = predict(capsys, tmp_path, "--model", "gemma3-270m")
    assert rc == 2 and "config.json: missing" in err and "qwen-cls gemma-model" in err
    assert "model_type" not in err
    # nothing recorded: a folder built before manifests (no manifest) gets none while it is damaged; a built one
    # (make setup on a fresh machine writes the manifest) keeps its own
    assert (folder / MF.MANIFEST).exists() == (real_gemma / MF.MANIFEST).exists()


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from qwen_cls.model_builds import gemma as G, tiny as T

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[1] == "tiny":
        import transformers
        transformers.Qwen2ForCausalLM.save_pretrained = die  # inside the build's temp folder
        T.build_tiny_model(sys.argv[2])
    else:
        G.load_gemma_gguf = die  # after the chunks are joined into the scratch folder
        G.build_gemma_model(sys.argv[2])
""")


def kill_a_build(kind: str, out: Path) -> list[Path]:
    """Run a build in a child process that ``kill -9``s itself midway; return the temp folders it left (beside its
    lock file ``.NAME.lock``, which the next build takes over and removes)."""
    script = KILLED_BUILD.format(root=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", script, kind, str(out)], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    left = sorted(p for p in out.parent.glob(f".{out.name}.*") if p.is_dir())
    assert left and not out.exists()
    assert L.lock_holder(out) is None  # its lock file may stay behind, but the kernel released the lock
    return left


@pytest.mark.subprocess
def test_temp_folders_of_a_killed_build_are_removed_by_the_next_one(tiny_dir, tmp_path, capsys):
    out = tmp_path / "models" / "tiny"
    left = kill_a_build("tiny", out)
    mine = out.parent / f".{out.name}.mine"  # the user's, unmarked: never removed
    (mine / "notes").mkdir(parents=True)
    live = out.parent / f".{out.name}.live"  # a build still running (this process): never removed
    live.mkdir()
    BF.mark_owner(live)
    assert main(["tiny-model", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for path in left:
        assert not path.exists() and f"note: removed {path}, left by a build that was killed" in err
    assert (mine / "notes").is_dir() and (live / BF.OWNER_FILE).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, mine.name, live.name])
    assert snapshot(out) == snapshot(tiny_dir)


@pytest.mark.subprocess
def test_gemma_scratch_of_a_killed_build_is_removed_by_the_next_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "models" / "gemma"
    left = kill_a_build("gemma", out)
    assert [p.name.startswith(f".{out.name}.gguf.") for p in left] == [True]
    assert (left[0] / G.GGUF_NAME).stat().st_size == 253_113_024  # what a kill -9 used to leave for good
    monkeypatch.setattr(G, "load_gemma_gguf",
                        lambda path: M.load_model(T.build_tiny_model(tmp_path / "t"), device="cpu"))
    assert main(["gemma-model", "--out", str(out)]) == 0
    assert f"note: removed {left[0]}, left by a build that was killed" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["gemma"]
    assert (out / MF.MANIFEST).is_file()


# --------------------------------------------------------------------------- the core finds, the tools build


@pytest.mark.parametrize("name, command, ahead", [("tiny", "qwen-cls tiny-model", None),
                                                  ("gemma3-270m", "qwen-cls gemma-model", "make setup"),
                                                  ("qwen2.5-coder-0.5b", "qwen-cls qwen-model", "make setup QWEN=1")])
def test_the_core_names_the_command_for_a_model_not_built_and_builds_nothing(name, command, ahead, cache,
                                                                          monkeypatch):
    from qwen_cls.model_builds import qwen_coder as Q

    for module, maker in ((T, "make_tiny"), (G, "make_gemma"), (Q, "make_qwen")):
        monkeypatch.setattr(module, maker, lambda *a, **k: pytest.fail("the core started a build"))
    folder = cache / MC.OFFLINE_BUILDS[name].folder
    folder.mkdir()  # an empty folder is not built either
    for state in ("empty", "absent"):
        with pytest.raises(MC.ModelNotBuilt) as missing:
            M.resolve_model(name)
        assert missing.value.model == name and isinstance(missing.value, M.ModelNotFound), state
        assert f"{folder}: the {name} model is not built yet; build it with `{command}`" in str(missing.value)
        assert (f"`{ahead}` ahead" in str(missing.value)) == (ahead is not None)
        folder.rmdir() if state == "empty" else None
    assert list(cache.iterdir()) == []  # nothing built, no lock, no temp folder


def test_the_chain_builds_a_missing_tiny_model_before_its_notebooks_and_they_find_it(tiny_dir, cache, tmp_path):
    """The preflight checks and builds nothing; ``run_chain`` builds the missing model once the run folder is its
    own, before 00, the same build as ``qwen-cls tiny-model``; a refused ``--out`` costs no build."""
    from qwen_cls.chain.preflight import preflight
    from qwen_cls.chain.run import run_chain
    from qwen_cls.chain.run_folder import RunFolderError
    from qwen_cls.chain.templating import resolve_parameters

    with pytest.raises(MC.ModelNotBuilt):
        M.resolve_model("tiny")
    preflight(resolve_parameters("tiny", out=tmp_path / "run"))
    assert list(cache.iterdir()) == [] and not (tmp_path / "run").exists()  # nothing built, no run folder
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    with pytest.raises(RunFolderError):
        run_chain("tiny", foreign, notebooks=("00_check_environment.ipynb",), progress=False, log_output=False)
    assert list(cache.iterdir()) == [] and [p.name for p in foreign.iterdir()] == ["notes.txt"]
    run = run_chain("tiny", tmp_path / "run", notebooks=("00_check_environment.ipynb",), progress=False,
                    log_output=False)
    folder = cache / f"tiny-qwen2-v{MC.TINY_VERSION}-seed0"
    assert M.resolve_model("tiny") == folder and M.resolve_model("tiny", verify=True) == folder
    assert snapshot(folder) == snapshot(tiny_dir)  # the same build as `qwen-cls tiny-model`, byte for byte
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]  # no lock file or temp folder left
    executed = (run / "notebooks" / "00_check_environment.ipynb").read_text(encoding="utf-8")
    assert "$ qwen-cls tiny-model" in executed and str(folder) in executed  # 00 shows the command and finds it


def test_a_command_that_meets_a_model_not_built_builds_it_and_runs_again_once(cache, monkeypatch):
    from qwen_cls.commands import cli
    from qwen_cls.model_builds import offline

    built, calls = [], []
    monkeypatch.setattr(offline, "ensure_built", built.append)

    def command(args):
        calls.append(args)
        if len(calls) < 3:
            raise MC.ModelNotBuilt("not built", "gemma3-270m")
        return 0

    args = argparse.Namespace(func=command, command="predict")
    with pytest.raises(MC.ModelNotBuilt):  # built once, then met again: not a loop
        cli.run_command(args)
    assert built == ["gemma3-270m"] and calls == [args, args]
    calls.clear()
    calls.append(None)  # this time the second call finds the model
    assert cli.run_command(args) == 0 and built == ["gemma3-270m"] * 2 and len(calls) == 3
    calls.clear()
    other = argparse.Namespace(func=command, command="labels")  # not one that loads after checking everything
    with pytest.raises(MC.ModelNotBuilt):
        cli.run_command(other)
    assert calls == [other] and built == ["gemma3-270m"] * 2  # named, not built, not run again


def test_the_command_line_starts_without_torch():
    """``qwen-cls --version``, ``labels``, ``convert`` pay for no torch import: the builders load it lazily."""
    import subprocess
    import sys

    code = "import sys, qwen_cls.commands.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_offline_names_and_their_builds_are_one_list_and_a_file_in_the_way_is_named(cache):
    """``model_cache.OFFLINE_BUILDS`` is the one list of offline models (00 checks and builds through it). A file
    where a cache folder belongs is named (the option and the path), not an OS error from listing it."""
    assert list(MC.OFFLINE_BUILDS) == ["tiny", "gemma3-270m", "qwen2.5-coder-0.5b"]
    blocker = MC.GEMMA_BUILD.default_dir()
    blocker.write_text("not a folder\n")
    with pytest.raises(NotADirectoryError, match=f"the model cache folder {blocker}: not a folder"):
        M.resolve_model("gemma3-270m")
    assert blocker.read_text() == "not a folder\n"  # left as it was
