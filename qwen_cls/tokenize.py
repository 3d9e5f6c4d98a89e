"""Token ids for training and scoring, with answer-preserving truncation.

The recipe appends the answer and then cuts ``[:MAX_LENGTH]``, which removes the answer and the end
token from every row longer than the cap. Here only the news *text* is shortened: the system message,
the candidate list, the answer and ``<|im_end|>`` always fit, so every row keeps its supervision.
The text budget of a row depends on its longest candidate (not on its answer), so the training prompt
and the inference prompt of a row are the same tokens.
"""

from __future__ import annotations

from .prompt import END_OF_TURN, SYSTEM_PROMPT, render_prompt

IGNORE_INDEX = -100


def label_ids(tokenizer, label: str) -> list[int]:
    """Token ids of a label as the assistant writes it (no special tokens)."""
    return tokenizer(label, add_special_tokens=False)["input_ids"]


def end_id(tokenizer) -> int:
    """Id of ``<|im_end|>``, the token that ends the assistant's answer."""
    return tokenizer.convert_tokens_to_ids(END_OF_TURN)


def answer_reserve(tokenizer, category: list[str]) -> int:
    """Room kept after the prompt: the longest candidate's tokens plus the end token."""
    return max(len(label_ids(tokenizer, c)) for c in category) + 1


def encode_prompts(tokenizer, texts, categories, max_length: int, system: str = SYSTEM_PROMPT) -> list[list[int]]:
    """Prompt ids per row, the text shortened so that prompt + longest candidate + end <= max_length."""
    budgets = [max_length - answer_reserve(tokenizer, c) for c in categories]
    cut_texts = list(texts)
    ids = _encode(tokenizer, cut_texts, categories, system)
    todo = [i for i, seq in enumerate(ids) if len(seq) > budgets[i]]
    if not todo:
        return ids
    text_offsets = tokenizer([texts[i] for i in todo], add_special_tokens=False, return_offsets_mapping=True)
    keep = {i: len(offs) for i, offs in zip(todo, text_offsets["offset_mapping"])}
    offsets = dict(zip(todo, text_offsets["offset_mapping"]))
    for _ in range(8):  # merges at the cut can shift a count by a token or two; converge in a few rounds
        for i in todo:
            keep[i] -= len(ids[i]) - budgets[i]
            if keep[i] < 1:
                raise ValueError(
                    f"max_length={max_length} leaves no room for the text: the system message, candidate list "
                    f"{categories[i]} and answer alone take {len(ids[i]) - len(offsets[i])}+ tokens; raise max_length"
                )
            cut_texts[i] = texts[i][: offsets[i][keep[i] - 1][1]]
        fresh = _encode(tokenizer, [cut_texts[i] for i in todo], [categories[i] for i in todo], system)
        for i, seq in zip(todo, fresh):
            ids[i] = seq
        todo = [i for i in todo if len(ids[i]) > budgets[i]]
        if not todo:
            return ids
    raise RuntimeError(f"could not fit rows {todo} into max_length={max_length}")


def _encode(tokenizer, texts, categories, system) -> list[list[int]]:
    prompts = [render_prompt(tokenizer, t, c, system) for t, c in zip(texts, categories)]
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
    prompts = encode_prompts(tokenizer, batch["text"], batch["category"], max_length, system)
    full = _encode(tokenizer, batch["text"], batch["category"], system)
    end = end_id(tokenizer)
    out = {k: [] for k in ("input_ids", "attention_mask", "labels", "length", "text_truncated",
                           "recipe_answer_cut", "recipe_answer_gone")}
    for prompt, whole, answer in zip(prompts, full, batch["output"]):
        answer_tokens = label_ids(tokenizer, answer)
        example = build_training_example(prompt, answer_tokens, end)
        for key, value in example.items():
            out[key].append(value)
        out["length"].append(len(example["input_ids"]))
        out["text_truncated"].append(len(prompt) < len(whole))
        out["recipe_answer_cut"].append(len(whole) + len(answer_tokens) > max_length)
        out["recipe_answer_gone"].append(len(whole) >= max_length)
    return out


def tokenize_dataset(dataset, tokenizer, max_length: int, *, batch_size: int = 64, desc: str = "tokenize"):
    """Apply :func:`process_batch` with batched ``datasets.map``; drops the raw columns."""
    return dataset.map(
        process_batch,
        batched=True,
        batch_size=batch_size,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=dataset.column_names,
        desc=desc,
    )


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
