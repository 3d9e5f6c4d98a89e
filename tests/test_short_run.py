"""A training run too short to log a loss (fewer optimizer steps than ``logging_steps``) still runs the
whole notebook chain and ends with metrics (issue: short runs crash). The session's tiny chain is such a run; the
qwen2-0.5b profile's own smoke test, one optimizer step an epoch, is in ``test_recipe_chain.py``."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_chain_finishes_when_no_loss_is_logged_on_schedule(tiny_run):
    out, _, _ = tiny_run
    # the session's tiny chain is the command: 16 rows in batches of 4, 2 epochs = 8 steps, far fewer
    # than its logging_steps 1000 (_tiny_run.TINY_RUN_PARAMETERS)
    params = json.loads((out / "params.json").read_text(encoding="utf-8"))
    assert (params["logging_steps"], params["max_train_samples"], params["max_test_samples"]) == (1000, 16, 8)
    log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    losses = [e for e in log if "loss" in e]
    assert [e["step"] for e in losses] == [1]  # only the first step is logged
    evals = [e for e in log if "eval_accuracy" in e]
    assert [e["step"] for e in evals] == [0, 4, 8]  # before training, after each epoch

    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    test_rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert metrics["n_test"] == len(test_rows) == len(predictions) == 8
    assert metrics["chance_accuracy"] == pytest.approx(sum(1 / len(r["category"]) for r in test_rows) / 8)
    assert metrics["accuracy"] == pytest.approx(sum(p["prediction"] == p["output"] for p in predictions) / 8)
    assert set(metrics["zero_shot"]) == {"accuracy", "macro_f1"}
    from qwen_cls.evaluate import score_candidates
    from qwen_cls.model import load_model

    model, tokenizer = load_model("tiny", device="cpu", adapter=str(out / "adapter"))
    with model.disable_adapter():  # zero-shot, recomputed here: the base model alone on the same rows
        base = [s.prediction for s in score_candidates(model, tokenizer, test_rows, max_length=384)]
    assert metrics["zero_shot"]["accuracy"] == pytest.approx(sum(p == r["output"] for p, r in zip(base, test_rows)) / 8)
    assert (out / "learning_curve.png").is_file() and (out / "rag_metrics.json").is_file()
    assert "训练太短" in (out / "notebooks" / "03_lora_training.ipynb").read_text(encoding="utf-8")
