"""The fast paths give the same answers as the straightforward ones; the seed baseline is faithful."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_cls.data import read_raw_rows
from qwen_cls.evaluate import score_candidates, score_candidates_reference
from qwen_cls.model import load_model, resolve_model
from qwen_cls.tokenize import IGNORE_INDEX, encode_prompts, fit_prompts, process_batch, tokenize_dataset
from qwen_cls.train import answer_only_loss, padding_collator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.seed_recipe import SlowQwen2Tokenizer, make_process_func  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "test.jsonl"


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny", device="cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def rows():
    return [r.to_dict() | {"output": r.output} for r in read_raw_rows(SAMPLE)][:12]


@pytest.mark.slow
def test_fast_scoring_matches_reference_on_sample_data(tiny, rows):
    model, tokenizer = tiny
    fast = score_candidates(model, tokenizer, rows, max_length=128, batch_size=5)
    slow = score_candidates_reference(model, tokenizer, rows, max_length=128)
    assert [f.prediction for f in fast] == [s.prediction for s in slow]
    for f, s, row in zip(fast, slow, rows):
        assert list(f.scores) == row["category"]
        for label in row["category"]:
            assert f.scores[label] == pytest.approx(s.scores[label], abs=2e-3)


def _manual_answer_loss(model, batch):
    """Mean cross-entropy of the answer tokens, from the plain forward's full logits, by hand."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for b in range(batch["labels"].shape[0]):
        for t in range(1, batch["labels"].shape[1]):
            target = int(batch["labels"][b, t])
            if target != IGNORE_INDEX:
                total -= float(logp[b, t - 1, target])
                count += 1
    return total / count, count


def test_answer_only_loss_equals_full_logits_loss(tiny, rows):
    model, tokenizer = tiny
    fields = {k: [r[k] for r in rows[:3]] for k in ("text", "category", "output")}
    encoded = process_batch(fields, tokenizer, 96)
    feats = [{k: encoded[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(3)]
    batch = padding_collator(tokenizer)(feats)
    expected, count = _manual_answer_loss(model, batch)
    answer_tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1 for o in fields["output"])
    assert count == answer_tokens  # every answer token and its <|im_end|> is supervised
    with torch.no_grad():
        fast = answer_only_loss(model, batch)
        builtin = model(**batch).loss  # the recipe's way: full logits, model's own loss
    assert float(fast) == pytest.approx(expected, rel=1e-4)
    assert float(builtin) == pytest.approx(expected, rel=1e-4)


def test_answer_only_loss_gradients_match_full_logits():
    from qwen_cls.train import prepare_lora_model, recipe_lora_config
    from transformers import AutoModelForCausalLM

    folder = resolve_model("tiny")
    torch.manual_seed(0)
    model = prepare_lora_model(AutoModelForCausalLM.from_pretrained(str(folder)), recipe_lora_config(lora_dropout=0.0),
                               gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 151643, 151643]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[-100, -100, -100, -100, 9, 10], [-100, -100, 13, 14, -100, -100]])}
    answer_only_loss(model, batch).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-7)


def test_slow_tokenizer_gives_the_fast_tokenizers_ids(tiny, rows):
    _, tokenizer = tiny
    slow = SlowQwen2Tokenizer(resolve_model("tiny"))
    texts = [r["text"][:400] for r in rows[:4]] + ["Hello world's 2024\r\n\n  x", "<|im_start|>user\n文本<|im_end|>"]
    for text in texts:
        assert slow(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_seed_process_func_cuts_the_tail():
    slow = SlowQwen2Tokenizer(resolve_model("tiny"))
    row = {"input": "文本:" + "新闻" * 300 + ",分类选项列表:['Art', 'Sports']", "output": "Sports"}
    out = make_process_func(slow, 64)(row)
    assert len(out["input_ids"]) == 64
    assert out["labels"] == [-100] * 64  # the answer is gone: the recipe's bug, kept in the baseline


def test_fit_prompts_reports_cut_texts_and_full_lengths(tiny, rows):
    _, tokenizer = tiny
    texts, cats = [r["text"] for r in rows[:4]], [r["category"] for r in rows[:4]]
    ids, cut, full = fit_prompts(tokenizer, texts, cats, 100)
    assert ids == encode_prompts(tokenizer, texts, cats, 100)
    untruncated = encode_prompts(tokenizer, texts, cats, 100_000)
    assert full == [len(u) for u in untruncated]
    assert encode_prompts(tokenizer, cut, cats, 100_000) == ids  # the cut text alone gives the same prompt


def test_tokenize_dataset_matches_process_batch(tiny, rows):
    from datasets import Dataset

    _, tokenizer = tiny
    ds = Dataset.from_list(rows[:5])
    mapped = tokenize_dataset(ds, tokenizer, 96)
    direct = process_batch({k: [r[k] for r in rows[:5]] for k in ("text", "category", "output")}, tokenizer, 96)
    assert mapped["input_ids"] == direct["input_ids"]
    assert mapped["recipe_answer_gone"] == direct["recipe_answer_gone"]
    assert tokenize_dataset(ds, tokenizer, 96)._fingerprint == mapped._fingerprint
    assert tokenize_dataset(ds, tokenizer, 80)._fingerprint != mapped._fingerprint


def test_peak_memory_sees_a_large_allocation():
    from qwen_cls.speed import PeakMemory, limit_malloc_caching

    limit_malloc_caching()
    with PeakMemory() as mem:
        block = torch.ones(50_000_000)  # 200 MB
        del block
    assert mem.peak_bytes >= 150 * 2**20


def test_speed_helpers_return_ratios(tiny, rows):
    from qwen_cls.speed import compare_eval_speed, compare_loss_speed

    model, tokenizer = tiny
    loss = compare_loss_speed(model, tokenizer, rows[:4], max_length=96, batch_size=2, batches=1, repeats=1)
    assert loss["speedup"] == pytest.approx(loss["full_logits_s_per_batch"] / loss["answer_only_s_per_batch"])
    ev = compare_eval_speed(model, tokenizer, rows[:2], max_length=96, max_new_tokens=4)
    assert ev["rows"] == 2 and ev["speedup"] > 0


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_with_tiny_shape(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--out", str(tmp_path), "--steps", "1",
           "--warmup", "1", "--big-batch-size", "2", "--eval-rows", "2", "--seed-eval-rows", "1",
           "--max-new-tokens", "2", "--max-length", "96"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["shape"] == "tiny" and result["card"] == "cpu"
    raw = result["raw"]
    assert result["train_speedup"] == pytest.approx(raw["project"]["samples_per_s"] / raw["seed"]["samples_per_s"])
    assert raw["eval"]["seed_mean_generated_tokens"] <= 2
