"""Token ids for training and scoring, with answer-preserving truncation.

The recipe appends the answer and then cuts ``[:MAX_LENGTH]``, which removes the answer and the end
token from every row longer than the cap. Here only the news *text* is shortened: the system message,
the candidate list, the answer and the end-of-turn token (``<|im_end|>`` for Qwen2, ``<end_of_turn>`` for
Gemma) always fit, so every row keeps its supervision.
The text budget of a row depends on its longest candidate (not on its answer), so the training prompt
and the inference prompt of a row are the same tokens.

Taught in: 02, 04, 05
"""

from __future__ import annotations

import weakref

from .prompt import (
    EXAMPLE_CHARS,
    SYSTEM_PROMPT,
    chat_family,
    example_pair,
    render_prompt,
    render_rag_prompt,
    shorten_example,
)

IGNORE_INDEX = -100
# A Qwen token covers at most this many characters of news text on average; clipping a text at this many
# characters per token of max_length leaves far more than max_length tokens to cut from.
CHARS_PER_TOKEN_BOUND = 4


_LABEL_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {label: ids}


def label_ids(tokenizer, label: str) -> list[int]:
    """Token ids of a label as the assistant writes it (no special tokens); cached per tokenizer, since
    the same few labels are looked up for every row."""
    cache = _LABEL_IDS.setdefault(tokenizer, {})
    if label not in cache:
        cache[label] = tokenizer(label, add_special_tokens=False)["input_ids"]
    return list(cache[label])


def end_id(tokenizer) -> int:
    """Id of the token that ends the assistant's answer: ``<|im_end|>`` (Qwen2), ``<end_of_turn>`` (Gemma)."""
    return tokenizer.convert_tokens_to_ids(chat_family(tokenizer).end_of_turn)


def stop_ids(tokenizer) -> list[int]:
    """Ids where free generation stops: the family's end of turn, then its end of text."""
    return tokenizer.convert_tokens_to_ids(list(chat_family(tokenizer).stop_tokens))


def answer_reserve(tokenizer, category: list[str]) -> int:
    """Room kept after the prompt: the longest candidate's tokens plus the end token."""
    return max(len(label_ids(tokenizer, c)) for c in category) + 1


def encode_prompts(tokenizer, texts, categories, max_length: int, system: str = SYSTEM_PROMPT,
                   examples=None) -> list[list[int]]:
    """Prompt ids per row, the text shortened so that prompt + longest candidate + end <= max_length.

    With ``examples`` (per row, a list of retrieved ``{text, label}`` examples) the RAG prompt is built
    instead: see :func:`encode_rag_prompts`.
    """
    if examples is not None:
        return encode_rag_prompts(tokenizer, texts, categories, examples, max_length, system)
    return fit_prompts(tokenizer, texts, categories, max_length, system)[0]


def fit_prompts(tokenizer, texts, categories, max_length: int, system: str = SYSTEM_PROMPT):
    """``(prompt_ids, cut_texts, full_lengths)``: :func:`encode_prompts`' ids, the texts as shortened, and
    each row's prompt length before shortening.

    One batched encode of the whole prompts (with character offsets) gives those lengths and where to cut
    each text; only the rows that are too long are encoded again, shortened. Texts longer than
    ``CHARS_PER_TOKEN_BOUND * max_length`` characters are first clipped to that many (the real data
    averages ~3.2k tokens a row, of which at most ``max_length`` survive): for such a row the reported
    length is that of the clipped prompt, which is still over ``max_length``, so every truncation flag
    stays exact.
    """
    budgets = [max_length - answer_reserve(tokenizer, c) for c in categories]
    limit = CHARS_PER_TOKEN_BOUND * max_length
    work = [t[:limit] for t in texts]
    prompts = [render_prompt(tokenizer, t, c, system) for t, c in zip(work, categories)]
    encoded = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    unclipped = [i for i, t in enumerate(texts) if len(t) > limit and len(ids[i]) < max_length]
    if unclipped:  # a clipped text that did not even reach max_length tokens: encode it whole after all
        again = tokenizer([render_prompt(tokenizer, texts[i], categories[i], system) for i in unclipped],
                          add_special_tokens=False, return_offsets_mapping=True)
        for k, i in enumerate(unclipped):
            work[i], ids[i], offsets[i] = texts[i], again["input_ids"][k], again["offset_mapping"][k]
    cut_texts = list(texts)
    full_lengths = [len(seq) for seq in ids]
    todo = [i for i, seq in enumerate(ids) if len(seq) > budgets[i]]
    if not todo:
        return ids, cut_texts, full_lengths
    start = render_prompt(tokenizer, "\x00", ["A", "B"], system).index("\x00")  # the text's first character
    # For each text token (one whose span ends inside the text), the text length that keeps it.
    text_ends = {i: [end - start for _, end in offsets[i] if start < end <= start + len(work[i])] for i in todo}
    keep = {i: len(text_ends[i]) for i in todo}
    for _ in range(8):  # merges at the cut can shift a count by a token or two; converge in a few rounds
        for i in todo:
            keep[i] -= len(ids[i]) - budgets[i]
            if keep[i] < 1:
                raise ValueError(
                    f"max_length={max_length} leaves no room for the text: the system message, candidate list "
                    f"{shown_labels(categories[i])} and answer alone take {len(ids[i]) - len(text_ends[i])}+ "
                    "tokens; raise max_length or shorten the candidates"
                )
            cut_texts[i] = texts[i][: text_ends[i][keep[i] - 1]]
        fresh = _encode(tokenizer, [cut_texts[i] for i in todo], [categories[i] for i in todo], system)
        for i, seq in zip(todo, fresh):
            ids[i] = seq
        todo = [i for i in todo if len(ids[i]) > budgets[i]]
        if not todo:
            return ids, cut_texts, full_lengths
    raise RuntimeError(f"could not fit rows {todo} into max_length={max_length}")


