"""predict (run dir and exported model), export (merged weights), and the faults both report clearly."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _tiny_run import SAMPLE_TEST, three_step_run
from safetensors import safe_open
from test_weights_modes import umask

from qwen_cls.commands.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir made by the library: 3 LoRA steps of the tiny model, plus a hand-written metrics.json."""
    out = three_step_run(tmp_path_factory.mktemp("runs"))
    (out / "metrics.json").write_text(json.dumps({"accuracy": 0.25, "macro_f1": 0.125, "n_test": 4,
                                                  "tiny_model": True}))
    return out


@pytest.fixture()
def raw_file(tmp_path):
    """Four raw rows: one without output, one with an extra id field and a comma-separated category."""
    rows = [json.loads(line) for line in SAMPLE_TEST.read_text(encoding="utf-8").splitlines()[:2]] \
        if SAMPLE_TEST.is_file() else [{"text": "火箭发射成功。", "category": ["Space", "Art"], "output": "Space"},
                                       {"text": "球队赢得冠军。", "category": ["Sports", "Art"], "output": "Sports"}]
    rows.append({"text": "央行宣布降息，股市上涨。", "category": ["Economy", "Sports", "Art"]})
    rows.append({"id": "x7", "text": "新型战机首飞。", "category": "Military, Space", "output": "Military"})
    path = tmp_path / "raw.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    return path, rows


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_predict_run_and_export_agree(run_dir, raw_file, tmp_path, capsys):
    from _reference import score_candidates_reference

    from qwen_cls.model import load_model

    raw, rows = raw_file
    by_run, by_export, export = tmp_path / "run.jsonl", tmp_path / "export.jsonl", tmp_path / "merged"
    assert main(["predict", "--run", str(run_dir), "--input", str(raw), "--output", str(by_run), "--quiet"]) == 0
    assert main(["export", "--run", str(run_dir), "--out", str(export)]) == 0
    assert main(["predict", "--model", str(export), "--input", str(raw), "--output", str(by_export), "--quiet"]) == 0
    assert "tiny random model" in capsys.readouterr().out  # 3 of the 4 rows are labelled: accuracy is printed

    got_run, got_export = _read(by_run), _read(by_export)
    assert len(got_run) == len(got_export) == 4
    categories = [["Economy", "Sports", "Art"], ["Military", "Space"]]
    assert [r["category"] for r in got_run[2:]] == categories  # the string category came back as a list
    assert got_run[3]["id"] == "x7" and "output" not in got_run[2]  # extra fields kept, no invented output
    for a, b, row in zip(got_run, got_export, rows):
        assert a["text"] == row["text"]
        assert set(a["scores"]) == set(a["category"]) and a["prediction"] in a["category"]
        assert a["prediction"] == max(a["scores"], key=a["scores"].get)
        assert a["prediction"] == b["prediction"]
        for label in a["scores"]:
            assert b["scores"][label] == pytest.approx(a["scores"][label], abs=1e-3)

    # The batched, cache-sharing scorer behind predict agrees with one-pass-per-candidate reference scoring
    # of base + adapter, loaded here independently of predict.
    base, tok = load_model("tiny", device="cpu", adapter=str(run_dir / "adapter"))
    reference = score_candidates_reference(base, tok, got_run, max_length=128)
    for ref, row in zip(reference, got_run):
        assert ref.prediction == row["prediction"]
        for label, value in ref.scores.items():
            assert row["scores"][label] == pytest.approx(value, abs=1e-3)


