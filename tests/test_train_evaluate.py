import copy
import math

import datasets
import pytest
import torch
from _reference import FLOAT32_SUM_RTOL, assert_float32_close, float32_relative_error
from conftest import SAMPLE
from transformers import TrainingArguments

from qwen_cls import data, evaluate, metrics, train
from qwen_cls.model import load_model
from qwen_cls.tokenization import tokenize_dataset

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def sample_rows():
    return [r.to_dict() for r in data.read_raw_rows(SAMPLE / "train.jsonl")]


def mean_answer_loss(model, tokenized, collator):
    model.eval()
    with torch.no_grad():
        batch = collator([tokenized[i] for i in range(len(tokenized))])
        return train.answer_only_loss(model, batch).item()


@pytest.mark.slow
def test_tiny_model_trains_and_adapter_reloads(tiny_dir, sample_rows, tmp_path):
    torch.manual_seed(0)
    model, tok = load_model(tiny_dir, device="cpu")
    tokenized = train.model_inputs(tokenize_dataset(datasets.Dataset.from_list(sample_rows[:32]), tok, MAX_LENGTH))
    collator = train.padding_collator(tok)
    model = train.prepare_lora_model(model, train.recipe_lora_config())
    before = mean_answer_loss(model, tokenized, collator)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=5e-3, num_train_epochs=3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0)
    trainer = train.AnswerOnlyTrainer(model=model, args=args, train_dataset=tokenized, data_collator=collator)
    trainer.train()
    after = mean_answer_loss(model, tokenized, collator)
    assert after < before - 0.5, (before, after)
    history = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert len(history) == 12 and all(math.isfinite(loss) for _, loss in history)
    # Loss is answer-only: a random 151,936-way guess starts near ln(151936) = 11.9.
    assert abs(history[0][1] - math.log(151936)) < 1.0

    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))
    assert (adapter / "adapter_model.safetensors").is_file()
    reloaded, _ = load_model(tiny_dir, device="cpu", adapter=adapter)
    batch = collator([tokenized[i] for i in range(4)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reloaded(**inputs).logits, atol=1e-5)


def test_evaluation_predicts_a_candidate_and_generates_text(tiny_dir):
    """Scoring always answers with one of the row's candidates (tests/test_fast_paths.py checks its values
    against the straightforward reference); free generation returns one string per row."""
    model, tok = load_model(tiny_dir, device="cpu")
    rows = [r.to_dict() for r in data.read_raw_rows(SAMPLE / "test.jsonl")][:8]
    fast = evaluate.score_candidates(model, tok, rows, max_length=MAX_LENGTH, batch_size=3)
    for row, a in zip(rows, fast):
        assert a.prediction in row["category"] and a.scores.keys() == set(row["category"])
    generated = evaluate.generate_answers(model, tok, rows[:3], max_length=MAX_LENGTH, max_new_tokens=4)
    assert len(generated) == 3 and all(isinstance(g, str) for g in generated)


def test_metrics_against_a_hand_computation():
    truth = ["Art", "Art", "Sports", "Space", "Space", "Space"]
    pred = ["Art", "Sports", "Sports", "Space", "Art", "Space"]
    m = metrics.classification_metrics(truth, pred)
    # Art: tp 1, fp 1, fn 1 -> F1 1/2. Sports: tp 1, fp 1, fn 0 -> P 1/2, R 1, F1 2/3.
    # Space: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 4/5.
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)
    assert m["labels"] == ["Art", "Space", "Sports"]
    assert m["confusion_matrix"] == [[1, 0, 1], [1, 2, 0], [0, 0, 1]]
    assert m["n_test"] == 6 and m["per_class"]["Sports"]["recall"] == 1.0
    candidates = [["Art", "Space"]] * 2 + [["Sports", "Art"]] * 2
    assert metrics.invalid_rate(["Art", "art", "Sports ", "体育"], candidates) == 0.5
    with pytest.raises(ValueError):
        metrics.classification_metrics(["A"], [])


@pytest.mark.slow
def test_one_row_per_forward_accumulated_makes_the_same_optimizer_step(tiny_dir, sample_rows, tmp_path):
    """The project's CPU layout (README): 1 row per forward x 4 accumulated is the recipe's 4-row step, because
    the loss is normalised over all answer tokens of the 4 rows; checked against a by-hand 4-row gradient."""
    model, tok = load_model(tiny_dir, device="cpu")
    tokenized = train.model_inputs(tokenize_dataset(datasets.Dataset.from_list(sample_rows[:4]), tok, MAX_LENGTH))
    answer_tokens = [sum(1 for x in r["labels"][1:] if x != -100) for r in tokenized]
    assert len(set(answer_tokens)) > 1  # rows of unequal answer length: a per-row mean would weigh them differently
    collator = train.padding_collator(tok)
    torch.manual_seed(0)
    base = train.prepare_lora_model(model, train.recipe_lora_config(lora_dropout=0.0), gradient_checkpointing=False)
    start = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}

    # By hand: summed cross-entropy of every answer token of the 4 rows / their number, one backward.
    train.answer_only_loss(base, collator([tokenized[i] for i in range(4)])).backward()
    expected = {n: -p.grad.clone() for n, p in base.named_parameters() if p.requires_grad}  # SGD, lr 1
    base.zero_grad(set_to_none=True)
    assert any(d.abs().max() > 0 for d in expected.values())
    # The mistake this test guards against, a mean per row (per micro-batch) averaged over the 4 rows, is far
    # outside the float32 tolerance used below:
    for i in range(4):
        (train.answer_only_loss(base, collator([tokenized[i]])) / 4).backward()
    per_row_mean = {n: -p.grad.clone() for n, p in base.named_parameters() if p.requires_grad}
    base.zero_grad(set_to_none=True)
    assert max(float32_relative_error(per_row_mean[n], expected[n]) for n in expected) > 30 * FLOAT32_SUM_RTOL

    for micro in (4, 1):
        model = copy.deepcopy(base)
        args = train.training_arguments(tmp_path / f"m{micro}", per_device_train_batch_size=micro,
                                        gradient_accumulation_steps=4 // micro, max_steps=1, optim="sgd",
                                        learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0,
                                        max_grad_norm=0.0, save_strategy="no", report_to=[], use_cpu=True,
                                        seed=0, disable_tqdm=True)
        train.AnswerOnlyTrainer(model=model, args=args, train_dataset=tokenized, data_collator=collator).train()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert_float32_close(p.detach() - start[n], expected[n], f"{micro} per forward, {n}")
