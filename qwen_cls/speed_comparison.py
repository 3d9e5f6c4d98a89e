"""One-cell comparisons for the notebooks: the blog's recipe against this project's path, on the same rows.

* :func:`compare_loss_speed`: the recipe's loss (full-vocabulary logits at every position, the model's
  built-in loss) against :func:`qwen_cls.train.answer_only_loss`, forward + backward on the same batches.
* :func:`compare_eval_speed`: the recipe's prediction (``generate(max_new_tokens=512)`` one row at a time)
  against :func:`qwen_cls.evaluate.score_candidates` (all candidates of a batch, prompt KV cache shared).
* :func:`compare_prefix_cache`: candidate scoring with and without the shared-prefix KV cache.

With the tiny random model the ratios show mechanics only: it has learned nothing, never stops early
when generating, and its body is so small that the 151,936-way LM head dominates every step.
``benchmarks/`` holds the full benchmarks.

Taught in: 03, 04
"""

from __future__ import annotations

import statistics

import torch

from .blog_recipe import full_logits_loss, per_row_generate
from .evaluate import score_candidates, shared_prefix_length
from .measure import PeakMemory, TensorMemory, stopwatch
from .recipe import MAX_LENGTH
from .tokenization import encode_prompts, fit_prompts, process_batch
from .train import answer_only_loss, padding_collator


def _batches(model, tokenizer, rows, max_length, batch_size, count):
    fields = {"text": [r["text"] for r in rows], "category": [list(r["category"]) for r in rows],
              "output": [r["output"] for r in rows]}
    encoded = process_batch(fields, tokenizer, max_length)
    collate = padding_collator(tokenizer)
    device = next(model.parameters()).device
    out = []
    for start in range(0, min(len(rows), batch_size * count), batch_size):
        feats = [{k: encoded[k][i] for k in ("input_ids", "attention_mask", "labels")}
                 for i in range(start, min(start + batch_size, len(rows)))]
        out.append({k: v.to(device) for k, v in collate(feats).items()})
    return out


def compare_loss_speed(model, tokenizer, rows, *, max_length: int = MAX_LENGTH, batch_size: int = 4,
                       batches: int = 2, repeats: int = 3, memory: bool = True) -> dict:
    """Seconds per batch (forward + backward) of the recipe's full-logits loss vs the answer-only loss.

    Both run on the same batches of ``rows`` (dicts with ``text``, ``category``, ``output``), alternating,
    after one warm-up each; the best of ``repeats`` is kept. Gradients are cleared afterwards.
    With ``memory``, one more untimed pass of each measures its peak memory in MiB, above the level at entry: the
    CUDA allocator's peak (:class:`PeakMemory`), or on CPU the bytes of tensors alive at once (:class:`TensorMemory`,
    what ``make bench`` counts; exact, where sampled RSS misses short allocations). Without ``memory`` the memory
    fields are ``None``: a figure that was not measured is never reported.
    """
    data = _batches(model, tokenizer, rows, max_length, batch_size, batches)
    device = next(model.parameters()).device
    trains = any(p.requires_grad for p in model.parameters())
    was_training = model.training
    model.train(trains)

    def run(loss_fn):
        with torch.enable_grad(), stopwatch(device) as t:
            for batch in data:
                loss = loss_fn(model, batch)
                if trains:
                    loss.backward()
        return t["s"] / len(data)

    times = {"full_logits": [], "answer_only": []}
    peak_mib = {"full_logits": None, "answer_only": None}
    methods = (("full_logits", full_logits_loss), ("answer_only", answer_only_loss))
    try:
        for r in range(repeats + 1):
            for name, fn in methods:
                seconds = run(fn)
                if r:  # round 0 is the warm-up
                    times[name].append(seconds)
        if memory:
            for name, fn in methods:
                model.zero_grad(set_to_none=True)  # each pass starts without gradients held
                with PeakMemory(device) if device.type == "cuda" else TensorMemory() as mem:
                    run(fn)
                peak_mib[name] = mem.peak_bytes / 2**20 if mem.peak_bytes > 0 else None  # 0: nothing was counted
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    full, fast = min(times["full_logits"]), min(times["answer_only"])
    measured = None not in peak_mib.values()
    if not measured:
        peak_mib = dict.fromkeys(peak_mib)
    return {"full_logits_s_per_batch": full, "answer_only_s_per_batch": fast, "speedup": full / fast,
            "full_logits_peak_mib": peak_mib["full_logits"], "answer_only_peak_mib": peak_mib["answer_only"],
            "peak_memory": ("CUDA allocator" if device.type == "cuda" else "tensor bytes") if measured else None,
            "batch_size": batch_size, "batches": len(data), "backward": trains}


