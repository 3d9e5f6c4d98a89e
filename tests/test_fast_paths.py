"""The fast paths give the same answers as the straightforward ones; the seed baseline is faithful."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qwen_cls.data import read_raw_rows
from qwen_cls.evaluate import score_candidates
from qwen_cls.model import load_model, resolve_model
from qwen_cls.tokenization import (
    CHARS_PER_TOKEN_BOUND,
    IGNORE_INDEX,
    encode_prompts,
    fit_prompts,
    process_batch,
    tokenize_dataset,
)
from qwen_cls.train import answer_only_loss, padding_collator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _reference import assert_float32_close, score_candidates_reference  # noqa: E402

from qwen_cls.blog_recipe import SlowQwen2Tokenizer, make_process_func  # noqa: E402

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
    from transformers import AutoModelForCausalLM

    from qwen_cls.train import prepare_lora_model, recipe_lora_config

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
            assert_float32_close(fast[n], p.grad, n)


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
    for text, length, whole in zip(texts, full, untruncated):
        if len(text) <= CHARS_PER_TOKEN_BOUND * 100:
            assert length == len(whole)
        else:  # clipped before encoding: the reported length is still over max_length, and a lower bound
            assert 100 <= length <= len(whole)
    assert any(len(t) > CHARS_PER_TOKEN_BOUND * 100 for t in texts)  # the clipped path is exercised
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
    from qwen_cls.measure import PeakMemory, limit_malloc_caching

    limit_malloc_caching()
    with PeakMemory() as mem:
        block = torch.ones(50_000_000)  # 200 MB
        del block
    assert mem.peak_bytes >= 150 * 2**20


def _lm_head_rows(model):
    """Attach a forward hook to the LM head that records how many hidden-state rows each call projects."""
    head = model.get_output_embeddings()
    rows: list[int] = []
    handle = head.register_forward_hook(lambda mod, args, out: rows.append(args[0].numel() // head.in_features))
    return rows, handle


def test_loss_speed_times_both_paths_and_answer_only_projects_only_answer_rows(tiny, rows):
    import math
    import time

    from qwen_cls.speed_comparison import compare_loss_speed

    model, tokenizer = tiny
    fields = {k: [r[k] for r in rows[:4]] for k in ("text", "category", "output")}
    encoded = process_batch(fields, tokenizer, 96)
    collate = padding_collator(tokenizer)
    batches = [collate([{k: encoded[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in (j, j + 1)])
               for j in (0, 2)]
    full_rows = [b["input_ids"].numel() for b in batches]  # the recipe: every (padded) position
    # Answer tokens by hand: the label's tokens plus <|im_end|>, for the two rows of each batch.
    answer_tokens = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1 for o in fields["output"]]
    answer_rows = [answer_tokens[j] + answer_tokens[j + 1] for j in (0, 2)]
    assert all(a < f for a, f in zip(answer_rows, full_rows))

    seen, handle = _lm_head_rows(model)
    start = time.perf_counter()
    try:
        result = compare_loss_speed(model, tokenizer, rows[:4], max_length=96, batch_size=2, batches=2, repeats=1,
                                    memory=False)
    finally:
        handle.remove()
    elapsed = time.perf_counter() - start
    # Warm-up round + one timed round, each: full logits on both batches, then answer-only on both.
    assert seen == (full_rows + answer_rows) * 2
    assert result["batches"] == 2 and result["batch_size"] == 2 and result["backward"] is True
    full, fast = result["full_logits_s_per_batch"], result["answer_only_s_per_batch"]
    assert all(math.isfinite(x) and x > 0 for x in (full, fast, result["speedup"]))
    assert (full + fast) * result["batches"] <= elapsed  # the timed round fits inside the call's own wall time
    assert result["full_logits_peak_mib"] is None and result["peak_memory"] is None  # memory=False


def test_eval_speed_times_both_paths_on_every_row(tiny, rows):
    import math
    import time

    from qwen_cls.speed_comparison import compare_eval_speed

    model, tokenizer = tiny
    start = time.perf_counter()
    ev = compare_eval_speed(model, tokenizer, rows[:2], max_length=96, max_new_tokens=4)
    elapsed = time.perf_counter() - start
    assert ev["rows"] == 2 and ev["max_new_tokens"] == 4
    assert len(ev["generated_tokens"]) == 2 and all(1 <= n <= 4 for n in ev["generated_tokens"])
    slow, fast = ev["per_row_generate_s_per_row"], ev["batched_scoring_s_per_row"]
    assert all(math.isfinite(x) and x > 0 for x in (slow, fast, ev["speedup"]))
    assert (slow + fast) * ev["rows"] <= elapsed  # both timed passes fit inside the call's own wall time


TINY_D, TINY_LAYERS, VOCAB = 64, 2, 151936
# benchmarks/gpu.py's --tiny shape by hand: q, o 64x64; k, v 64x32 (2 KV heads of 16); gate, up, down 64x176.
TINY_FROZEN = TINY_LAYERS * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176)
# LoRA r=8 on those seven projections: r * (in + out) each.
TINY_LORA = TINY_LAYERS * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 176))


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_with_tiny_shape(tmp_path, monkeypatch):
    """gpu.py --tiny in-process with a made-up peak of 1 TFLOP/s: its FLOPs/MFU match the README formula by hand."""
    from datasets import Dataset

    from benchmarks import gpu
    from benchmarks.rows import synth_rows
    from qwen_cls.blog_recipe import seed_tokenize
    from qwen_cls.model import load_tokenizer
    from qwen_cls.model_builds.tiny import qwen_tokenizer_dir
    from qwen_cls.prompt import QWEN2_CHAT_TEMPLATE

    peak = 1e12
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(gpu, "peak_flops", lambda device: ("cpu", peak))
    assert gpu.main(["--tiny", "--out", str(tmp_path), "--steps", "1", "--warmup", "1", "--batch-size", "4",
                     "--big-batch-size", "2", "--eval-rows", "2", "--seed-eval-rows", "1", "--max-new-tokens", "2",
                     "--max-length", "96"]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert {"card", "peak_bf16_flops", "dtype", "shape", "train_speedup", "train_peak_mem_ratio", "eval_speedup",
            "eval_speedup_vs_batched_generate", "raw", "setup"} <= set(result)
    assert result["shape"] == "tiny" and result["card"] == "cpu" and result["peak_bf16_flops"] == peak
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_bench.json"]  # no temp file left
    raw = result["raw"]

    # The timed step is batch 1 (after one warm-up batch): rows bs..2*bs-1 of each path's tokenized rows.
    tokenizer = load_tokenizer(qwen_tokenizer_dir())
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    ds = Dataset.from_list(synth_rows(64))
    tokenized = {"seed": seed_tokenize(ds, tokenizer, 96), "project": tokenize_dataset(ds, tokenizer, 96)}
    for name, source, bs in (("seed", "seed", 4), ("project", "project", 4),
                             ("project_big_batch_no_ckpt", "project", 2)):
        r = raw[name]
        timed = [tokenized[source][i] for i in range(bs, 2 * bs)]
        lengths = [len(t["input_ids"]) for t in timed]
        if source == "seed":  # full logits: the LM head at every padded position
            heads = bs * max(lengths)
        else:  # answer-only: the positions whose next token is supervised
            heads = sum(sum(1 for label in t["labels"][1:] if label != IGNORE_INDEX) for t in timed)
        attention = sum(12 * TINY_LAYERS * TINY_D * s * s for s in lengths)
        flops = sum(lengths) * (4 * TINY_FROZEN + 6 * TINY_LORA) + attention + heads * 4 * TINY_D * VOCAB
        assert r["seconds"] > 0 and r["batch_size"] == bs
        assert r["samples_per_s"] * r["seconds"] == pytest.approx(bs)
        assert r["tokens_per_s"] * r["seconds"] == pytest.approx(sum(lengths))
        assert r["mfu"] * peak * r["seconds"] == pytest.approx(flops, rel=1e-9), name
    assert raw["project"]["gradient_checkpointing"] and not raw["project_big_batch_no_ckpt"]["gradient_checkpointing"]
    ev = raw["eval"]
    assert 1 <= ev["seed_mean_generated_tokens"] <= 2
    assert result["train_speedup"] == pytest.approx(raw["project"]["samples_per_s"] / raw["seed"]["samples_per_s"])
    assert result["train_peak_mem_ratio"] == pytest.approx(raw["project"]["peak_mem_mb"] / raw["seed"]["peak_mem_mb"])
    assert result["eval_speedup"] == pytest.approx(ev["project_scoring_rows_per_s"] / ev["seed_generate_rows_per_s"])
    assert result["eval_speedup_vs_batched_generate"] == pytest.approx(
        ev["project_scoring_rows_per_s"] / ev["batched_generate_rows_per_s"])


def test_tensor_memory_counts_live_tensor_bytes_not_views_or_old_tensors():
    from qwen_cls.measure import TensorMemory

    weights = torch.ones(1000)  # exists before: never counted
    with TensorMemory() as mem:
        a = torch.zeros(1000, dtype=torch.float32)  # 4,000 bytes
        b = torch.zeros(500, dtype=torch.float64)  # 4,000 bytes: 8,000 live
        view = a.view(10, 100)  # shares a's storage: nothing new
        a.add_(1)  # in place: nothing new
        _ = weights[:10]  # a view of an old tensor: nothing new
        assert mem.live_bytes == 8_000
        del a, view  # 4,000 freed
        c = b * 2  # 4,000 more: 8,000 live again, peak still 8,000
        assert mem.live_bytes == 8_000
        d = torch.zeros(3000, dtype=torch.int16)  # 6,000: 14,000 live, the peak
        del b, c, d
    assert (mem.peak_bytes, mem.live_bytes) == (14_000, 0)


def test_tensor_memory_counts_what_backward_allocates():
    from qwen_cls.measure import TensorMemory

    x = torch.ones(100, 10, requires_grad=True)
    with TensorMemory() as mem:
        y = (x * 3).sum()  # x * 3: 4,000 bytes, freed once sum has used it (sum saves no input); y: 4 bytes
        y.backward()  # the seed gradient (4 bytes, freed) and x.grad (4,000 bytes, kept)
    assert torch.equal(x.grad, torch.full((100, 10), 3.0))
    assert mem.live_bytes == 4 + 4_000  # y and x.grad
    assert mem.peak_bytes == 4 + 4 + 4_000  # y, the seed gradient, x.grad
