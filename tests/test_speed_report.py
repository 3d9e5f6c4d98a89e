"""What the notebooks' speed cells print: peak memory per loss, and how many tokens ``generate`` wrote."""

from __future__ import annotations

import pytest
from conftest import SAMPLE

from qwen_cls import data
from qwen_cls.model import load_model
from qwen_cls.tokenization import process_batch
from qwen_cls.train import padding_collator, prepare_lora_model, recipe_lora_config

MAX_LENGTH = 96
VOCAB = 151_936  # Qwen2's LM head width, the tiny model's too


@pytest.fixture(scope="module")
def rows():
    return [r.to_dict() for r in data.read_raw_rows(SAMPLE / "train.jsonl")][:4]


@pytest.mark.slow
def test_loss_speed_reports_peak_memory_of_each_loss(tiny_dir, rows):
    from qwen_cls.speed_comparison import compare_loss_speed

    model, tokenizer = load_model(tiny_dir, device="cpu")
    model = prepare_lora_model(model, recipe_lora_config(), gradient_checkpointing=False)  # as in notebook 03
    result = compare_loss_speed(model, tokenizer, rows, max_length=MAX_LENGTH, batch_size=2, batches=1, repeats=1)
    assert result["peak_memory"] == "tensor bytes"  # TensorMemory, as `make bench` counts (not sampled RSS)
    # The recipe's loss holds float32 logits for every position of the padded batch: 2 x width x vocab x 4 bytes.
    encoded = process_batch({k: [r[k] for r in rows[:2]] for k in ("text", "category", "output")}, tokenizer,
                            MAX_LENGTH)
    width = padding_collator(tokenizer)([{k: encoded[k][i] for k in ("input_ids", "attention_mask", "labels")}
                                         for i in range(2)])["input_ids"].shape[1]
    logits_mib = 2 * width * VOCAB * 4 / 2**20
    assert result["full_logits_peak_mib"] >= 0.9 * logits_mib
    # With LoRA nothing vocabulary-sized gets a gradient: answer-only keeps a few rows of logits at most.
    assert result["answer_only_peak_mib"] < result["full_logits_peak_mib"] / 4
    # ... but not zero, as sampled RSS reported it: the answer rows' logits (vocab x 4 bytes each) are counted.
    assert result["answer_only_peak_mib"] >= VOCAB * 4 / 2**20
    assert not any(p.grad is not None for p in model.parameters())  # gradients cleared afterwards

    no_memory = compare_loss_speed(model, tokenizer, rows, max_length=MAX_LENGTH, batch_size=2, batches=1,
                                   repeats=1, memory=False)
    assert no_memory["peak_memory"] is None and no_memory["full_logits_peak_mib"] is None


def test_eval_speed_reports_generated_token_counts(tiny_dir, rows):
    from qwen_cls.speed_comparison import compare_eval_speed

    model, tokenizer = load_model(tiny_dir, device="cpu")
    result = compare_eval_speed(model, tokenizer, rows[:2], max_length=MAX_LENGTH, max_new_tokens=5)
    assert result["rows"] == 2 and len(result["generated_tokens"]) == 2
    assert all(1 <= n <= 5 for n in result["generated_tokens"])
    assert model.training is False  # load_model's eval mode is restored
