"""``qwen-cls export --seq-cls``: notebook 06's sequence classifier (``RUN/seq_cls``) merged into a
``*ForSequenceClassification`` folder that ``transformers.pipeline("text-classification")`` loads and that gives
06's ``seq_cls_lora`` predictions (each row's best candidate by the head's logits) on the test rows."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_run import SAMPLE_TEST, SAMPLE_TRAIN, train_rows_file
from safetensors import safe_open

from qwen_cls import data
from qwen_cls.commands.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run with a ``seq_cls/`` made as notebook 06 makes it: LoRA + the ``score`` head (modules_to_save),
    a few steps on the sample's training rows, saved with :func:`save_seq_cls`."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from qwen_cls.approaches import SEQ_CLS_HEAD, encode_texts, load_seq_cls_base, save_seq_cls
    from qwen_cls.resumable.training_run import train_run

    folder = tmp_path_factory.mktemp("runs")
    out = folder / "run"
    train_run(train_rows_file(folder), out, model="tiny", max_length=128, max_steps=1, batch_size=2,
              grad_accum=1, learning_rate=1e-2, save_steps=100, limit=4, seed=1)
    rows = [r.to_dict() for r in data.read_raw_rows(SAMPLE_TRAIN)]
    labels = sorted({r["output"] for r in rows})
    set_seed(0)
    model, tok = load_seq_cls_base("tiny", labels, device="cpu")
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["q_proj", "v_proj"], r=4,
                                             lora_alpha=8, modules_to_save=[SEQ_CLS_HEAD]))
    args = TrainingArguments(output_dir=str(folder / "ckpt"), per_device_train_batch_size=4, learning_rate=2e-2,
                             max_steps=6, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
    Trainer(model=model, args=args, train_dataset=encode_texts(tok, rows, labels, MAX_LENGTH),
            data_collator=DataCollatorWithPadding(tok)).train()
    save_seq_cls(model, tok, out / "seq_cls", base_model="tiny", labels=labels, max_length=MAX_LENGTH)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE_TEST.is_file(), reason="needs data/sample")
def test_pipeline_on_the_export_gives_06s_seq_cls_predictions(run_dir, tmp_path):
    from transformers import pipeline

    from qwen_cls.approaches import load_seq_cls, restricted, seq_cls_scores

    out = tmp_path / "seq-export"
    assert main(["export", "--run", str(run_dir), "--seq-cls", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    labels = json.loads((run_dir / "seq_cls" / "seq_cls.json").read_text(encoding="utf-8"))["labels"]
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
    assert config["label2id"] == {label: i for i, label in enumerate(labels)}
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert "score.weight" in names and not [n for n in names if "lora" in n or "modules_to_save" in n]  # merged

    # 06's way: base + adapter + saved head, logits restricted to each row's candidates.
    test_rows = [r.to_dict() for r in data.read_raw_rows(SAMPLE_TEST)]
    model, tok, _, max_length = load_seq_cls(run_dir / "seq_cls", device="cpu")
    expected = seq_cls_scores(model, tok, test_rows, labels, max_length=max_length, batch_size=8)
    batch = tok([r["text"] for r in test_rows], truncation=True, max_length=max_length, padding=True,
                return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits.float()

    classify = pipeline("text-classification", model=str(out), device="cpu")
    answers = classify([r["text"] for r in test_rows], top_k=None, truncation=True, function_to_apply="none")
    got = []
    for row, answer, row_logits in zip(test_rows, answers, logits):
        by_label = {a["label"]: a["score"] for a in answer}
        assert set(by_label) == set(labels)
        for i, label in enumerate(labels):
            assert by_label[label] == pytest.approx(row_logits[i].item(), abs=1e-4)
        got.append(restricted(by_label, row["category"]).prediction)
    assert got == [s.prediction for s in expected]
    assert len(set(got)) > 1  # the rows do not all get one label: the head's outputs differ per row


def test_seq_cls_export_needs_06s_folder_and_keeps_out_rules(run_dir, tmp_path, capsys):
    bare = tmp_path / "bare-run"
    bare.mkdir()
    for name in ("adapter", "run_config.json"):  # a run without 06's seq_cls/
        src = run_dir / name
        (bare / name).symlink_to(src, target_is_directory=src.is_dir())
    assert main(["export", "--run", str(bare), "--seq-cls", "--out", str(tmp_path / "x")]) == 2
    assert "seq_cls.json" in capsys.readouterr().err and not (tmp_path / "x").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", "--run", str(run_dir), "--seq-cls", "--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"


def tree_digest(folder):
    """One SHA-256 over every entry under ``folder`` (relative path, mode, bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        content = path.read_bytes() if path.is_file() else b"<dir>"
        digest.update(f"{path.relative_to(folder)}\0{path.lstat().st_mode}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def seq_cls_export(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seq-export") / "classifier"
    assert main(["export", "--run", str(run_dir), "--seq-cls", "--out", str(out)]) == 0
    return out


def test_one_kind_of_export_never_replaces_the_other(run_dir, seq_cls_export, tmp_path, capsys):
    plain = tmp_path / "plain"
    assert main(["export", "--run", str(run_dir), "--out", str(plain)]) == 0
    for out, flags, holds in ((plain, ["--seq-cls"], "a plain (causal-LM) export"),
                              (seq_cls_export, [], "a sequence-classification export (--seq-cls)")):
        before = tree_digest(out.parent)
        capsys.readouterr()
        assert main(["export", "--run", str(run_dir), *flags, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}: holds {holds} of {run_dir}, which ") and "Traceback" not in err
        assert "nothing was changed: choose another --out" in err
        assert tree_digest(out.parent) == before
    assert main(["export", "--run", str(run_dir), "--seq-cls", "--out", str(seq_cls_export)]) == 0  # same kind: redone


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_predict_and_serve_refuse_a_sequence_classifier_by_name(seq_cls_export, tmp_path, capsys, monkeypatch,
                                                                command):
    import qwen_cls.model

    monkeypatch.setattr(qwen_cls.model, "load_model", lambda *a, **k: pytest.fail("loaded as a causal LM"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "球队赢得冠军。", "category": ["Sports", "Art"]}, ensure_ascii=False) + "\n")
    argv = (["predict", "--model", str(seq_cls_export), "--input", str(rows), "--output", str(tmp_path / "p.jsonl")]
            if command == "predict" else ["serve", "--model", str(seq_cls_export), "--port", "0"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {seq_cls_export}: a sequence-classification model "
                          "(Qwen2ForSequenceClassification, id2label: ")
    assert "not a causal language model" in err and "--run RUN" in err and "text-classification" in err
    assert "Traceback" not in err and not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_seq_cls_export_files_get_the_umasks_mode(run_dir, tmp_path, mask):
    import os

    out = tmp_path / "classifier"
    old = os.umask(mask)
    try:
        assert main(["export", "--run", str(run_dir), "--seq-cls", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes
