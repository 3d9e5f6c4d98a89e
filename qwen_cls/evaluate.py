"""Classify with the model: score every candidate label, or let it write freely.

Scoring: the prediction is the candidate whose tokens (every token, plus the end-of-turn token) have the
highest total log-probability after the prompt, so every prediction is one of the row's candidates.
The prompt is run once per row; its KV cache is then shared by all of that row's candidates.
Each candidate also gets a probability: the softmax of the total log-probabilities over the row's candidates
(:func:`candidate_softmax`), i.e. how the model splits its belief among these answers only.

Taught in: 03, 04, 05
"""

from __future__ import annotations

import copy
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


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading token ids all ``prompts`` share (the chat template's opening and the system message,
    up to where the rows' own text begins), keeping at least one token of its own to every prompt."""
    if not prompts:
        return 0
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def attention_window(model) -> int | None:
    """The sliding-window size when some layer attends only to a window (Gemma 3's local layers), else None."""
    config = model.config
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return config.sliding_window
    return None


def last_position(ids: torch.Tensor) -> torch.Tensor:
    """A boolean ``logits_to_keep`` selecting each (left-padded) row's last position: the LM head then runs on a
    (rows, hidden) matrix. An integer ``logits_to_keep=1`` gives it a (rows, 1, hidden) view instead, which a
    bfloat16 model on a CPU multiplies by copying the whole tied embedding once per row (seen: 14 s of copies
    for 16 rows with Gemma 3's 262,144 x 640 embedding)."""
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, -1] = True
    return keep


def _prefix_cache(model, prefix: list[int], device):
    """The KV cache of the shared prefix, computed once (one row)."""
    ids = torch.tensor([prefix], device=device)
    return model.get_decoder()(input_ids=ids, use_cache=True).cache  # the layers only: no token is predicted here


@torch.inference_mode()
def score_candidates(model, tokenizer, rows, *, max_length: int = MAX_LENGTH, batch_size: int = 8,
                     progress: bool = False, examples=None, prefix_cache: bool = True,
                     by_length: bool = True) -> list[Scored]:
    """Score each row's candidates in batches, reusing the prompt's KV cache across candidates.

    Taught in notebook 04, whose ``score_row`` writes the rule out (one full forward per candidate, the answer
    tokens' log-probabilities summed) and checks this gives the same scores; what this adds is speed: batches,
    the shared prompt prefix run once, each row's prompt run once for all its candidates.

    ``examples``: per row, retrieved ``{text, label}`` examples for RAG prompts (see ``qwen_cls.rag``).
    ``prefix_cache``: the tokens every row's prompt starts with (:func:`shared_prefix_length`) run once; their
    KV cache is copied to every row of a batch, which then runs only its own tokens. The rows are padded
    *between* the prefix and their own tokens, so the prefix sits at the same positions in every row and
    the real tokens keep the positions they have without the prefix cache. Under a sliding attention
    window (Gemma 3) that padding would push keys out of the window, so a batch whose padded length
    reaches the window is scored without the prefix cache.
    ``by_length``: batch the rows in order of prompt length (results come back in the rows' order), so a batch
    pads its rows to a length close to their own (on the demo's 500 headlines the prompt passes run 20% fewer
    tokens, padding included, than batches in file order).
    """
    texts, cats = _rows_fields(rows)
    device = next(model.parameters()).device
    end, pad = end_id(tokenizer), tokenizer.pad_token_id
    all_prompts = encode_prompts(tokenizer, texts, cats, max_length, examples=examples)
    n_prefix = shared_prefix_length(all_prompts) if prefix_cache and len(rows) > 1 else 0
    window = attention_window(model)
    prefix_kv = None  # computed by the first batch that uses it
    order = sorted(range(len(rows)), key=lambda i: len(all_prompts[i])) if by_length else list(range(len(rows)))
    results: list[Scored | None] = [None] * len(rows)
    for start in tqdm(range(0, len(rows), batch_size), desc="score", disable=not progress):
        batch = order[start:start + batch_size]
        b_cats = [cats[i] for i in batch]
        prompts = [all_prompts[i] for i in batch]

        pair_row, pair_tokens = [], []
        for i, cands in enumerate(b_cats):
            for label in cands:
                pair_row.append(i)
                pair_tokens.append(label_ids(tokenizer, label) + [end])
        width = max(len(t) for t in pair_tokens)
        total = max(len(p) - n_prefix for p in prompts) + n_prefix + width  # padded length with the prefix cache
        shared = n_prefix if window is None or total < window else 0
        if shared and prefix_kv is None:
            prefix_kv = _prefix_cache(model, all_prompts[0][:n_prefix], device)

        ids, own_mask = _left_pad([p[shared:] for p in prompts], pad, device)
        mask = torch.cat([torch.ones((len(prompts), shared), dtype=torch.long, device=device), own_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        if shared:
            cache = copy.deepcopy(prefix_kv)
            cache.batch_repeat_interleave(len(prompts))
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions[:, shared:], cache=cache,
                    use_cache=True, logits_to_keep=last_position(ids))
        first = out.logits  # (rows, vocab): predicts each candidate's first token
        first_norm = first.float().logsumexp(-1)  # log-softmax = logit - this; only the candidates' tokens are needed

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
        later = cont.logits  # (number of needed positions, vocab)
        token_logp = torch.zeros_like(cand, dtype=torch.float)
        token_logp[:, 0] = first[row_index, cand[:, 0]].float() - first_norm[row_index]
        later_ids = cand[:, 1:][needed[:, :-1]]
        token_logp[:, 1:][needed[:, :-1]] = (later.gather(1, later_ids[:, None]).squeeze(1).float()
                                             - later.float().logsumexp(-1))
        totals = (token_logp * cand_mask).sum(1).tolist()

        k = 0
        for i, cands in zip(batch, b_cats):
            scores = {label: totals[k + j] for j, label in enumerate(cands)}
            k += len(cands)
            results[i] = Scored(prediction=max(cands, key=scores.__getitem__), scores=scores)
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
