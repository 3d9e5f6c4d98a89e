"""A training run too short to log a loss (fewer optimizer steps than ``logging_steps``) still runs the
whole notebook chain and ends with metrics: the smoke test a newcomer runs first (issue: short runs crash)."""

from __future__ import annotations

import json

import pytest

from qwen_cls.cli import main

pytestmark = pytest.mark.slow


def test_chain_finishes_when_no_loss_is_logged_on_schedule(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QWEN_CLS_SWANLAB_MODE", "disabled")
    out = tmp_path / "short"
    assert main(["run", "--quiet", "--out", str(out), "-p", "logging_steps", "1000", "-p", "max_train_samples", "16",
                 "-p", "max_test_samples", "8", "-p", "num_train_epochs", "1"]) == 0
    log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    losses = [e for e in log if "loss" in e]
    assert [e["step"] for e in losses] == [1]  # 4 steps of 4 rows: only the first step is logged
    evals = [e for e in log if "eval_accuracy" in e]
    assert [e["step"] for e in evals] == [0, 4]  # before training, after the one epoch

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    test_rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert metrics["n_test"] == len(test_rows) == len(predictions) == 8
    assert metrics["chance_accuracy"] == pytest.approx(sum(1 / len(r["category"]) for r in test_rows) / 8)
    assert metrics["accuracy"] == pytest.approx(sum(p["prediction"] == p["output"] for p in predictions) / 8)
    assert set(metrics["zero_shot"]) == {"accuracy", "macro_f1"}
    assert 0 <= metrics["zero_shot"]["accuracy"] <= 1 and metrics["zero_shot"]["accuracy"] * 8 == pytest.approx(
        round(metrics["zero_shot"]["accuracy"] * 8))  # a count of right rows out of 8
    assert (out / "learning_curve.png").is_file() and (out / "rag_metrics.json").is_file()
    assert "训练太短" in (out / "notebooks" / "03_lora_training.ipynb").read_text(encoding="utf-8")
