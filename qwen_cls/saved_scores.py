"""Scores computed once: notebook 04 scores every test row zero-shot and with LoRA; 05 asks for the same rows,
model and prompt again and gets 04's numbers back instead of a second scoring.

04 writes the per-row scores into ``predictions.jsonl`` (``scores``: with the adapter, ``zero_shot_scores``:
adapter off) and, into ``scoring.json``, what they were computed with: per method the model's fingerprint
(:func:`model_fingerprint`), ``max_length``, the scoring seconds and row count, and per row a digest of the
exact token ids scored (:func:`row_digests`: prompt + every candidate's tokens + end token).
:func:`reuse_or_score` gives those scores back only when the model, ``max_length`` and every requested row's
tokens are the same now; otherwise it scores afresh and says why.

Taught in: 04, 05
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .evaluate import Scored, score_candidates
from .files import read_jsonl, write_json_atomic
from .run_record import PREDICTIONS, SCORING
from .tokenization import encode_prompts, end_id, label_ids

SCORE_FIELDS = {"lora": "scores", "zero_shot": "zero_shot_scores"}  # method -> its field in predictions.jsonl
SAMPLED_VALUES = 4096  # values of each frozen weight tensor the fingerprint reads (evenly spaced)


def _adapter_active(model) -> bool:
    """Whether a PEFT adapter is loaded and switched on (not inside ``model.disable_adapter()``)."""
    layers = [m for m in model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "active_adapters")]
    return any(not m.disable_adapters for m in layers)


def _plain(value):
    """A PEFT config value as JSON with one spelling: sets sorted (``target_modules`` is a set, whose order
    changes with every process), enums by value, anything else unknown by its ``repr``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return getattr(value, "value", repr(value))


def adapter_settings(model) -> dict:
    """What of the adapter decides the scores besides its weights, when it is on: each active adapter's
    config (``adapter_config.json`` as loaded: ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``, ...)
    and every LoRA layer's ``scaling`` (``lora_alpha / r``, the factor of its update). Empty when it is off."""
    if not _adapter_active(model):
        return {}
    configs = getattr(model, "peft_config", {}) or {}
    active = getattr(model, "active_adapters", None) or list(configs)
    active = [active] if isinstance(active, str) else list(active)
    scaling = {name: {a: float(m.scaling[a]) for a in active if a in m.scaling}
               for name, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)}
    return {"config": {a: _plain(configs[a].to_dict()) for a in active if a in configs}, "scaling": scaling}


