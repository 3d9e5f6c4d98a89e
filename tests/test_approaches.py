"""Probabilities of candidate scoring, calibration (ECE), abstention, and notebook 06's other classifiers:
the TF-IDF baseline's candidate restriction and the sequence-classification head saved with its adapter."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import SAMPLE

from qwen_cls import data, evaluate, metrics
from qwen_cls.approaches import (
    SEQ_CLS_HEAD,
    approach_entry,
    encode_texts,
    load_seq_cls,
    load_seq_cls_base,
    restricted,
    restricted_rows,
    save_seq_cls,
    seq_cls_scores,
)

pytestmark = pytest.mark.filterwarnings("ignore")


# --- probabilities --------------------------------------------------------------------------------------------

def test_candidate_softmax_by_hand():
    p = evaluate.candidate_softmax({"A": math.log(1.0), "B": math.log(3.0)})
    assert p == pytest.approx({"A": 0.25, "B": 0.75})
    assert evaluate.candidate_softmax({"A": -1000.0, "B": -1001.0})["A"] == pytest.approx(1 / (1 + math.exp(-1)))
    assert evaluate.candidate_softmax({"A": float("-inf"), "B": 0.0}) == {"A": 0.0, "B": 1.0}
    assert evaluate.candidate_softmax({"A": float("-inf"), "B": float("-inf")}) == {"A": 0.5, "B": 0.5}
    scored = evaluate.Scored("B", {"A": math.log(1.0), "B": math.log(3.0)})
    assert scored.probabilities == pytest.approx({"A": 0.25, "B": 0.75}) and scored.confidence == pytest.approx(0.75)


def test_scored_rows_carry_the_softmax_of_their_scores(tiny_dir):
    from qwen_cls.model import load_model

    model, tok = load_model(tiny_dir, device="cpu")
    rows = [r.to_dict() for r in data.read_raw_rows(SAMPLE / "test.jsonl")][:6]
    for row, s in zip(rows, evaluate.score_candidates(model, tok, rows, max_length=128, batch_size=4)):
        assert set(s.probabilities) == set(row["category"])
        assert sum(s.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        total = sum(math.exp(v) for v in s.scores.values())  # the scores are > -100 here: no underflow
        for label, value in s.scores.items():
            assert s.probabilities[label] == pytest.approx(math.exp(value) / total, rel=1e-6)
        assert s.prediction == max(s.probabilities, key=s.probabilities.get)
        assert s.confidence == max(s.probabilities.values())


# --- calibration and abstention -----------------------------------------------------------------------------------

def test_ece_against_a_hand_worked_example():
    confidences = [0.95, 0.95, 0.85, 0.55, 0.55, 0.25]
    correct = [True, False, True, True, True, False]
    # bins: (0.9, 1] 2 rows, acc 0.5, conf 0.95 -> gap 0.45; (0.8, 0.9] 1 row, acc 1, conf 0.85 -> 0.15;
    # (0.5, 0.6] 2 rows, acc 1, conf 0.55 -> 0.45; (0.2, 0.3] 1 row, acc 0, conf 0.25 -> 0.25.
    expected = (2 * 0.45 + 1 * 0.15 + 2 * 0.45 + 1 * 0.25) / 6
    assert metrics.expected_calibration_error(confidences, correct) == pytest.approx(expected)
    bins = metrics.reliability_bins(confidences, correct)
    assert [b["count"] for b in bins] == [0, 0, 1, 0, 0, 2, 0, 0, 1, 2]
    assert bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.95)
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None
    # a perfectly calibrated set: 3 of 4 right at confidence 0.75
    assert metrics.expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)
    # edges go to the bin below ((k-1)/10, k/10]; 0 to the first bin; 0.3 * 10 is 3.0000000000000004 in floats
    edges = metrics.reliability_bins([0.0, 0.3, 0.5, 1.0], [0, 0, 1, 1])
    assert [k for k, b in enumerate(edges) if b["count"]] == [0, 2, 4, 9]
    with pytest.raises(ValueError):
        metrics.expected_calibration_error([1.2], [1])


def test_choose_min_confidence_takes_the_lowest_threshold_reaching_the_target():
    curve = metrics.accuracy_coverage([0.9, 0.8, 0.6, 0.4], [1, 1, 0, 0], [0.0, 0.5, 0.7, 0.95])
    # accuracies 0.5, 2/3, 1.0 (2 rows), none answered at 0.95
    assert metrics.choose_min_confidence(curve, 0.6)["threshold"] == 0.5
    assert metrics.choose_min_confidence(curve, 0.9) == {"threshold": 0.7, "coverage": 0.5, "answered": 2,
                                                          "accuracy": 1.0}
    low = metrics.accuracy_coverage([0.9, 0.8], [0, 1], [0.0, 0.85, 0.95])  # never reaches 0.99: highest answering
    assert metrics.choose_min_confidence(low, 0.99)["threshold"] == 0.85
    with pytest.raises(ValueError, match="answers a row"):
        metrics.choose_min_confidence(metrics.accuracy_coverage([0.5], [1], [0.9]), 0.9)


def test_accuracy_coverage_by_hand():
    curve = metrics.accuracy_coverage([0.9, 0.8, 0.6, 0.4], [1, 1, 0, 0], [0.0, 0.5, 0.7, 0.95])
    assert [c["coverage"] for c in curve] == [1.0, 0.75, 0.5, 0.0]
    assert [c["answered"] for c in curve] == [4, 3, 2, 0]
    assert [c["accuracy"] for c in curve[:3]] == pytest.approx([0.5, 2 / 3, 1.0]) and curve[3]["accuracy"] is None


def test_reliability_and_cost_pictures_are_pngs(tmp_path):
    from qwen_cls import plots

    bins = metrics.reliability_bins([0.95, 0.55, 0.25], [1, 0, 0])
    plots.reliability_diagram(bins, ece=0.3, path=tmp_path / "calibration.png")
    plots.accuracy_coverage(metrics.accuracy_coverage([0.9, 0.4], [1, 0], [0.0, 0.5]), path=tmp_path / "cov.png")
    table = {"tfidf_logreg": {"accuracy": 0.8, "train_seconds": 1.5, "rows_per_second": 900.0},
             "zero_shot": {"accuracy": 0.4, "train_seconds": 0.0, "rows_per_second": 5.0}}
    plots.approaches_cost(table, chance=0.3, path=tmp_path / "approaches.png")
    for name in ("calibration.png", "cov.png", "approaches.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- restricted classifiers ---------------------------------------------------------------------------------------

def test_restricted_prediction_is_among_the_candidates_with_renormalised_probabilities():
    classes = ["Art", "Economy", "Sports"]
    log_proba = [[math.log(0.7), math.log(0.2), math.log(0.1)],
                 [math.log(0.7), math.log(0.2), math.log(0.1)]]
    rows = [{"category": ["Economy", "Sports"]}, {"category": ["Sports", "Space"]}]  # Space: no class for it
    first, second = restricted_rows(log_proba, classes, rows)
    assert first.prediction == "Economy"  # Art scores highest overall but is no candidate
    assert first.probabilities == pytest.approx({"Economy": 2 / 3, "Sports": 1 / 3})
    assert second.prediction == "Sports" and second.probabilities == pytest.approx({"Sports": 1.0, "Space": 0.0})
    assert restricted({"A": 1.0, "B": 1.0}, ["B", "A"]).prediction == "B"  # ties: the first candidate
    with pytest.raises(ValueError):
        restricted_rows(log_proba, classes, rows[:1])


def test_approach_entry_by_hand():
    entry = approach_entry(["A", "B", "B", "A"], ["A", "B", "A", "A"], train_seconds=2, predict_seconds=0.5)
    # A: tp 2, fp 1, fn 0 -> F1 4/5; B: tp 1, fp 0, fn 1 -> F1 2/3
    assert entry == {"accuracy": 0.75, "macro_f1": pytest.approx((4 / 5 + 2 / 3) / 2), "n_test": 4,
                     "train_seconds": 2.0, "rows_per_second": 8.0}


# --- the sequence-classification head: saved with its adapter, or random ------------------------------------------

def _tiny_gemma_dir(folder):
    """A tiny random Gemma 3 (text) with the real Gemma tokenizer, when the gemma3-270m folder is built."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from qwen_cls.hub import cache_dir

    built = next(cache_dir().glob("gemma3-270m-*"), None) if cache_dir().is_dir() else None
    if built is None or not (built / "tokenizer.json").is_file():
        pytest.skip("the gemma3-270m folder is not built (make setup)")
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                              bos_token_id=2, eos_token_id=1)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (built / name).is_file():
            shutil.copy(built / name, folder / name)
    return folder


