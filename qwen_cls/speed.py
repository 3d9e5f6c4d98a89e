"""Measure what the fast paths save: timers, peak memory, and two one-cell comparisons for the notebooks.

* :func:`compare_loss_speed`: the recipe's loss (full-vocabulary logits at every position, the model's
  built-in loss) against :func:`qwen_cls.train.answer_only_loss`, forward + backward on the same batches.
* :func:`compare_eval_speed`: the recipe's prediction (``generate(max_new_tokens=512)`` one row at a time)
  against :func:`qwen_cls.evaluate.score_candidates` (all candidates of a batch, prompt KV cache shared).

With the tiny random model the ratios show mechanics only: it has learned nothing, never stops early
when generating, and its body is so small that the 151,936-way LM head dominates every step.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from contextlib import contextmanager

import torch

from .evaluate import score_candidates
from .prompt import build_messages
from .tokenize import fit_prompts, process_batch, stop_ids
from .train import answer_only_loss, padding_collator


def limit_malloc_caching() -> bool:
    """Make glibc hand large freed blocks back to the OS at once, so RSS tracks live CPU tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD = 64 KiB, fixed (no dynamic raise)
    except (OSError, AttributeError):
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or RSS sampled every ~0.5 ms on CPU."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.0005):
        self.device, self.interval, self.peak_bytes = torch.device(device), interval, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss_bytes()) - self._start
        return False


@contextmanager
def stopwatch(device: torch.device | str = "cpu"):
    """``with stopwatch() as t: ...`` then ``t["s"]`` holds the wall seconds (CUDA synchronised)."""
    cuda = torch.device(device).type == "cuda"
    result = {}
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield result
    if cuda:
        torch.cuda.synchronize()
    result["s"] = time.perf_counter() - start


@torch.inference_mode()
def per_row_generate(model, tokenizer, texts, categories, *, max_new_tokens: int = 512,
                     generated_counts: list | None = None) -> list[str]:
    """The recipe's prediction: chat template, ``model.generate(input_ids, max_new_tokens)`` per row, decode.

    ``generated_counts``, when given, receives the number of tokens generated for each row."""
    device = next(model.parameters()).device
    stop = stop_ids(tokenizer)
    answers = []
    for text, category in zip(texts, categories):
        prompt = tokenizer.apply_chat_template(build_messages(text, category), tokenize=False,
                                               add_generation_prompt=True)
        # the template already holds any BOS; stop where the family's turn ends (Qwen2 <|im_end|>, Gemma <end_of_turn>)
        model_inputs = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(device)
        generated = model.generate(model_inputs.input_ids, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                   pad_token_id=tokenizer.pad_token_id)
        generated = [out[len(inp):] for inp, out in zip(model_inputs.input_ids, generated)]
        if generated_counts is not None:
            generated_counts.append(len(generated[0]))
        answers.append(tokenizer.batch_decode(generated, skip_special_tokens=True)[0])
    return answers


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


def _full_logits_loss(model, batch, num_items_in_batch=None):
    return model(**batch, use_cache=False).loss  # the recipe: logits at every position, built-in loss


def compare_loss_speed(model, tokenizer, rows, *, max_length: int = 384, batch_size: int = 4,
                       batches: int = 2, repeats: int = 3, memory: bool = True) -> dict:
    """Seconds per batch (forward + backward) of the recipe's full-logits loss vs the answer-only loss.

    Both run on the same batches of ``rows`` (dicts with ``text``, ``category``, ``output``), alternating,
    after one warm-up each; the best of ``repeats`` is kept. Gradients are cleared afterwards.
    With ``memory``, one more untimed pass of each measures its peak memory (:class:`PeakMemory`, MiB):
    CUDA allocator peak, or on CPU peak RSS after :func:`limit_malloc_caching` (``None`` where that fails).
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
    methods = (("full_logits", _full_logits_loss), ("answer_only", answer_only_loss))
    try:
        for r in range(repeats + 1):
            for name, fn in methods:
                seconds = run(fn)
                if r:  # round 0 is the warm-up
                    times[name].append(seconds)
        if memory and (device.type == "cuda" or limit_malloc_caching()):
            for name, fn in methods:
                model.zero_grad(set_to_none=True)  # each pass starts without gradients held
                with PeakMemory(device) as mem:
                    run(fn)
                peak_mib[name] = mem.peak_bytes / 2**20
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    full, fast = min(times["full_logits"]), min(times["answer_only"])
    measured = peak_mib["full_logits"] is not None
    return {"full_logits_s_per_batch": full, "answer_only_s_per_batch": fast, "speedup": full / fast,
            "full_logits_peak_mib": peak_mib["full_logits"], "answer_only_peak_mib": peak_mib["answer_only"],
            "peak_memory": ("CUDA allocator" if device.type == "cuda" else "CPU RSS") if measured else None,
            "batch_size": batch_size, "batches": len(data), "backward": trains}


def compare_eval_speed(model, tokenizer, rows, *, max_length: int = 384, max_new_tokens: int = 512,
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