@pytest.mark.slow
def test_predict_min_confidence_marks_abstain_on_every_row(run_dir, raw_file, tmp_path, capsys):
    import math

    raw, rows = raw_file
    strict, lenient, plain = tmp_path / "strict.jsonl", tmp_path / "lenient.jsonl", tmp_path / "plain.jsonl"
    base = ["predict", "--run", str(run_dir), "--input", str(raw), "--quiet"]
    assert main([*base, "--output", str(strict), "--min-confidence", "0.99"]) == 0
    assert main([*base, "--output", str(lenient), "--min-confidence", "0"]) == 0
    assert main([*base, "--output", str(plain)]) == 0
    got, loose, without = _read(strict), _read(lenient), _read(plain)
    assert len(got) == len(rows) == 4
    for row, g, at_zero, w in zip(rows, got, loose, without):
        assert g["text"] == row["text"] and set(g["scores"]) == set(g["category"])  # existing fields kept
        total = sum(math.exp(v) for v in g["scores"].values())
        for label, value in g["scores"].items():  # the softmax of the scores, computed here
            assert g["probabilities"][label] == pytest.approx(math.exp(value) / total, rel=1e-6)
        assert g["prediction"] == max(g["probabilities"], key=g["probabilities"].get)  # still the top label
        assert g["confidence"] == max(g["probabilities"].values())
        assert g["abstain"] is (g["confidence"] < 0.99)
        assert at_zero["abstain"] is False and at_zero["prediction"] == g["prediction"]  # every row answered at 0
        assert "abstain" not in w and "confidence" not in w and w["probabilities"] == g["probabilities"]
    assert all(isinstance(g["abstain"], bool) for g in got)  # on every row, abstaining or not
    assert f"({sum(g['abstain'] for g in got)} marked abstain: confidence below 0.99)" in capsys.readouterr().out