def compare_eval_speed(model, tokenizer, rows, *, max_length: int = MAX_LENGTH, max_new_tokens: int = 512,
                       batch_size: int = 8) -> dict:
    """Seconds per row: the recipe's per-row ``generate`` vs batched candidate scoring, same prompts.

    Both see the same prompt tokens (the project's shortened text), so only the method differs.
    ``generated_tokens`` lists how many tokens ``generate`` wrote per row (``max_new_tokens`` when it never stopped).
    """
    device = next(model.parameters()).device
    texts = [r["text"] for r in rows]
    cats = [list(r["category"]) for r in rows]
    _, cut_texts, _ = fit_prompts(tokenizer, texts, cats, max_length)  # the text as the project cut it
    was_training = model.training
    model.eval()
    try:
        score_candidates(model, tokenizer, rows[:1], max_length=max_length)  # warm-up
        per_row_generate(model, tokenizer, cut_texts[:1], cats[:1], max_new_tokens=2)
        counts: list[int] = []
        with stopwatch(device) as slow:
            per_row_generate(model, tokenizer, cut_texts, cats, max_new_tokens=max_new_tokens, generated_counts=counts)
        with stopwatch(device) as fast:
            score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=batch_size)
    finally:
        model.train(was_training)
    n = len(rows)
    return {"per_row_generate_s_per_row": slow["s"] / n, "batched_scoring_s_per_row": fast["s"] / n,
            "speedup": slow["s"] / fast["s"], "rows": n, "max_new_tokens": max_new_tokens,
            "generated_tokens": counts}


def compare_prefix_cache(model, tokenizer, rows, *, max_length: int = MAX_LENGTH, batch_size: int = 8,
                         pairs: int = 2, warmup: bool = True) -> dict:
    """Rows per second of candidate scoring with and without the shared-prefix KV cache, same rows.

    After one warm-up of each (on the first batch; ``warmup=False`` when the model has just scored), the two
    run alternately (uncached, cached, uncached, cached, ...), so a busy moment of the machine slows both sides
    alike; ``speedup`` is the median of the ``pairs`` per-pair
    ratios, ``speedup_spread`` their ``(min, max)``. ``max_abs_score_diff`` is the largest difference between
    the two paths' log-probability scores over every candidate of every row; ``same_predictions`` whether
    every row's prediction is the same. ``prefix_tokens``: the prompt tokens every row shares (run once with
    the cache); ``mean_prompt_tokens``: a row's prompt tokens on average.
    """
    device = next(model.parameters()).device
    prompts = encode_prompts(tokenizer, [r["text"] for r in rows], [list(r["category"]) for r in rows], max_length)
    was_training = model.training
    model.eval()

    def run(cached):
        with stopwatch(device) as t:
            scored = score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=batch_size,
                                      prefix_cache=cached)
        return t["s"], scored

    try:
        for cached in (False, True) if warmup else ():
            score_candidates(model, tokenizer, rows[:batch_size], max_length=max_length, batch_size=batch_size,
                             prefix_cache=cached)
        seconds = {False: [], True: []}
        for _ in range(pairs):
            for cached in (False, True):
                s, scored = run(cached)
                seconds[cached].append(s)
                if cached:
                    with_cache = scored
                else:
                    without = scored
    finally:
        model.train(was_training)
    ratios = sorted(u / c for u, c in zip(seconds[False], seconds[True]))
    n = len(rows)
    return {
        "uncached_rows_per_s": n / statistics.median(seconds[False]),
        "cached_rows_per_s": n / statistics.median(seconds[True]),
        "speedup": statistics.median(ratios), "speedup_spread": (ratios[0], ratios[-1]),
        "max_abs_score_diff": max(abs(a.scores[c] - b.scores[c])
                                  for a, b in zip(without, with_cache) for c in a.scores),
        "same_predictions": all(a.prediction == b.prediction for a, b in zip(without, with_cache)),
        "prefix_tokens": shared_prefix_length(prompts), "mean_prompt_tokens": sum(map(len, prompts)) / n,
        "rows": n, "pairs": pairs, "batch_size": batch_size,
    }
