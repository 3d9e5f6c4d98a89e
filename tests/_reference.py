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


FLOAT32_SUM_RTOL = 1e-3  # see assert_float32_close


def float32_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ (0 when both are zero)."""
    diff = torch.linalg.vector_norm((actual - expected).double())
    scale = torch.linalg.vector_norm(expected.double())
    return float(diff / scale) if scale > 0 else (0.0 if diff == 0 else float("inf"))


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Two float32 results of the same maths summed in another order (other batch shapes, other kernels, another
    CPU's vector width) agree to float32's rounding, not bit for bit. Element-wise relative tolerances fail on
    elements that are small differences of large terms (seen: 6e-7 on values near 1e-3 in a LoRA gradient on an
    AMD EPYC), so compare the tensors as a whole: relative error of the norm within ``FLOAT32_SUM_RTOL`` (about
    8,000 float32 epsilons, room for a backward pass through a model). A real mistake (a per-row instead of a
    per-token mean, a missed row) is off by percents."""
    error = float32_relative_error(actual, expected)
    assert error <= FLOAT32_SUM_RTOL, f"{what}: relative error {error:.2e} > {FLOAT32_SUM_RTOL:.0e}"