def shown_labels(labels, width: int = 40) -> str:
    """``labels`` as a message shows them: a label longer than ``width`` characters cut, with its length (a
    5000-character candidate would otherwise fill the message)."""
    return "[" + ", ".join(repr(label) if len(label) <= width else
                           f"{label[:width // 2]!r}... ({len(label)} characters)" for label in labels) + "]"


def _encode(tokenizer, texts, categories, system) -> list[list[int]]:
    prompts = [render_prompt(tokenizer, t, c, system) for t, c in zip(texts, categories)]
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def _water_fill(lengths: list[int], weights: list[float], room: int) -> list[int]:
    """Tokens kept per piece: ``min(length, weight * t)`` with the largest ``t`` whose total fits ``room``."""
    def kept(t):
        return [min(n, int(w * t)) for n, w in zip(lengths, weights)]

    low, high = 0.0, max(n / w for n, w in zip(lengths, weights)) + 1
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(kept(mid)) <= room else (low, mid)
    return kept(low)


def encode_rag_prompts(tokenizer, texts, categories, examples, max_length: int, system: str = SYSTEM_PROMPT, *,
                       query_weight: float = 2.0, example_chars: int = EXAMPLE_CHARS,
                       min_example_tokens: int = 8) -> list[list[int]]:
    """RAG prompt ids per row, shortened so that prompt + longest candidate + end <= max_length.

    Only texts are shortened, the query's and the examples' (each example first cut to ``example_chars``
    characters): the system message, the example labels, the candidate list and the answer always fit.
    The text room is shared by weighted water-filling, the query getting ``query_weight`` times an
    example's share. If an example would keep fewer than ``min_example_tokens`` tokens, the worst-ranked
    example is dropped instead; a row left without examples gets the plain prompt.
    """
    rows = []
    for ex_list in examples:
        pairs = [example_pair(e) for e in ex_list]
        rows.append([(shorten_example(t, example_chars), label) for t, label in pairs])
    ids = _encode_rag(tokenizer, texts, categories, rows, system, example_chars)
    for i, seq in enumerate(ids):
        budget = max_length - answer_reserve(tokenizer, categories[i])
        if len(seq) > budget:
            ids[i] = _fit_rag_row(tokenizer, texts[i], categories[i], rows[i], budget, max_length, system,
                                  query_weight, example_chars, min_example_tokens)
    return ids