def test_export_folder_is_a_plain_merged_model(run_dir, tmp_path):
    from safetensors.torch import load_file

    export = tmp_path / "merged"
    assert main(["export", "--run", str(run_dir), "--out", str(export)]) == 0
    names = sorted(p.name for p in export.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "run_config.json"} <= set(names)
    with safe_open(export / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)
    # merged weight = base + (alpha / r) * B @ A, computed here from the adapter file
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    a_key = next(k for k in adapter if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    lora_a, lora_b = adapter[a_key], adapter[a_key.replace("lora_A", "lora_B")]
    from qwen_cls.model_builds.tiny import build_tiny_model

    base = load_file(build_tiny_model() / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    merged = load_file(export / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert lora_b.abs().sum() > 0
    assert torch.allclose(merged, base + (32 / 8) * lora_b @ lora_a, atol=1e-6)
    card = (export / "README.md").read_text()
    assert "| accuracy | 0.2500 |" in card and "| macro_f1 | 0.1250 |" in card and "learned nothing" in card
    assert json.loads((export / "run_config.json").read_text())["max_length"] == 128


def _fails(argv, capsys, status=2):
    assert main(argv) == status
    return capsys.readouterr().err


def test_missing_and_incomplete_model_folders(raw_file, tmp_path, capsys):
    raw, _ = raw_file
    out = tmp_path / "out.jsonl"
    err = _fails(["predict", "--model", str(tmp_path / "nope"), "--input", str(raw), "--output", str(out)], capsys)
    assert "no such model folder" in err
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    err = _fails(["predict", "--model", str(half), "--input", str(raw), "--output", str(out)], capsys)
    assert "incomplete model folder" in err and "safetensors" in err
    err = _fails(["predict", "--run", str(tmp_path), "--input", str(raw), "--output", str(out)], capsys)
    assert "not a run dir" in err
    assert not out.exists()


def test_bad_input_row_reports_path_and_line(run_dir, tmp_path, capsys):
    raw = tmp_path / "bad.jsonl"
    raw.write_text('{"text": "ok", "category": ["A", "B"]}\n{"text": "x", "category": ["A"]}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    err = _fails(["predict", "--run", str(run_dir), "--input", str(raw), "--output", str(out)], capsys)
    assert err.startswith(f"{raw}:2: category needs at least 2")
    assert not out.exists()


@pytest.mark.parametrize("change", [{"hidden_size": 32, "intermediate_size": 88}, {"num_hidden_layers": 3}],
                         ids=["narrower", "deeper"])
def test_adapter_from_a_different_base(change, run_dir, raw_file, tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_cls.model_builds.tiny import TINY_CONFIG, build_tiny_model

    other = tmp_path / "other-base"  # the tiny architecture with one dimension changed
    Qwen2ForCausalLM(Qwen2Config(**{**TINY_CONFIG, **change})).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(build_tiny_model() / name, other / name)
    wrong = tmp_path / "wrong-run"
    shutil.copytree(run_dir, wrong)
    config = json.loads((wrong / "run_config.json").read_text())
    (wrong / "run_config.json").write_text(json.dumps({**config, "base_model": str(other)}))
    err = _fails(["predict", "--run", str(wrong), "--input", str(raw_file[0]), "--output", str(tmp_path / "o")],
                 capsys)
    assert "different base" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_hub_id_without_network(run_dir, raw_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN_CLS_OFFLINE", "1")
    hub = tmp_path / "hub-run"
    shutil.copytree(run_dir, hub)
    config = json.loads((hub / "run_config.json").read_text())
    (hub / "run_config.json").write_text(json.dumps({**config, "base_model": "qwen/Qwen2-0.5B"}))
    err = _fails(["predict", "--run", str(hub), "--input", str(raw_file[0]), "--output", str(tmp_path / "o")],
                 capsys)
    assert "cannot reach www.modelscope.cn" in err and "local folder" in err


def test_disk_full_leaves_no_half_written_output(run_dir, raw_file, tmp_path, capsys, monkeypatch):
    from contextlib import contextmanager

    import qwen_cls.files

    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    target = out_dir / "p.jsonl"
    real_atomic_file, writes, temps_seen = qwen_cls.files.atomic_file, [], []

    class FillsAfterOneRow:
        """The output handle on a disk that fills up: the first row is written, the second write fails."""

        def __init__(self, handle):
            self.handle = handle

        def write(self, text):
            writes.append(text)
            if len(writes) > 1:
                temps_seen.extend(p.name for p in out_dir.iterdir())
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(text)

    @contextmanager
    def atomic_on_full_disk(path):
        with real_atomic_file(path) as handle:
            yield FillsAfterOneRow(handle) if Path(path) == target else handle

    monkeypatch.setattr(qwen_cls.files, "atomic_file", atomic_on_full_disk)
    err = _fails(["predict", "--run", str(run_dir), "--input", str(raw_file[0]), "--output", str(target),
                  "--quiet"], capsys, status=1)
    monkeypatch.undo()
    assert "disk full" in err and "Traceback" not in err
    assert len(writes) == 2 and json.loads(writes[0])["text"] == raw_file[1][0]["text"]  # failed on row 2
    assert len(temps_seen) == 1 and temps_seen[0].startswith(".p.jsonl.") and temps_seen[0].endswith(".tmp")
    assert list(out_dir.iterdir()) == []  # neither the output nor the half-written temp file is left

    from transformers import PreTrainedModel

    def save_then_fill_disk(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fill_disk)
    err = _fails(["export", "--run", str(run_dir), "--out", str(out_dir / "merged")], capsys, status=1)
    assert "disk full while writing" in err
    assert list(out_dir.iterdir()) == []


def test_out_of_memory_hint(run_dir, raw_file, tmp_path, capsys, monkeypatch):
    import qwen_cls.evaluate

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(qwen_cls.evaluate, "score_candidates", oom)
    err = _fails(["predict", "--run", str(run_dir), "--input", str(raw_file[0]), "--output",
                  str(tmp_path / "o.jsonl")], capsys, status=1)
    assert "out of memory" in err and "--batch-size" in err and "gradient checkpointing" in err
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------ export never deletes what it did not make


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> bytes), folders included as None."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("where", ["the run itself", "inside the run", "another run", "a thesis folder",
                                   "a folder holding the run", "a file"])
def test_export_refuses_folders_it_did_not_make_and_leaves_them_byte_identical(run_dir, tmp_path, capsys, where):
    if where == "the run itself":
        out, guarded = run_dir, run_dir
    elif where == "inside the run":
        out, guarded = run_dir / "adapter", run_dir
    elif where == "another run":
        guarded = out = tmp_path / "other-run"
        shutil.copytree(run_dir, out)
    elif where == "a thesis folder":
        guarded = out = tmp_path / "work"
        (out / "data").mkdir(parents=True)
        (out / "run_config.json").write_text("{}")
        (out / "thesis.tex").write_text("\\chapter{Results}")
        (out / "data" / "rows.jsonl").write_text('{"a": 1}\n')
    elif where == "a folder holding the run":
        out, guarded = run_dir.parent, run_dir.parent
    else:
        guarded = out = tmp_path / "notes.txt"
        out.write_text("keep me")
    before = snapshot(guarded) if guarded.is_dir() else guarded.read_bytes()
    err = _fails(["export", "--run", str(run_dir), "--out", str(out)], capsys, status=2)
    assert "--out" in err and "Traceback" not in err
    after = snapshot(guarded) if guarded.is_dir() else guarded.read_bytes()
    assert after == before


def tree_digest(folder: Path) -> str:
    """One SHA-256 over every entry under ``folder`` (relative path, kind, mode, bytes or link target)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = (os.readlink(path).encode() if path.is_symlink() else path.read_bytes() if path.is_file()
                   else b"<dir>")
        digest.update(f"{path.relative_to(folder)}\0{info.st_mode}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()


def test_export_marker_lists_every_file_it_wrote_with_its_sha256(run_dir, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    marker = json.loads((out / "qwen_cls_export.json").read_text())
    assert marker["exported_from"] == str(run_dir.resolve())
    written = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    del written["qwen_cls_export.json"]
    assert {"model.safetensors", "config.json", "run_config.json", "README.md"} <= set(written)
    assert marker["files"] == {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                               for name, data in written.items()}


def test_export_redoes_an_untouched_export_of_the_same_run_but_not_another_runs(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    first_inode = out.stat().st_ino
    first = {p.name for p in out.iterdir()}
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0  # the same run, untouched: replaced
    assert out.stat().st_ino != first_inode  # a new folder renamed into place, not the old one kept
    assert {p.name for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp or old folder left beside it
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    before = tree_digest(out)
    err = _fails(["export", "--run", str(other), "--out", str(out)], capsys, status=2)
    assert "not an earlier export of" in err and tree_digest(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--run", str(run_dir), "--out", str(empty)]) == 0
    assert (empty / "model.safetensors").is_file()


@pytest.mark.parametrize("marker", ["written by hand", "copied from a real export"])
def test_a_forged_marker_does_not_make_a_users_folder_an_export(run_dir, tmp_path, capsys, marker):
    out = tmp_path / "work"
    (out / "data").mkdir(parents=True)
    (out / "thesis.tex").write_text("\\chapter{Results}")
    (out / "data" / "rows.jsonl").write_text('{"a": 1}\n')
    if marker == "written by hand":
        (out / "qwen_cls_export.json").write_text(json.dumps({"exported_from": str(run_dir.resolve())}))
    else:
        real = tmp_path / "real"
        assert main(["export", "--run", str(run_dir), "--out", str(real)]) == 0
        shutil.copy(real / "qwen_cls_export.json", out / "qwen_cls_export.json")
        shutil.rmtree(real)
    before = tree_digest(tmp_path)  # the folder and what lies beside it (no temp folder may stay)
    err = _fails(["export", "--run", str(run_dir), "--out", str(out)], capsys, status=2)
    assert tree_digest(tmp_path) == before
    assert "nothing was changed" in err and "Traceback" not in err
    if marker == "written by hand":
        assert "qwen_cls_export.json lists no files" in err
    else:
        assert f"holds {out / 'data'}, which `qwen-cls export` did not write" in err


@pytest.mark.parametrize("change", ["MY_NOTES.md", "notes/todo.txt", "an empty folder", "edited README.md",
                                    "a link"])
def test_a_file_the_user_added_to_an_export_stops_the_next_export(run_dir, tmp_path, capsys, change):
    out = tmp_path / "merged"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    if change == "MY_NOTES.md":
        offending = out / "MY_NOTES.md"
        offending.write_text("my notes on this model")
    elif change == "notes/todo.txt":
        offending = out / "notes"
        (out / "notes").mkdir()
        (out / "notes" / "todo.txt").write_text("compare with run 2")
    elif change == "an empty folder":
        offending = out / "scratch"
        offending.mkdir()
    elif change == "edited README.md":
        offending = out / "README.md"
        offending.write_text(offending.read_text() + "\nMy evaluation: good enough.\n")
    else:
        offending = out / "tokenizer.json"  # the user's own link where the export wrote a file
        offending.unlink()
        offending.symlink_to(run_dir / "adapter" / "tokenizer.json")
    before = tree_digest(tmp_path)
    err = _fails(["export", "--run", str(run_dir), "--out", str(out)], capsys, status=2)
    assert tree_digest(tmp_path) == before
    assert f"--out {out} holds {offending}, which " in err
    assert "nothing was changed: move it out of" in err and "Traceback" not in err
    if change == "edited README.md":
        assert "was changed after `qwen-cls export` wrote it" in err


@contextlib.contextmanager
def held_lock(path: Path, text: str):
    """An exclusive ``flock`` on ``path`` holding ``text``, as a running command holds its folder's lock."""
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.mark.parametrize("state", ["marked RUN_INCOMPLETE", "no metrics.json", "lock held"])
def test_export_and_predict_refuse_an_unfinished_run(run_dir, raw_file, tmp_path, capsys, state):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    lock = contextlib.nullcontext()
    if state == "marked RUN_INCOMPLETE":
        (run / "RUN_INCOMPLETE").write_text("unfinished")
        expected = f"error: --run {run}: marked incomplete (RUN_INCOMPLETE)"
    elif state == "no metrics.json":  # a `qwen-cls run` folder that never got to notebook 04
        (run / "metrics.json").unlink()
        (run / "params.json").write_text('{"profile": "tiny", "out_dir": "x"}')
        (run / "notebooks").mkdir()
        expected = f"error: --run {run}: has no metrics.json"
    else:
        lock = held_lock(tmp_path / ".run.lock", "pid 4242, since 09:00\nqwen-cls train\n")  # a running train's
        expected = f"error: --run {run}: is being written now by `qwen-cls train` (pid 4242, since 09:00); "
    out = tmp_path / "merged"
    with lock:
        before = tree_digest(tmp_path)
        err = _fails(["export", "--run", str(run), "--out", str(out)], capsys, status=2)
        assert err.startswith(expected) and tree_digest(tmp_path) == before
        err = _fails(["predict", "--run", str(run), "--input", str(raw_file[0]), "--output",
                      str(tmp_path / "p.jsonl")], capsys, status=2)
        assert err.startswith(expected) and tree_digest(tmp_path) == before
    assert not out.exists()


def test_a_lone_params_json_above_does_not_make_a_run(run_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "params.json").write_text('{"my": "settings"}')  # a user's file that happens to share the name
    assert main(["export", "--run", str(run_dir), "--out", str(home / "exports" / "merged")]) == 0
    assert (home / "exports" / "merged" / "model.safetensors").is_file()


# ------------------------------------------------------------------ issue 33: damaged inputs, bad --out, modes


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if a model starts loading (the checks must come first)."""
    import qwen_cls.model

    def never(*args, **kwargs):
        pytest.fail("a model started loading before the check")

    monkeypatch.setattr(qwen_cls.model, "load_model", never)
    monkeypatch.setattr(qwen_cls.model, "resolve_model", never)


@pytest.mark.parametrize("damage", ["truncated weights", "config not JSON", "config lacks keys"])
@pytest.mark.parametrize("command", ["predict", "serve", "export"])
def test_a_damaged_adapter_is_named_before_any_model_loads(run_dir, raw_file, tmp_path, capsys, no_model_loads,
                                                           damage, command):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    weights, config = run / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_config.json"
    if damage == "truncated weights":  # a copy or download cut short: the header says more bytes than there are
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        named, why = weights, "from its header (truncated or changed)"
    elif damage == "config not JSON":
        config.write_text('{"peft_type": "LORA", "r": 8,\n  oops\n')
        named, why = f"{config}:2", "invalid JSON"
    else:
        kept = {k: v for k, v in json.loads(config.read_text()).items() if k not in ("peft_type", "target_modules")}
        config.write_text(json.dumps(kept))
        named, why = config, "lacks 'peft_type', 'target_modules'"
    argv = {"predict": ["predict", "--run", str(run), "--input", str(raw_file[0]), "--output", str(tmp_path / "p")],
            "serve": ["serve", "--run", str(run), "--port", "0"],
            "export": ["export", "--run", str(run), "--out", str(tmp_path / "merged")]}[command]
    before = tree_digest(tmp_path)
    err = _fails(argv, capsys, status=2)
    assert err.startswith(f"{named}: ") and why in err and "retrain the run" in err and "Traceback" not in err
    assert tree_digest(tmp_path) == before  # nothing written: no output, no export, the run as it was


@pytest.mark.parametrize("out", ["a dangling link", "an unwritable place"])
def test_an_out_export_cannot_write_is_refused_before_the_merge(run_dir, tmp_path, capsys, no_model_loads, out):
    if out == "a dangling link":
        target = tmp_path / "elsewhere" / "merged"
        link = tmp_path / "merged"
        link.symlink_to(target, target_is_directory=True)
        before = tree_digest(tmp_path)
        err = _fails(["export", "--run", str(run_dir), "--out", str(link)], capsys, status=2)
        assert err.startswith(f"error: --out {link}: a symbolic link to {target}, which does not exist; ")
        assert tree_digest(tmp_path) == before and link.is_symlink() and not target.exists()
    else:
        sysfs = Path("/sys/qwen-cls-test-export")  # not writable, not even by root
        err = _fails(["export", "--run", str(run_dir), "--out", str(sysfs)], capsys, status=2)
        assert f"{sysfs}: cannot write there (/sys: " in err and "nothing was merged: choose another --out" in err
        assert not sysfs.exists()
    assert "Traceback" not in err


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_every_file_of_an_export_gets_the_umasks_mode(run_dir, tmp_path, mask):
    out = tmp_path / "merged"
    with umask(mask):
        assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert modes["model.safetensors"] == oct(0o666 & ~mask)  # the safetensors writer alone made it 0600
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


@pytest.mark.parametrize("forgery", ["a hand-written marker with the right hashes",
                                     "a real export's marker with the user's file added"])
def test_a_marker_export_did_not_sign_never_makes_it_delete_a_users_file(run_dir, tmp_path, capsys, forgery):
    out = tmp_path / "work"
    if forgery == "a hand-written marker with the right hashes":
        out.mkdir()
        (out / "thesis.tex").write_text("\\chapter{Results}")
        marker = {"exported_from": str(run_dir.resolve()), "kind": "causal_lm", "files": {}}
    else:
        assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
        (out / "thesis.tex").write_text("\\chapter{Results}")
        marker = json.loads((out / "qwen_cls_export.json").read_text())  # its signature covers the files before
    data = (out / "thesis.tex").read_bytes()
    marker["files"]["thesis.tex"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (out / "qwen_cls_export.json").write_text(json.dumps(marker))
    before = tree_digest(tmp_path)
    capsys.readouterr()
    err = _fails(["export", "--run", str(run_dir), "--out", str(out)], capsys, status=2)
    assert err.startswith(f"error: --out {out}: its qwen_cls_export.json is not signed by this user's "
                          "`qwen-cls export`") and "nothing was changed" in err
    assert tree_digest(tmp_path) == before and (out / "thesis.tex").read_bytes() == data
