"""``qwen-cls run``: the notebook chain on any raw file in the schema, its run folder, and its user errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from _tiny_run import CHAIN_LABELS, ctrl_c_when

from qwen_cls.chain.templating import parse_value, resolve_parameters
from qwen_cls.chapters import NOTEBOOKS
from qwen_cls.commands.cli import main

LABELS = CHAIN_LABELS


def candidates_of(row: dict) -> list[str]:
    cat = row["category"]
    return cat if isinstance(cat, list) else [c.strip() for c in cat.split(",")]


@pytest.fixture()
def run_dir(tiny_run):
    """The session's one tiny-profile chain run (conftest.tiny_run): (out, stdout, the 10 raw test rows)."""
    return tiny_run


@pytest.mark.slow
def test_run_prints_progress_and_where_outputs_are(run_dir):
    out, stdout, _ = run_dir
    assert f"Outputs are in {out}" in stdout
    for k, name in enumerate(NOTEBOOKS, 1):
        assert f"[{k}/{len(NOTEBOOKS)}] {name}" in stdout


@pytest.mark.slow
def test_run_folder_holds_executed_notebooks_without_errors(run_dir):
    out, _, _ = run_dir
    for name in NOTEBOOKS:
        nb = nbformat.read(out / "notebooks" / name, as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1, name
        for cell in nb.cells:
            assert all(o.get("output_type") != "error" for o in cell.get("outputs", [])), name
    assert "max_test_samples = 8" in "\n".join(
        c.source for c in nbformat.read(out / "notebooks" / "01_data_conversion.ipynb", as_version=4).cells)


@pytest.mark.slow
def test_run_params_and_data_files(run_dir):
    out, _, test_raw = run_dir
    params = json.loads((out / "params.json").read_text(encoding="utf-8"))
    assert params["profile"] == "tiny" and params["out_dir"] == str(out)
    assert (params["max_train_samples"], params["max_test_samples"], params["seed"]) == (16, 8, 3)
    assert Path(params["train_path"]).is_absolute()
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    test = [json.loads(x) for x in (out / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(train) == 16 and len(test) == 8
    raw_texts = {r["text"] for r in test_raw}
    assert {r["text"] for r in test} <= raw_texts and len({r["text"] for r in test}) == 8
    assert test[0]["input"] == f"文本:{test[0]['text']},分类选项列表:{test[0]['category']}"
    inventory = json.loads((out / "data" / "label_inventory.json").read_text(encoding="utf-8"))
    assert sum(v["train"] for v in inventory.values()) == 16 and sum(v["test"] for v in inventory.values()) == 8
    # most training rows first, ties by name: the same file on every run (a set's order changes with the hash seed)
    assert list(inventory) == sorted(inventory, key=lambda label: (-inventory[label]["train"], label))
    report = json.loads((out / "truncation_report.json").read_text(encoding="utf-8"))
    assert report["rows"] == 16 and report["max_length_seen"] <= 384
    run_config = json.loads((out / "run_config.json").read_text(encoding="utf-8"))
    assert run_config["lora"]["r"] == 8 and run_config["base_model"] == "tiny" and run_config["seed"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    assert any("loss" in entry for entry in log)


def _key_paths(obj, prefix=()) -> set[tuple]:
    """Every key path of nested dicts: {("lora",), ("lora", "r"), ...}."""
    paths = set()
    for key, value in obj.items():
        paths.add((*prefix, key))
        if isinstance(value, dict):
            paths |= _key_paths(value, (*prefix, key))
    return paths


@pytest.mark.slow
def test_notebook_and_cli_write_the_same_run_config_keys(run_dir, tmp_path):
    """One run record: 03 (through `qwen-cls run`) and `qwen-cls train --max-steps 2` write the same keys."""
    import hashlib

    out, _, _ = run_dir
    cli_out = tmp_path / "cli"
    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "train.jsonl"
    code = main(["train", "--train", str(sample), "--out", str(cli_out), "--max-steps", "2", "--max-length", "128",
                 "--batch-size", "2", "--grad-accum", "1", "--limit", "8"])
    assert code == 0
    notebook = json.loads((out / "run_config.json").read_text(encoding="utf-8"))
    cli = json.loads((cli_out / "run_config.json").read_text(encoding="utf-8"))
    assert _key_paths(notebook) == _key_paths(cli)
    assert {"profile", "base_model", "max_length", "dtype", "lora", "training", "validation", "seed"} == set(cli)
    assert cli["validation"] == {"file": None, "rows": None, "sha256": None}  # qwen-cls train: no validation split
    # the values say what each path really did
    assert (notebook["profile"], cli["profile"]) == ("tiny", None)
    assert notebook["dtype"] == cli["dtype"] == "float32"  # the tiny profile's precision; the CLI's CPU default
    assert cli["training"]["max_steps"] == 2 and cli["training"]["global_step"] == 2
    assert cli["training"]["train_rows"] == 8 and cli["max_length"] == 128
    assert cli["training"]["train_sha256"] == hashlib.sha256(sample.read_bytes()).hexdigest()
    params = json.loads((out / "params.json").read_text(encoding="utf-8"))
    assert notebook["training"]["learning_rate"] == params["learning_rate"]
    assert notebook["training"]["num_train_epochs"] == params["num_train_epochs"]
    assert notebook["training"]["train_rows"] == 16 and notebook["training"]["global_step"] > 0
    nb_train = out / "data" / "train.jsonl"
    assert notebook["training"]["train_sha256"] == hashlib.sha256(nb_train.read_bytes()).hexdigest()
    assert notebook["training"]["train_seconds"] > 0 and cli["training"]["train_seconds"] > 0


@pytest.mark.slow
def test_run_metrics_match_predictions(run_dir):
    out, _, test_raw = run_dir
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for key in ("accuracy", "macro_f1", "n_test", "invalid_rate", "profile", "labels", "per_class",
                "confusion_matrix", "tiny_model"):
        assert key in metrics, key
    assert metrics["profile"] == "tiny" and metrics["tiny_model"] is True and metrics["n_test"] == 8

    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    raw_by_text = {r["text"]: r for r in test_raw}
    assert len(preds) == 8
    for p in preds:
        candidates = candidates_of(raw_by_text[p["text"]])
        assert p["prediction"] in candidates and p["output"] == raw_by_text[p["text"]]["output"]
        assert set(p["scores"]) == set(candidates)
        assert p["prediction"] == max(p["scores"], key=p["scores"].get)

    correct = sum(p["prediction"] == p["output"] for p in preds)
    assert metrics["accuracy"] == pytest.approx(correct / 8)
    invalid = sum(p["generated"].strip() not in candidates_of(raw_by_text[p["text"]]) for p in preds)
    assert metrics["invalid_rate"] == pytest.approx(invalid / 8)

    # macro-F1 by hand over the union of truths and predictions
    labels = sorted({p["output"] for p in preds} | {p["prediction"] for p in preds})
    f1s = []
    for label in labels:
        tp = sum(p["output"] == label and p["prediction"] == label for p in preds)
        fp = sum(p["output"] != label and p["prediction"] == label for p in preds)
        fn = sum(p["output"] == label and p["prediction"] != label for p in preds)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    assert metrics["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert metrics["labels"] == labels
    matrix = metrics["confusion_matrix"]
    assert sum(map(sum, matrix)) == 8 and sum(matrix[i][i] for i in range(len(labels))) == correct


@pytest.mark.slow
def test_run_rag_metrics_cover_five_methods_on_the_same_test_rows(run_dir):
    out, _, _ = run_dir
    rag = json.loads((out / "rag_metrics.json").read_text(encoding="utf-8"))
    assert list(rag) == ["retrieval_vote", "zero_shot", "rag", "lora", "lora_rag"]
    for method, m in rag.items():
        assert set(m) == {"accuracy", "macro_f1", "n_test"}, method
        assert m["n_test"] == 8, method  # max_test_samples
        assert isinstance(m["accuracy"], float) and isinstance(m["macro_f1"], float), method
        assert 0 <= m["macro_f1"] <= 1, method
        assert (m["accuracy"] * 8) == pytest.approx(round(m["accuracy"] * 8)), method  # k correct of 8
    # 05's LoRA method is 04's scoring (same adapter, max_length, batch size): its accuracy, counted by hand
    # from 04's predictions.jsonl, must match.
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rag["lora"]["accuracy"] == pytest.approx(sum(p["prediction"] == p["output"] for p in preds) / len(preds))
    # 05 read 04's zero-shot and LoRA scores back instead of scoring the same rows again (scoring.json matched)
    timing = json.loads((out / "rag_timing.json").read_text(encoding="utf-8"))
    assert timing["reused"] == {"zero_shot": True, "lora": True}
    zero_shot = [max(p["category"], key=p["zero_shot_scores"].get) for p in preds]
    accuracy = sum(z == p["output"] for z, p in zip(zero_shot, preds)) / len(preds)
    assert rag["zero_shot"]["accuracy"] == pytest.approx(accuracy)
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["zero_shot"]["accuracy"] == pytest.approx(
        accuracy)


@pytest.mark.slow
def test_run_predictions_carry_probabilities_and_metrics_the_ece(run_dir):
    import math

    out, _, _ = run_dir
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    for p in preds:  # the softmax of the candidates' total log-probabilities, computed here
        assert set(p["probabilities"]) == set(p["scores"]) and sum(p["probabilities"].values()) == pytest.approx(1.0)
        top = max(p["scores"].values())
        total = sum(math.exp(v - top) for v in p["scores"].values())
        for label, value in p["scores"].items():
            assert p["probabilities"][label] == pytest.approx(math.exp(value - top) / total, rel=1e-6)
    # ECE by hand: 10 bins ((k-1)/10, k/10] of the top probability, |accuracy - mean confidence| weighted by rows
    bins = {}
    for p in preds:
        confidence = p["probabilities"][p["prediction"]]
        k = max(0, math.ceil(round(confidence * 10, 9)) - 1)
        bins.setdefault(k, []).append((confidence, p["prediction"] == p["output"]))
    ece = sum(len(b) / len(preds) * abs(sum(c for _, c in b) / len(b) - sum(x for x, _ in b) / len(b))
              for b in bins.values())
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["ece"] == pytest.approx(ece)
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_run_compares_six_approaches_on_the_same_rows(run_dir):
    out, _, _ = run_dir
    approaches = json.loads((out / "approaches.json").read_text(encoding="utf-8"))
    assert list(approaches) == ["tfidf_logreg", "retrieval_vote", "zero_shot", "rag", "lora", "seq_cls_lora"]
    for method, m in approaches.items():
        assert set(m) == {"accuracy", "macro_f1", "n_test", "train_seconds", "rows_per_second"}, method
        assert m["n_test"] == 8, method  # max_test_samples: every method on the same 8 test rows
        assert (m["accuracy"] * 8) == pytest.approx(round(m["accuracy"] * 8)), method
        assert m["train_seconds"] >= 0 and m["rows_per_second"] > 0, method
    assert approaches["zero_shot"]["train_seconds"] == 0
    # The four methods of 05 are read from 05's per-row predictions, not recomputed: the same accuracies.
    rag = json.loads((out / "rag_metrics.json").read_text(encoding="utf-8"))
    for method in ("retrieval_vote", "zero_shot", "rag", "lora"):
        assert approaches[method]["accuracy"] == rag[method]["accuracy"], method
    rows = [json.loads(x) for x in (out / "rag_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and all(r["predictions"]["lora"] in r["category"] for r in rows)
    log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    assert approaches["lora"]["train_seconds"] == next(e["train_runtime"] for e in log if "train_runtime" in e)
    seq_cls = json.loads((out / "seq_cls" / "seq_cls.json").read_text(encoding="utf-8"))
    assert seq_cls["labels"] == sorted(LABELS) and (out / "seq_cls" / "adapter_model.safetensors").is_file()
    assert (out / "approaches.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_run_writes_png_figures(run_dir):
    out, _, _ = run_dir
    for name in ("confusion_matrix.png", "loss_curve.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_rerun_over_the_finished_run_is_refused_byte_identical(run_dir, capsys):
    out, _, _ = run_dir
    before = {p: (p.read_bytes() if p.is_file() else None) for p in sorted(out.parent.rglob("*"))}
    assert main(["run", "--out", str(out)]) == 2
    assert f"{out} already holds a finished run; add --overwrite" in capsys.readouterr().err
    assert {p: (p.read_bytes() if p.is_file() else None) for p in sorted(out.parent.rglob("*"))} == before


@pytest.mark.slow
def test_ctrl_c_during_a_notebook_is_one_line_exit_130(tmp_path):
    """SIGINT to the process group while notebook 03 runs a cell: no kernel traceback, the folder marked."""
    from qwen_cls.run_record import RUN_INCOMPLETE

    out = tmp_path / "run"
    status, _, err = ctrl_c_when(
        [sys.executable, "-m", "qwen_cls", "run", "--out", str(out), "--quiet", "-p", "swanlab_mode", "disabled",
         "-p", "max_train_samples", "8", "-p", "max_test_samples", "4"],
        out / "notebooks" / "03_lora_training.ipynb", 3, tmp_path / "logs")  # 3 s: inside a cell of 03
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and "ZMQError" not in err, err[-3000:]
    expected = f"interrupted; {out} is marked incomplete ({RUN_INCOMPLETE}); rerun to replace it"
    assert err.rstrip().splitlines()[-1] == expected
    assert (out / RUN_INCOMPLETE).is_file() and not (out.parent / f".{out.name}.lock").exists()


def test_bad_parameter_key_exits_2_naming_valid_keys(tmp_path, capsys):
    assert main(["run", "--profile", "tiny", "--out", str(tmp_path / "x"), "-p", "learning_rat", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "learning_rate" in err and "max_train_samples" in err
    assert not (tmp_path / "x").exists()


def test_missing_raw_file_exits_2_before_any_notebook(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["run", "--out", str(tmp_path / "x"), "-p", "train_path", str(missing)]) == 2
    assert f"train_path={missing}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_real_profile_offline_fails_fast_with_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN_CLS_OFFLINE", "1")
    assert main(["run", "--profile", "qwen2-0.5b", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cannot reach www.modelscope.cn" in err and "tiny" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key, text, expected", [
    ("learning_rate", "fast", "learning_rate must be a number > 0 and <= 1, got 'fast'"),
    ("learning_rate", "0", "learning_rate must be a number > 0"),
    ("learning_rate", "nan", "learning_rate must be a number"),
    ("num_train_epochs", "0", "num_train_epochs must be a number > 0, got 0"),
    ("max_train_samples", "1e1",
     "max_train_samples must be an integer >= 0 (0: all rows), got 10.0 (a float; write 10)"),
    ("max_train_samples", "-5", "max_train_samples must be an integer >= 0 (0: all rows), got -5"),
    ("max_test_samples", "2.5", "max_test_samples must be an integer >= 0"),
    ("lora_r", "0", "lora_r must be an integer >= 1, got 0"),
    ("lora_dropout", "1.5", "lora_dropout must be a number >= 0 and < 1, got 1.5"),
    ("lora_alpha", "-1", "lora_alpha must be a number > 0"),
    ("swanlab_mode", "foo", "swanlab_mode must be one of local, offline, disabled, cloud, got 'foo'"),
    ("swanlab_mode", "None", "swanlab_mode must be one of"),
    ("download_data", "true", "download_data must be True or False, got 'true' (write True or False)"),
    ("gradient_checkpointing", "1", "gradient_checkpointing must be True or False, got 1"),
    ("seed", "True", "seed must be an integer >= 0"),
    ("seed", "-1", "seed must be an integer >= 0"),
    ("per_device_train_batch_size", "0", "per_device_train_batch_size must be an integer >= 1"),
    ("gradient_accumulation_steps", "0", "gradient_accumulation_steps must be an integer >= 1"),
    ("max_length", "20", "max_length must be an integer >= 64"),
    ("logging_steps", "0", "logging_steps must be an integer >= 1"),
    ("eval_rows", "-1", "eval_rows must be an integer >= 0"),
    ("eval_batch_size", "0", "eval_batch_size must be an integer >= 1"),
    ("max_new_tokens", "0", "max_new_tokens must be an integer >= 1"),
    ("rag_k", "0", "rag_k must be an integer >= 1"),
    ("rag_max_length", "10", "rag_max_length must be an integer >= 0 (0: the training max_length; else >= 64)"),
    ("base_model", "12", "base_model must be a non-empty text"),
    ("train_path", "", "train_path must be a non-empty path"),
])
def test_bad_parameter_value_exits_2_before_anything_naming_it(tmp_path, capsys, monkeypatch, key, text, expected):
    import papermill

    def no_notebook(*args, **kwargs):
        raise AssertionError("a notebook ran")

    monkeypatch.setattr(papermill, "execute_notebook", no_notebook)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--out", str(tmp_path / "x"), "-p", key, text]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -p {key} must be") and expected in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # not even the run folder or its lock


def test_every_notebook_and_profile_parameter_has_a_schema_entry():
    from qwen_cls.chain.templating import notebook_parameters
    from qwen_cls.chapters import notebooks_dir
    from qwen_cls.profiles import PROFILES, SCHEMA, check_parameters, profile_parameters

    declared = set().union(*(notebook_parameters(notebooks_dir() / name) for name in NOTEBOOKS))
    assert declared | set().union(*map(set, PROFILES.values())) <= set(SCHEMA)
    for name in PROFILES:
        check_parameters(profile_parameters(name))  # every profile passes its own schema


@pytest.mark.parametrize("text, value", [("16", 16), ("0.5", 0.5), ("5e-3", 0.005), ("True", True),
                                         ("False", False), ("None", None), ("local", "local"), ("-3", -3)])
def test_parse_value_like_papermill(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_resolve_parameters_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = resolve_parameters("tiny", {"test_path": "mine.jsonl", "seed": 7}, "outdir")
    assert params["test_path"] == str(tmp_path / "mine.jsonl")  # overrides: relative to the current folder
    assert params["out_dir"] == str(tmp_path / "outdir")
    root = Path(__file__).resolve().parents[1]
    assert params["train_path"] == str(root / "data" / "sample" / "train.jsonl")  # profile: relative to notebooks/
    assert params["seed"] == 7 and params["learning_rate"] == 5e-3


# --- helpers the chain relies on -------------------------------------------------------------------------------

def test_sample_rows_shuffles_with_seed_then_takes_n():
    import random

    from qwen_cls.data import sample_rows

    rows = list(range(10))
    expected = list(range(10))
    random.Random(5).shuffle(expected)
    assert sample_rows(rows, 3, 5) == expected[:3]
    assert sample_rows(rows, 0, 5) == expected and rows == list(range(10))  # 0 = all; input untouched
    assert sample_rows(rows, 50, 5) == expected


def test_atomic_json_and_folder_writes(tmp_path):
    from qwen_cls.files import atomic_dir, write_json_atomic

    target = write_json_atomic({"标签": [1, 2]}, tmp_path / "a" / "x.json")
    assert target.read_text(encoding="utf-8") == '{\n  "标签": [\n    1,\n    2\n  ]\n}\n'
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(folder) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.joinpath("adapter").iterdir()] == ["old.txt"]  # failure: old folder kept
    with atomic_dir(folder) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "adapter"]  # no temp folders left


def test_plots_write_pngs_with_the_data_drawn(tmp_path):
    from qwen_cls import plots

    fig = plots.confusion_matrix([[2, 1], [0, 3]], ["Art", "Sports"], path=tmp_path / "cm.png")
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["0", "1", "2", "3"]
    fig = plots.loss_curve([{"step": 2, "loss": 11.5}, {"step": 4, "loss": 11.0}, {"train_runtime": 1.0}],
                           path=tmp_path / "loss.png")
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [2, 4] and list(line.get_ydata()) == [11.5, 11.0]
    fig = plots.length_histogram([100, 384, 200], 384, recipe_lengths=[100, 900, 200], path=tmp_path / "len.png")
    assert any(list(line.get_xdata()) == [384, 384] for line in fig.axes[0].lines)  # the cut is marked
    fig = plots.label_distribution({"train": {"Art": 3, "Sports": 5}, "test": {"Art": 1}}, path=tmp_path / "lab.png")
    widths = sorted(p.get_width() for p in fig.axes[0].patches)
    assert widths == [0, 1, 3, 5]
    for name in ("cm.png", "loss.png", "len.png", "lab.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_run_splits_validation_rows_off_the_training_file_and_scores_them_not_the_test_rows(run_dir):
    """01 writes the shuffled raw training file's last 4 rows (validation_rows 4) as data/validation.jsonl and
    its first 16 as data/train.jsonl, disjoint; 03's learning curve scores the validation rows (eval_rows 0: all
    4) and records their count and digest; 04's metrics.json holds 03's last validation beside the test accuracy."""
    from _tiny_run import chain_raw_rows

    from qwen_cls import data

    out, _, _ = run_dir
    read = lambda name: [json.loads(x) for x in (out / "data" / name).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    train, validation, test = read("train.jsonl"), read("validation.jsonl"), read("test.jsonl")
    raw = [data.validate_row(r) for r in chain_raw_rows(20, 0)]  # the run's 20 raw training rows
    want_train, want_validation = data.split_train_validation(raw, 16, 4, 3)
    assert [r["text"] for r in train] == [r.text for r in want_train] and len(train) == 16
    assert [r["text"] for r in validation] == [r.text for r in want_validation] and len(validation) == 4
    assert not {r["text"] for r in train} & {r["text"] for r in validation}
    assert [r["text"] for r in train] == [r.text for r in data.sample_rows(raw, 16, 3)]  # as before the split
    config = json.loads((out / "run_config.json").read_text(encoding="utf-8"))
    assert config["validation"]["rows"] == 4 and config["training"]["eval_rows"] == 4
    assert config["validation"]["sha256"] == data.rows_sha256(validation) == data.rows_sha256(want_validation)
    log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    evaluations = [e for e in log if "eval_accuracy" in e]
    assert len(evaluations) == 3  # before training and after each of tiny's 2 epochs
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["validation"] == {"rows": 4, "of": 4, "accuracy": evaluations[-1]["eval_accuracy"],
                                     "macro_f1": evaluations[-1]["eval_macro_f1"],
                                     "sha256": config["validation"]["sha256"]}
    assert metrics["n_test"] == len(test) == 8
    inventory = json.loads((out / "data" / "label_inventory.json").read_text(encoding="utf-8"))
    assert sum(v["validation"] for v in inventory.values()) == 4