@torch.no_grad()
def model_fingerprint(model) -> str:
    """SHA-256 over what decides the scores: every weight's name, shape and dtype, ``SAMPLED_VALUES`` evenly
    spaced values of each base weight, every value of the LoRA weights and the adapter's settings
    (:func:`adapter_settings`: its config, ``lora_alpha`` and ``target_modules`` included, and each layer's
    scaling) when the adapter is on (none of them when it is off, so the base model with its adapter switched
    off has the base model's fingerprint)."""
    active = _adapter_active(model)
    h = hashlib.sha256()
    settings = adapter_settings(model)
    if settings:
        h.update(json.dumps(settings, sort_keys=True).encode())
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        if is_lora and not active:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        flat = p.detach().reshape(-1)
        values = flat if is_lora else flat[:: max(1, flat.numel() // SAMPLED_VALUES)]
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(values.float().cpu().numpy().tobytes())
    return h.hexdigest()


def row_digests(tokenizer, rows, max_length: int) -> list[str]:
    """Per row, SHA-256 of the token ids scoring runs: the prompt, then each candidate's tokens + end token."""
    texts = [r["text"] for r in rows]
    cats = [list(r["category"]) for r in rows]
    end = end_id(tokenizer)
    out = []
    for prompt, cands in zip(encode_prompts(tokenizer, texts, cats, max_length), cats):
        ids = [prompt] + [label_ids(tokenizer, c) + [end] for c in cands]
        out.append(hashlib.sha256(json.dumps(ids).encode()).hexdigest())
    return out


def scoring_record(model, tokenizer, rows, *, max_length: int, seconds: float) -> dict:
    """What one method's scores in ``scoring.json`` were computed with (see the module's docstring)."""
    return {"model": model_fingerprint(model), "max_length": max_length, "seconds": seconds, "rows": len(rows),
            "row_digests": row_digests(tokenizer, rows, max_length)}


def save_scoring(run_dir: str | os.PathLike, records: dict[str, dict]) -> Path:
    """Write ``run_dir/scoring.json``: method (``lora``, ``zero_shot``) -> :func:`scoring_record`."""
    unknown = set(records) - set(SCORE_FIELDS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {sorted(SCORE_FIELDS)}")
    path = Path(run_dir) / SCORING
    write_json_atomic(records, path)
    return path


@dataclass
class Reused:
    """Scores for the requested rows; ``reused``: read from the run (else scored now, for ``reason``);
    ``seconds``: the scoring time of these rows (04's seconds per row times the row count when reused)."""

    scored: list[Scored]
    seconds: float
    reused: bool
    reason: str


def _saved(run_dir: Path, method: str, model, tokenizer, rows, max_length: int):
    """``(scores per requested row, seconds)`` from the run, or ``(None, reason)``."""
    scoring, predictions = run_dir / SCORING, run_dir / PREDICTIONS
    if not (scoring.is_file() and predictions.is_file()):
        return None, f"no {SCORING} / {PREDICTIONS} in {run_dir}"
    record = json.loads(scoring.read_text(encoding="utf-8")).get(method)
    if record is None:
        return None, f"{scoring} has no {method!r} scores"
    if record["max_length"] != max_length:
        return None, f"{scoring}: max_length {record['max_length']}, now {max_length}"
    if record["model"] != model_fingerprint(model):
        return None, (f"{scoring}: {method!r} was scored with other weights, adapter settings (adapter_config.json) "
                      "or adapter on/off than this model's")
    saved_rows = read_jsonl(predictions)
    if len(saved_rows) != len(record["row_digests"]):
        return None, f"{predictions} has {len(saved_rows)} rows, {scoring} {len(record['row_digests'])}"
    where = {digest: i for i, digest in enumerate(record["row_digests"])}
    found = []
    for k, digest in enumerate(row_digests(tokenizer, rows, max_length)):
        i = where.get(digest)
        if i is None or saved_rows[i]["text"] != rows[k]["text"]:
            return None, f"row {k} (and maybe more) was not scored with this prompt in {predictions}"
        found.append(saved_rows[i][SCORE_FIELDS[method]])
    return found, record["seconds"] / record["rows"] * len(rows)


def reuse_or_score(model, tokenizer, rows, *, run_dir: str | os.PathLike, method: str, max_length: int,
                   batch_size: int = 8) -> Reused:
    """The ``method``'s (``lora`` or ``zero_shot``) scores of ``rows`` as 04 saved them in ``run_dir`` when the
    model (adapter on or off as now), ``max_length`` and each row's token ids are the same; else a fresh
    :func:`~qwen_cls.evaluate.score_candidates`. Predictions follow the same rule (highest score, the first
    listed candidate on a tie), so a reused row is exactly what scoring it again would give, up to float32
    rounding that depends on the batch it was padded in."""
    if method not in SCORE_FIELDS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(SCORE_FIELDS)}")
    found, info = _saved(Path(run_dir), method, model, tokenizer, rows, max_length)
    if found is not None:
        scored = [Scored(prediction=max(r["category"], key=s.__getitem__), scores={c: s[c] for c in r["category"]})
                  for r, s in zip(rows, found)]
        return Reused(scored, info, True, f"read from {Path(run_dir) / PREDICTIONS}")
    start = time.perf_counter()
    scored = score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=batch_size)
    return Reused(scored, time.perf_counter() - start, False, info)
