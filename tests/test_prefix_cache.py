"""Prefix caching in candidate scoring: the prompt prefix every row shares runs once, and its KV cache serves
every row of a batch. The scores must be those of the uncached path, for both chat families."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_cls.data import read_raw_rows
from qwen_cls.evaluate import score_candidates, shared_prefix_length
from qwen_cls.model import load_model
from qwen_cls.tokenization import encode_prompts

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "test.jsonl"
# THUCNews-like headlines (short, like make demo's rows) with 2-5 candidates of different token lengths.
HEADLINES = [
    ("国足2比0战胜对手晋级世界杯决赛圈", ["Sports", "Finance"]),
    ("央行宣布下调存款准备金率0.5个百分点", ["Finance", "Stocks", "Politics"]),
    ("矿山生产消极 锌价5月有望反弹", ["Finance", "Society", "Politics", "Realty", "Stocks"]),
    ("巴基斯坦军事基地遭袭6死9伤", ["Politics", "Entertainment"]),
    ("周杰伦新专辑首周销量破百万", ["Entertainment", "Game", "Sports"]),
    ("北京二手房成交量连续三月下滑", ["Realty", "Finance"]),
    ("网游公司第三季度营收同比增长", ["Game", "Stocks", "Technology", "Finance"]),
]
# float32 sums over a few hundred dimensions, batched with different padding: ~1e-6 relative per layer;
# a total log-probability of -30 carries a few 1e-5 of rounding. 1e-4 leaves a margin, far below any
# difference a wrong position, mask or cache would make (those change scores by 0.1 or more).
ABS = 1e-4


def _rows():
    rows = [{"text": t, "category": c, "output": c[0]} for t, c in HEADLINES]
    sample = [r.to_dict() | {"output": r.output} for r in read_raw_rows(SAMPLE)][:5]  # long texts, cut to fit
    return rows + sample


def _first_forward_widths(model):
    """Record the token width of every forward that starts a batch (the prompt pass, not the candidates'), and of
    the prefix pass: the decoder calls that start from no cache or from the prefix cache alone. The candidates'
    pass starts from a cache holding the prefix and the row's own tokens."""
    calls = []

    def hook(_module, args, kwargs):
        ids, cache = kwargs.get("input_ids"), kwargs.get("cache")
        calls.append((ids.shape[0], ids.shape[1], cache.get_seq_length() if cache is not None else 0))

    class Widths(list):
        def finish(self):
            prefix = None  # the width of the latest prefix pass (one row, no cache; the tests' batches hold more)
            for rows, width, cached in calls:
                if cached == 0 or cached == prefix:
                    self.append(width)
                if rows == 1 and cached == 0:
                    prefix = width

    return Widths(), calls, model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def _check_same(model, tokenizer, rows, max_length, **kwargs):
    plain = score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=4, prefix_cache=False,
                             **kwargs)
    widths, _calls, handle = _first_forward_widths(model)
    try:
        cached = score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=4, **kwargs)
    finally:
        handle.remove()
    widths.finish()
    assert [s.prediction for s in cached] == [s.prediction for s in plain]
    for a, b in zip(cached, plain):
        assert a.scores.keys() == b.scores.keys()
        assert a.scores == pytest.approx(b.scores, abs=ABS)
        assert a.probabilities == pytest.approx(b.probabilities, abs=ABS)
    return widths


def test_shared_prefix_length_by_hand():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 8, 9], [7, 8, 9]]) == 2  # every row keeps one token of its own
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length([[5, 6, 7]]) == 2
    assert shared_prefix_length([]) == 0


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_prefix_cache_gives_the_uncached_scores(family, tiny_dir, gemma_dir):
    model, tokenizer = load_model(tiny_dir if family == "qwen2" else gemma_dir, device="cpu")
    rows = _rows()
    prompts = encode_prompts(tokenizer, [r["text"] for r in rows], [r["category"] for r in rows], 128)
    prefix = shared_prefix_length(prompts)
    # The shared prefix is the template's opening and the system message, up to the row's own text.
    assert tokenizer.decode(prompts[0][:prefix]).endswith("请输出文本内容的正确分类<|im_end|>\n<|im_start|>user\n文本:"
                                                          if family == "qwen2" else "请输出文本内容的正确分类\n\n文本")
    widths = _check_same(model, tokenizer, rows, 128)
    # Each batch's prompt pass ran only the rows' own tokens: the prefix came from the cache (one extra pass).
    # The rows are batched in order of prompt length (a stable sort: ties keep the file order).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    own = [max(len(prompts[i]) - prefix for i in order[s:s + 4]) for s in range(0, len(rows), 4)]
    assert widths == [prefix] + own


