"""Straightforward versions of the library's fast paths, kept here as the tests' yardstick."""

from __future__ import annotations

import torch

from qwen_cls.evaluate import Scored, _rows_fields
from qwen_cls.tokenization import encode_prompts, end_id, label_ids


@torch.inference_mode()
def score_candidates_reference(model, tokenizer, rows, *, max_length: int = 384, examples=None) -> list[Scored]:
    """Straightforward scoring: one full forward pass per (row, candidate), no cache, no batching."""
    texts, cats = _rows_fields(rows)
    device = next(model.parameters()).device
    end = end_id(tokenizer)
    results = []
    for i, (text, cands) in enumerate(zip(texts, cats)):
        row_examples = [examples[i]] if examples is not None else None
        prompt = encode_prompts(tokenizer, [text], [cands], max_length, examples=row_examples)[0]
        scores = {}
        for label in cands:
            answer = label_ids(tokenizer, label) + [end]
            ids = torch.tensor([prompt + answer], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            scores[label] = sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(answer))
        results.append(Scored(prediction=max(cands, key=scores.__getitem__), scores=scores))
    return results
