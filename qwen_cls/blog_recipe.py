"""The blog's recipe, re-implemented faithfully: the baseline that notebooks 02-04 and ``benchmarks/`` measure against.

What it keeps from the recipe, on purpose, because it is what the benchmark measures:

* the per-row ``process_func`` with the tail cut ``[:MAX_LENGTH]`` (answer and end token lost on long rows),
  applied with non-batched ``dataset.map``;
* the *slow* tokenizer, one row at a time. transformers 5 ignores ``use_fast=False`` (``AutoTokenizer``
  pops it and always returns the Rust ``TokenizersBackend``), so :class:`SlowQwen2Tokenizer` is the
  transformers-4 ``Qwen2Tokenizer`` algorithm that ``use_fast=False`` used to give: NFC, the Qwen2
  pre-tokenize regex, byte-to-unicode, pure-Python BPE with a per-instance word cache, added tokens split
  first. It yields the same ids as the fast tokenizer (checked in ``tests/test_fast_paths.py``);
* ``enable_input_require_grads`` + ``get_peft_model`` + ``Trainer`` with
  ``DataCollatorForSeq2Seq(padding=True)``, the model's built-in loss over full-vocabulary logits;
* prediction by ``apply_chat_template`` + ``model.generate(input_ids, max_new_tokens=512)`` per row
  (:func:`per_row_generate`), and the loss over full-vocabulary logits (:func:`full_logits_loss`).

Taught in: 03, 04
"""

from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import regex
import torch

from .prompt import SYSTEM_PROMPT, build_messages, user_message
from .recipe import MAX_LENGTH
from .tokenization import stop_ids

PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class SlowQwen2Tokenizer:
    """Pure-Python Qwen2 byte-level BPE (the transformers-4 slow tokenizer's algorithm)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))  # vocab + merges + added
        self.encoder = spec["model"]["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        self.added = {t["content"]: t["id"] for t in spec["added_tokens"]}
        longest_first = sorted(self.added, key=len, reverse=True)
        self.added_split = regex.compile("(" + "|".join(regex.escape(t) for t in longest_first) + ")")
        self.pat = regex.compile(PRETOKENIZE_REGEX)
        self.byte_encoder = bytes_to_unicode()
        self.cache: dict[str, str] = {}
        self.pad_token_id = self.added["<|endoftext|>"]

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = set(zip(word, word[1:]))
        if not pairs:
            return token
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:]))
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.added_split.split(unicodedata.normalize("NFC", text)):
            if not piece:
                continue
            if piece in self.added:
                ids.append(self.added[piece])
                continue
            for token in self.pat.findall(piece):
                token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
                ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids = self.encode(text)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def seed_prompt(example_input: str) -> str:
    """The recipe's hand-written instruction string (identical to the chat template's rendering)."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{example_input}<|im_end|>\n"
            "<|im_start|>assistant\n")


def make_process_func(tokenizer, max_length: int = MAX_LENGTH):
    """The recipe's per-row process function, tail cut included."""

    def process_func(example):
        instruction = tokenizer(seed_prompt(example["input"]), add_special_tokens=False)
        response = tokenizer(f"{example['output']}", add_special_tokens=False)
        input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
        attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
        labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
        if len(input_ids) > max_length:
            input_ids = input_ids[:max_length]
            attention_mask = attention_mask[:max_length]
            labels = labels[:max_length]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return process_func


def seed_tokenize(dataset, tokenizer, max_length: int = MAX_LENGTH):
    """``dataset.map(process_func)``, non-batched, as the recipe does. Rows need ``input`` and ``output``."""
    if "input" not in dataset.column_names:
        dataset = dataset.map(lambda r: {"input": user_message(r["text"], r["category"])})
    return dataset.map(make_process_func(tokenizer, max_length), remove_columns=dataset.column_names)


def seed_lora_model(model):
    """``enable_input_require_grads`` then ``get_peft_model`` with the recipe's LoraConfig."""
    from peft import get_peft_model

    from .train import recipe_lora_config

    model.enable_input_require_grads()
    return get_peft_model(model, recipe_lora_config())


def seed_trainer(model, tokenizer, train_dataset, args):
    """The recipe's ``Trainer``: DataCollatorForSeq2Seq padding, model's own loss on full logits."""
    from transformers import DataCollatorForSeq2Seq, Trainer

    return Trainer(model=model, args=args, train_dataset=train_dataset,
                   data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True))


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


def full_logits_loss(model, batch, num_items_in_batch=None):
    """The recipe's loss: logits at every position over the whole vocabulary, the model's built-in loss."""
    return model(**batch, use_cache=False).loss