def test_rows_are_batched_by_prompt_length_and_come_back_in_their_order(tiny_dir):
    model, tokenizer = load_model(tiny_dir, device="cpu")
    rows = _rows()
    prompts = encode_prompts(tokenizer, [r["text"] for r in rows], [r["category"] for r in rows], 128)
    prefix = shared_prefix_length(prompts)
    assert sorted(map(len, prompts)) != [len(p) for p in prompts]  # the file order is not the length order
    passes, padded = {}, {}
    for by_length in (False, True):
        widths, _calls, handle = _first_forward_widths(model)
        try:
            passes[by_length] = score_candidates(model, tokenizer, rows, max_length=128, batch_size=4,
                                                 by_length=by_length)
        finally:
            handle.remove()
        widths.finish()
        order = sorted(range(len(rows)), key=lambda i: len(prompts[i])) if by_length else list(range(len(rows)))
        assert widths == [prefix] + [max(len(prompts[i]) - prefix for i in order[s:s + 4])
                                     for s in range(0, len(rows), 4)]
        padded[by_length] = sum(widths[1:])  # the tokens the batches' prompt passes ran, padding included
    assert padded[True] < padded[False]
    for a, b, row in zip(passes[True], passes[False], rows):  # each result is its own row's, in the rows' order
        assert a.scores.keys() == b.scores.keys() == set(row["category"])
        assert a.prediction == b.prediction
        assert a.scores == pytest.approx(b.scores, abs=ABS)


def test_prefix_cache_with_rag_examples(tiny_dir):
    model, tokenizer = load_model(tiny_dir, device="cpu")
    rows = _rows()
    examples = [[{"text": rows[(i + 1) % len(rows)]["text"], "label": rows[(i + 1) % len(rows)]["output"]}]
                for i in range(len(rows))]
    widths = _check_same(model, tokenizer, rows, 256, examples=examples)
    assert len(widths) == 1 + -(-len(rows) // 4)  # the prefix pass, then one prompt pass per batch


def test_gemma_sliding_window_falls_back_to_the_uncached_path(gemma_dir):
    """Padding between the prefix and a row's tokens moves keys apart in the cache; under Gemma 3's sliding
    window (512) that would hide keys the uncached path sees, so such batches run without the prefix cache."""
    model, tokenizer = load_model(gemma_dir, device="cpu")
    assert model.config.sliding_window == 512
    rows = [r.to_dict() | {"output": r.output} for r in read_raw_rows(SAMPLE)][1:2]  # a long text: ~600 tokens
    rows.append({"text": "短", "category": ["Sports", "Finance"], "output": "Sports"})  # pads the batch
    prompts = encode_prompts(tokenizer, [r["text"] for r in rows], [r["category"] for r in rows], 600)
    assert max(map(len, prompts)) > 512
    widths = _check_same(model, tokenizer, rows, 600)
    assert widths == [max(map(len, prompts))]  # no prefix pass: the whole prompts, as without the cache


def test_compare_prefix_cache_times_both_paths_alternately(tiny_dir):
    import math
    import time

    from qwen_cls.speed_comparison import compare_prefix_cache

    model, tokenizer = load_model(tiny_dir, device="cpu")
    rows = _rows()[:4]
    widths, _calls, handle = _first_forward_widths(model)
    start = time.perf_counter()
    try:
        got = compare_prefix_cache(model, tokenizer, rows, max_length=128, batch_size=2, pairs=2, warmup=False)
    finally:
        handle.remove()
    widths.finish()
    elapsed = time.perf_counter() - start
    prompts = encode_prompts(tokenizer, [r["text"] for r in rows], [r["category"] for r in rows], 128)
    prefix = shared_prefix_length(prompts)
    assert got["prefix_tokens"] == prefix and got["mean_prompt_tokens"] == sum(map(len, prompts)) / 4
    assert got["rows"] == 4 and got["pairs"] == 2 and got["same_predictions"] is True
    assert 0 <= got["max_abs_score_diff"] < ABS
    # uncached (2 batches of whole prompts), cached (prefix pass + 2 batches of own tokens), twice; the rows
    # batched in order of prompt length
    by_length = sorted(prompts, key=len)
    whole = [max(map(len, by_length[s:s + 2])) for s in (0, 2)]
    own = [max(len(p) - prefix for p in by_length[s:s + 2]) for s in (0, 2)]
    assert widths == (whole + [prefix] + own) * 2
    low, high = got["speedup_spread"]
    assert low <= got["speedup"] <= high and all(math.isfinite(x) and x > 0 for x in (low, high))
    assert 4 / got["uncached_rows_per_s"] + 4 / got["cached_rows_per_s"] <= elapsed