@pytest.fixture(params=["qwen2", "gemma3"])
def base_dir(request, tiny_dir, tmp_path):
    return str(tiny_dir) if request.param == "qwen2" else str(_tiny_gemma_dir(tmp_path / "tiny-gemma"))


def _train_seq_cls(base, rows, labels, lora_config, tmp_path):
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    set_seed(0)
    model, tok = load_seq_cls_base(base, labels, device="cpu")
    model = get_peft_model(model, lora_config)
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=4, learning_rate=2e-2,
                             max_steps=4, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                             seed=0)
    Trainer(model=model, args=args, train_dataset=encode_texts(tok, rows, labels, 64),
            data_collator=DataCollatorWithPadding(tok)).train()
    return model, tok


def _logits(model, tok, rows):
    batch = tok([r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model.eval()(**batch).logits.float()


@pytest.mark.slow
def test_seq_cls_head_is_saved_and_reloaded_with_its_adapter(base_dir, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    rows = [r.to_dict() for r in data.read_raw_rows(SAMPLE / "train.jsonl")][:16]
    test = [r.to_dict() for r in data.read_raw_rows(SAMPLE / "test.jsonl")][:8]
    labels = sorted({r["output"] for r in rows + test})
    config = LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                        modules_to_save=[SEQ_CLS_HEAD])
    model, tok = _train_seq_cls(base_dir, rows, labels, config, tmp_path)
    before_scores = seq_cls_scores(model, tok, test, labels, max_length=64, batch_size=3)
    before = _logits(model, tok, test)
    for row, s in zip(test, before_scores):  # restricted to the row's candidates, softmax over them
        assert s.prediction in row["category"] and set(s.probabilities) == set(row["category"])
        assert sum(s.probabilities.values()) == pytest.approx(1.0)

    folder = save_seq_cls(model, tok, tmp_path / "seq_cls", base_model=base_dir, labels=labels, max_length=64)
    reloaded, rtok, rlabels, max_length = load_seq_cls(folder, device="cpu")
    assert (rlabels, max_length) == (labels, 64)
    assert torch.allclose(_logits(reloaded, rtok, test), before, atol=1e-5)
    again = seq_cls_scores(reloaded, rtok, test, labels, max_length=64, batch_size=3)
    assert [s.prediction for s in again] == [s.prediction for s in before_scores]

    # The trap: the same LoRA weights without the saved head get a new random head, and other outputs.
    weights = load_file(folder / "adapter_model.safetensors")
    assert any(SEQ_CLS_HEAD in k for k in weights)  # the head is in the adapter file
    torch.manual_seed(1)
    base, btok = load_seq_cls_base(base_dir, labels, device="cpu")
    without_head = get_peft_model(base, LoraConfig(task_type=None, target_modules=["q_proj", "v_proj"], r=4,
                                                   lora_alpha=8))
    result = set_peft_model_state_dict(without_head, {k: v for k, v in weights.items() if SEQ_CLS_HEAD not in k})
    assert not result.unexpected_keys  # every LoRA weight was loaded: only the head is missing
    assert not torch.allclose(_logits(without_head, btok, test), before, atol=1e-3)


def test_a_model_whose_head_would_not_be_saved_is_refused(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = load_seq_cls_base(str(tiny_dir), ["A", "B"], device="cpu")
    model = get_peft_model(model, LoraConfig(task_type=None, target_modules=["q_proj"], r=2))  # no head saved
    with pytest.raises(ValueError, match="modules_to_save"):
        save_seq_cls(model, tok, tmp_path / "seq_cls", base_model=str(tiny_dir), labels=["A", "B"], max_length=32)
    assert not (tmp_path / "seq_cls").exists()
