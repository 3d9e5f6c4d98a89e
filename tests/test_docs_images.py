"""`make docs-images` (docs/update_images.py): the README's headline, its notebook times and each notebook's
measured-time line come from a finished run's files, never typed in."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("update_images", ROOT / "docs" / "update_images.py")
U = importlib.util.module_from_spec(spec)
spec.loader.exec_module(U)


HEADER = "# 03\n\n**用时 (time)**：`qwen2-0.5b` 在 GPU 上几分钟。\n"


def _notebook(path: Path, seconds: float | None, header: str = HEADER):
    meta = {"papermill": {"duration": seconds}} if seconds is not None else {}
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "id": "c0", "metadata": {},
                                           "source": header.splitlines(keepends=True)}],
                                "metadata": meta, "nbformat": 4, "nbformat_minor": 5}, ensure_ascii=False, indent=1))


def test_times_are_read_from_papermill_and_written_in_both_languages(tmp_path):
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path / "notebooks" / "03_lora_training.ipynb", 185.4)
    _notebook(tmp_path / "notebooks" / "04_evaluation.ipynb", 41.6)
    _notebook(tmp_path / "notebooks" / "05_rag.ipynb", None)  # not executed: no time
    assert U.notebook_seconds(tmp_path) == {"03_lora_training": 185.4, "04_evaluation": 41.6}
    assert U.english_time(185.4) == "3 min 05 s" and U.english_time(41.6) == "42 s"
    assert U.chinese_time(185.4) == "3 分 05 秒" and U.chinese_time(59.4) == "59 秒"


def test_readme_headline_and_time_column_are_replaced_and_nothing_else(tmp_path):
    readme = ("# x\n\n<!-- headline:start -->\nold numbers\n<!-- headline:end -->\n\n"
              "| notebook | you learn | time: gemma3-270m / tiny* |\n|---|---|---|\n"
              "| [`03_lora_training`](notebooks/03_lora_training.ipynb) | LoRA | — / 211 s |\n"
              "| [`04_evaluation`](notebooks/04_evaluation.ipynb) | scoring | — / 196 s |\n"
              "| [`05_rag`](notebooks/05_rag.ipynb) | RAG | — / 70 s |\n\ntail\n")
    new = U.update_readme(readme, "NEW BLOCK\n", {"03_lora_training": 185.4, "04_evaluation": 61.0},
                          {"03_lora_training": 40.2})
    assert new == ("# x\n\n<!-- headline:start -->\nNEW BLOCK\n<!-- headline:end -->\n\n"
                   "| notebook | you learn | time: gemma3-270m / tiny* |\n|---|---|---|\n"
                   "| [`03_lora_training`](notebooks/03_lora_training.ipynb) | LoRA | 3 min 05 s / 40 s |\n"
                   "| [`04_evaluation`](notebooks/04_evaluation.ipynb) | scoring | 1 min 01 s / — |\n"
                   "| [`05_rag`](notebooks/05_rag.ipynb) | RAG | — / 70 s |\n\ntail\n")
    with pytest.raises(ValueError, match="headline"):
        U.update_readme("no block", "x", {}, {})


def test_headline_names_model_data_machine_and_the_computed_numbers(tmp_path):
    metrics = {"n_test": 500, "accuracy": 0.8876, "macro_f1": 0.8871, "zero_shot": {"accuracy": 0.35},
               "chance_accuracy": 0.3236}
    approaches = {"lora": {"accuracy": 0.905, "n_test": 200}, "tfidf_logreg": {"accuracy": 0.78, "n_test": 200}}
    config = {"dtype": "bfloat16", "training": {"train_rows": 800, "eval_rows": 50}}
    text = U.headline(tmp_path, metrics, approaches, config, 431.0, "2-core AMD EPYC", "2026-12-04")
    assert "(2026-12-04, 2-core AMD EPYC, bfloat16, 7 min 11 s for notebooks 00-07)" in text
    assert "LoRA on 800 THUCNews headlines, Gemma 3 270M classifies 500 test headlines with **accuracy 0.888**" in text
    assert "(macro-F1 0.887), against 0.350 zero-shot (adapter off) and 0.324 chance" in text
    assert "On 200 of those rows notebook 06 compares `lora` 0.905, `tfidf_logreg` 0.780; best: `lora`" in text
    assert "docs/images/learning_curve.png" in text and "docs/images/approaches.png" in text
    assert "![accuracy on 50 validation headlines before and after training]" in text  # 03's eval_rows


def test_notebook_measured_line_goes_after_the_time_line_and_is_replaced_not_repeated(tmp_path):
    path = tmp_path / "03_lora_training.ipynb"
    _notebook(path, 185.4)
    line = U.measured_line("03_lora_training", {"03_lora_training": 185.4}, {"03_lora_training": 40.2},
                           "2-core AMD EPYC", "2026-12-04")
    assert line == ("**实测用时 (measured time)**：`gemma3-270m`（默认）3 分 05 秒，`tiny` 40 秒"
                    "（`qwen-cls run` 在 2-core AMD EPYC 上，2026-12-04；`make docs-images` 写入）。")
    assert U.update_notebook(path, line) is True
    source = "".join(json.loads(path.read_text())["cells"][0]["source"])
    assert source == f"# 03\n\n**用时 (time)**：`qwen2-0.5b` 在 GPU 上几分钟。\n{line}\n"
    assert U.update_notebook(path, line) is False  # the same line again: the file is not rewritten
    other = line.replace("3 分 05 秒", "2 分 00 秒")
    assert U.update_notebook(path, other) is True
    assert "".join(json.loads(path.read_text())["cells"][0]["source"]).count("实测用时") == 1


def test_a_tiny_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"profile": "tiny", "tiny_model": True}))
    assert U.main([str(run)]) == 2
    assert "the README's pictures come from gemma3-270m" in capsys.readouterr().err
    shutil.rmtree(run)
    assert U.main([str(run)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def _real_run(folder: Path, profile: str, accuracy: float, zero: float, seconds: float, rss_mib: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "profile": profile, "base_model": profile, "accuracy": accuracy, "n_test": 500,
        "zero_shot": {"accuracy": zero}, "chance_accuracy": 0.3236,
        "validation": {"rows": 50, "of": 300, "accuracy": accuracy + 0.02}}))
    (folder / "run_config.json").write_text(json.dumps({
        "dtype": "bfloat16", "training": {"train_rows": 800, "learning_rate": 0.001, "num_train_epochs": 1,
                     "per_device_train_batch_size": 8}}))
    (folder / "chain.json").write_text(json.dumps({
        "seconds": seconds, "peak_kernel_rss_mib": rss_mib, "cpu": "2-core Test CPU", "date": "2026-12-06"}))
    return folder


def test_profiles_table_and_default_verdict_come_from_both_runs(tmp_path):
    gemma = _real_run(tmp_path / "demo", "gemma3-270m", 0.88, 0.35, 389.0, 3584)
    qwen = _real_run(tmp_path / "demo-qwen", "qwen2.5-coder-0.5b", 0.85, 0.454, 612.4, 5939)
    table = U.profiles_table([(gemma, U.finished(gemma)), (qwen, U.finished(qwen))])
    assert ("| `qwen2.5-coder-0.5b` | Qwen2.5-Coder-0.5B-Instruct (Qwen; the Qwen2-0.5B architecture; Qwen's GGUF) | "
            "800 train / 500 test THUCNews headlines; lr 0.001, batch 8, 1 epoch(s), bfloat16 | **0.850** "
            "(zero-shot 0.454, chance 0.324) | 0.870 (50 of 300 rows) | 10 min 12 s | 5.8 GiB | "
            "2-core Test CPU, 2026-12-06 |") in table
    assert "| `gemma3-270m` | Gemma 3 270M" in table and "| 6 min 29 s | 3.5 GiB |" in table
    assert ("its accuracy 0.850 is not above gemma3-270m's 0.880; its chain took 10 min 12 s, over `make demo`'s 8 "
            "minutes. So gemma3-270m stays the default") in table
    # a Qwen run that is more accurate and fast enough is named as the one to make default
    (qwen / "metrics.json").write_text(json.dumps({**U.finished(qwen), "accuracy": 0.91}))
    (qwen / "chain.json").write_text(json.dumps({**json.loads((qwen / "chain.json").read_text()), "seconds": 470}))
    verdict = U.default_verdict([(gemma, U.finished(gemma)), (qwen, U.finished(qwen))])
    assert "above gemma3-270m's 0.880; its chain took 7 min 50 s, within" in verdict
    assert verdict.endswith("So qwen2.5-coder-0.5b meets both conditions to become the default.\n")
    assert U.default_verdict([(gemma, U.finished(gemma))]).startswith("No finished `make demo-qwen` run")
