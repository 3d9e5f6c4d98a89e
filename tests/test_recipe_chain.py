"""One chain under the ``qwen2-0.5b`` profile, the real recipe's settings, on a local tiny model folder, with the
training rows of ``test_labels`` (16 rows, answers Sports and Economy) and test rows whose answers training never
saw (Art). Two tests read it: the newcomer's smoke test of the recipe (batch 4 x accumulation 4, gradient
checkpointing, logging every 10 steps: 16 rows = 1 optimizer step an epoch) and labels unseen in training, end
to end (issue 23, item 2). One run serves both: a chain costs a minute on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _tiny_run import subprocess_env
from test_labels import TEST, TRAIN, write_raw

from qwen_cls import data

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, tiny_dir):
    """``qwen-cls run --profile qwen2-0.5b`` on ``tiny_dir`` and the disjoint label sets; two of the profile's sizes
    that only cost time are cut: 04's per-row generate on 1 row, not 3 (the random model writes all 512 tokens),
    and 07's load test for 2 s, not 30. Returns (run folder, stderr)."""
    base = tmp_path_factory.mktemp("recipe")
    train, test = write_raw(base / "train.jsonl", TRAIN), write_raw(base / "test.jsonl", TEST)
    out = base / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_cls", "run", "--quiet", "--profile", "qwen2-0.5b", "--out", str(out),
         "-p", "base_model", str(tiny_dir), "-p", "train_path", str(train), "-p", "test_path", str(test),
         "-p", "download_data", "False", "-p", "swanlab_mode", "disabled", "-p", "speed_rows", "1",
         "-p", "serve_seconds", "2", "-p", "validation_rows", "4"],
        capture_output=True, text=True, timeout=1200, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stderr


def test_the_real_recipe_smoke_test_of_one_step_finishes(recipe_run):
    out, _ = recipe_run
    params = json.loads((out / "params.json").read_text(encoding="utf-8"))
    assert (params["per_device_train_batch_size"], params["gradient_accumulation_steps"],
            params["gradient_checkpointing"], params["logging_steps"]) == (4, 4, True, 10)
    log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    assert [e["step"] for e in log if "loss" in e] == [1]  # 2 epochs of 16 rows / 16 per step = 2 steps
    assert [e["step"] for e in log if "train_loss" in e] == [2]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_test"] == 3 and {"accuracy", "zero_shot", "chance_accuracy"} <= set(metrics)


def test_disjoint_label_sets_through_the_chain(recipe_run):
    """The probe's case, end to end: no method that learns the training labels reports a right answer on rows
    whose answer it never saw, 06's head has the training labels only, and metrics.json records the warning."""
    out, stderr = recipe_run
    assert "warning: " in stderr and "(Art, Military)" in stderr
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["unseen_test_labels"] == {"labels": ["Art", "Military"], "rows": 3, "answer_rows": 3}
    approaches = json.loads((out / "approaches.json").read_text(encoding="utf-8"))
    for method in ("tfidf_logreg", "retrieval_vote", "seq_cls_lora"):
        assert approaches[method]["accuracy"] == 0.0 and approaches[method]["n_test"] == 3, method
    seq_cls = json.loads((out / "seq_cls" / "seq_cls.json").read_text(encoding="utf-8"))
    assert seq_cls["labels"] == ["Economy", "Sports"]
    inventory = json.loads((out / "data" / "label_inventory.json").read_text(encoding="utf-8"))
    assert inventory["Art"] == {"train": 0, "validation": 0, "test": 3}  # 01 still reports the test split
    rag = [json.loads(line) for line in (out / "rag_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    known = data.training_labels(TRAIN)
    for row in rag:  # 01 shuffles the rows: the one training label among the candidates, else no answer
        expected = [c for c in row["category"] if c in known]
        assert row["predictions"]["retrieval_vote"] == (expected[0] if expected else None), row
    assert sorted(map(str, (r["predictions"]["retrieval_vote"] for r in rag))) == ["Economy", "None", "Sports"]
