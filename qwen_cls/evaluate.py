"""Classify with the model: score every candidate label, or let it write freely.

Scoring: the prediction is the candidate whose tokens (every token, plus the end-of-turn token) have the
highest total log-probability after the prompt, so every prediction is one of the row's candidates.
The prompt is run once per row; its KV cache is then shared by all of that row's candidates.
Each candidate also gets a probability: the softmax of the total log-probabilities over the row's candidates
(:func:`candidate_softmax`), i.e. how the model splits its belief among these answers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .prompt import chat_family
from .recipe import MAX_LENGTH
from .tokenization import encode_prompts, end_id, label_ids, stop_ids


def candidate_softmax(scores: dict[str, float]) -> dict[str, float]:
    """``{candidate: probability}``: the softmax of the scores over the candidates (sums to 1).

    ``-inf`` scores get probability 0; when every score is ``-inf`` the candidates share it equally.
    """
    if not scores:
        return {}
    top = max(scores.values())
    if top == float("-inf"):
        return {label: 1 / len(scores) for label in scores}
    weights = {label: math.exp(value - top) for label, value in scores.items()}  # shifted: no overflow
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


@dataclass
class Scored:
    """A scored row: the winning candidate, each candidate's total log-probability, and their softmax over
    the row's candidates (``probabilities``, filled from ``scores`` when not given)."""

    prediction: str | None  # None: no answer (a classifier that knows none of the row's candidates)
    scores: dict[str, float] = field(default_factory=dict)
    probabilities: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not self.probabilities and self.scores:
            self.probabilities = candidate_softmax(self.scores)

    @property
    def confidence(self) -> float:
        """The winning candidate's probability (0 for no answer)."""
        return 0.0 if self.prediction is None else self.probabilities[self.prediction]


def _rows_fields(rows):
    texts = [r["text"] if isinstance(r, dict) else r.text for r in rows]
    cats = [list(r["category"] if isinstance(r, dict) else r.category) for r in rows]
    return texts, cats


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def score_candidates(model, tokenizer, rows, *, max_length: int = MAX_LENGTH, batch_size: int = 8,
                     progress: bool = False, examples=None) -> list[Scored]:
    """Score each row's candidates in batches, reusing the prompt's KV cache across candidates.

    ``examples``: per row, retrieved ``{text, label}`` examples for RAG prompts (see ``qwen_cls.rag``).
    """
    texts, cats = _rows_fields(rows)
    device = next(model.parameters()).device
    end, pad = end_id(tokenizer), tokenizer.pad_token_id
    results: list[Scored] = []
    for start in tqdm(range(0, len(rows), batch_size), desc="score", disable=not progress):
        b_cats = cats[start:start + batch_size]
        b_examples = examples[start:start + batch_size] if examples is not None else None
        prompts = encode_prompts(tokenizer, texts[start:start + batch_size], b_cats, max_length, examples=b_examples)
        ids, mask = _left_pad(prompts, pad, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each candidate's first token

        pair_row, pair_tokens = [], []
        for i, cands in enumerate(b_cats):
            for label in cands:
                pair_row.append(i)
                pair_tokens.append(label_ids(tokenizer, label) + [end])
        width = max(len(t) for t in pair_tokens)
        cand = torch.full((len(pair_tokens), width), pad, dtype=torch.long)
        cand_mask = torch.zeros_like(cand)
        for k, toks in enumerate(pair_tokens):
            cand[k, :len(toks)] = torch.tensor(toks)
            cand_mask[k, :len(toks)] = 1
        cand, cand_mask = cand.to(device), cand_mask.to(device)
        row_index = torch.tensor(pair_row, device=device)

        cache = out.cache
        cache.batch_select_indices(row_index)  # one copy of the prompt cache per (row, candidate) pair
        # Position j predicts token j+1: the LM head runs only where token j+1 is a real candidate token.
        needed = torch.zeros_like(cand_mask, dtype=torch.bool)
        needed[:, :-1] = cand_mask[:, 1:].bool()
        cont = model(
            input_ids=cand,
            attention_mask=torch.cat([mask[row_index], cand_mask], dim=1),
            position_ids=positions[row_index, -1:] + 1 + torch.arange(width, device=device),
            cache=cache,
            use_cache=True,
            logits_to_keep=needed,
        )
        logp = torch.log_softmax(cont.logits.float(), dim=-1)  # (number of needed positions, vocab)
        token_logp = torch.zeros_like(cand, dtype=torch.float)
        token_logp[:, 0] = first[row_index].gather(1, cand[:, :1]).squeeze(1)
        token_logp[:, 1:][needed[:, :-1]] = logp.gather(1, cand[:, 1:][needed[:, :-1]][:, None]).squeeze(1)
        totals = (token_logp * cand_mask).sum(1).tolist()

        k = 0
        for cands in b_cats:
            scores = {label: totals[k + j] for j, label in enumerate(cands)}
            k += len(cands)
            results.append(Scored(prediction=max(cands, key=scores.__getitem__), scores=scores))
    return results


@torch.inference_mode()
def generate_answers(model, tokenizer, rows, *, max_length: int = MAX_LENGTH, batch_size: int = 8,
                     max_new_tokens: int = 8, progress: bool = False, examples=None) -> list[str]:
    """Free generation (greedy, left padding, stops at the end of the turn or of the text, e.g. ``<|im_end|>``
    or ``<|endoftext|>`` for Qwen2): what the model actually writes, cut at the first stop token."""
    texts, cats = _rows_fields(rows)
    device = next(model.parameters()).device
    stop_tokens = chat_family(tokenizer).stop_tokens
    stop = stop_ids(tokenizer)
    answers = []
    for start in tqdm(range(0, len(rows), batch_size), desc="generate", disable=not progress):
        b_examples = examples[start:start + batch_size] if examples is not None else None
        prompts = encode_prompts(tokenizer, texts[start:start + batch_size], cats[start:start + batch_size],
                                 max_length, examples=b_examples)
        ids, mask = _left_pad(prompts, tokenizer.pad_token_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        for seq in out[:, ids.shape[1]:]:
            text = tokenizer.decode(seq, skip_special_tokens=False)
            for token in stop_tokens:
                text = text.split(token)[0]
            answers.append(text.strip())
    return answers