def _fit_rag_row(tokenizer, text, category, exs, budget, max_length, system, query_weight, example_chars,
                 min_example_tokens) -> list[int]:
    exs = list(exs)
    while True:
        if not exs:  # the plain prompt, cut exactly as without RAG
            return encode_prompts(tokenizer, [text], [category], max_length, system)[0]
        pieces = [text] + [t for t, _ in exs]
        offsets = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        lengths = [len(o) for o in offsets]
        seq = _encode_rag(tokenizer, [text], [category], [exs], system, example_chars)[0]
        room = budget - (len(seq) - sum(lengths))
        weights = [query_weight] + [1.0] * len(exs)
        keep = _water_fill(lengths, weights, room)
        if keep[0] < 1 or any(k < min(n, min_example_tokens) for k, n in zip(keep[1:], lengths[1:])):
            exs.pop()  # too little room for this many examples: drop the worst-ranked one
            continue
        break
    for _ in range(8):  # merges at the cuts can shift counts by a token or two; converge in a few rounds
        cut = [p[: o[k - 1][1]] if k > 0 else "" for p, o, k in zip(pieces, offsets, keep)]
        seq = _encode_rag(tokenizer, [cut[0]], [category], [list(zip(cut[1:], [label for _, label in exs]))], system,
                          example_chars)[0]
        over = len(seq) - budget
        if over <= 0:
            return seq
        widest = max(range(len(keep)), key=lambda j: (keep[j] / weights[j], -j))  # the piece with most room
        keep[widest] = max(1, keep[widest] - over)
    raise RuntimeError(f"could not fit a RAG prompt into max_length={max_length}")


def _encode_rag(tokenizer, texts, categories, examples, system, example_chars) -> list[list[int]]:
    prompts = [render_rag_prompt(tokenizer, t, c, e, system, example_chars)
               for t, c, e in zip(texts, categories, examples)]
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def build_training_example(prompt_ids: list[int], answer_ids: list[int], end: int) -> dict:
    """input_ids = prompt + answer + end; labels are -100 on the prompt, so loss falls on the answer only."""
    input_ids = prompt_ids + answer_ids + [end]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [end],
    }


def process_batch(batch: dict, tokenizer, max_length: int, system: str = SYSTEM_PROMPT) -> dict:
    """Batched ``datasets.map`` function over rows with ``text``, ``category`` and ``output``.

    Besides the model inputs it records per row: ``length``, ``text_truncated``, and what the recipe's
    tail cut would have done: ``recipe_answer_cut`` (an answer token lost) and ``recipe_answer_gone``.
    """
    examples = batch["examples"] if "examples" in batch else None  # RAG training: retrieved examples per row
    if examples is None:  # the untruncated lengths come from the same encode that fits the prompts
        prompts, _, full = fit_prompts(tokenizer, batch["text"], batch["category"], max_length, system)
    else:
        prompts = encode_prompts(tokenizer, batch["text"], batch["category"], max_length, system, examples=examples)
        full = [len(s) for s in _encode_rag(tokenizer, batch["text"], batch["category"], examples, system,
                                            EXAMPLE_CHARS)]
    end = end_id(tokenizer)
    out = {k: [] for k in ("input_ids", "attention_mask", "labels", "length", "text_truncated",
                           "recipe_answer_cut", "recipe_answer_gone")}
    for prompt, whole, answer in zip(prompts, full, batch["output"]):
        answer_tokens = label_ids(tokenizer, answer)
        example = build_training_example(prompt, answer_tokens, end)
        for key, value in example.items():
            out[key].append(value)
        out["length"].append(len(example["input_ids"]))
        out["text_truncated"].append(len(prompt) < whole)
        out["recipe_answer_cut"].append(whole + len(answer_tokens) > max_length)
        out["recipe_answer_gone"].append(whole >= max_length)
    return out


def tokenize_dataset(dataset, tokenizer, max_length: int, *, batch_size: int = 64, desc: str = "tokenize"):
    """Apply :func:`process_batch` with batched ``datasets.map``; drops the raw columns.

    The cache fingerprint is derived cheaply from the dataset's and the tokenizer's identity: left to
    itself ``datasets`` pickles and hashes the whole tokenizer, which costs more than the tokenizing.
    """
    return dataset.map(
        process_batch,
        batched=True,
        batch_size=batch_size,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=dataset.column_names,
        desc=desc,
        new_fingerprint=_map_fingerprint(dataset, tokenizer, max_length),
    )


def _map_fingerprint(dataset, tokenizer, max_length: int) -> str:
    import hashlib

    parts = [getattr(dataset, "_fingerprint", ""), getattr(tokenizer, "name_or_path", ""), len(tokenizer),
             str(tokenizer.chat_template), max_length, SYSTEM_PROMPT, "process_batch-v1"]
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


def truncation_report(tokenized) -> dict:
    """Counts over a tokenized dataset: rows, text shortened, and rows the recipe's cut would have hurt."""
    n = len(tokenized)
    return {
        "rows": n,
        "text_truncated": int(sum(tokenized["text_truncated"])),
        "recipe_answer_cut": int(sum(tokenized["recipe_answer_cut"])),
        "recipe_answer_gone": int(sum(tokenized["recipe_answer_gone"])),
        "max_length_seen": int(max(tokenized["length"])) if n else 0,
    }
