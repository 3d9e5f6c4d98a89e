"""Classify rows with a trained run (base + adapter) or an exported model: what ``qwen-cls predict`` and ``serve``
compute, and what notebooks 04-07 load a run with.

:func:`load_run` loads a run folder's ``base_model`` with its LoRA ``adapter/`` on top (an adapter trained on
another base refused: :class:`AdapterMismatch`), in float32 on a CPU unless given a dtype (:func:`run_dtype`: the
dtype the notebooks load a run in); :func:`load_exported` loads a plain or exported (merged) model folder, a
sequence classifier (``export --seq-cls``) refused by name (:func:`check_causal_lm`): loaded as a causal LM its
head would be dropped and its answers meaningless. :func:`predict_rows` gives every row ``prediction`` (always one
of its candidates: candidate scoring, not free generation), ``scores`` (each candidate's total log-probability)
and ``probabilities`` (their softmax over the row's candidates), and with ``min_confidence`` (checked by
:func:`check_min_confidence`) ``confidence`` (the top probability) and ``abstain`` (true when it is below:
the caller should not trust this prediction). :func:`check_row_fits` is its check that a row's candidates leave
``max_length`` room for the text. The command (options, files) is :mod:`qwen_cls.serving.predict_command`.

Taught in: 04, 05, 06, 07
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .recipe import MAX_LENGTH
from .run_record import ADAPTER, RUN_CONFIG, adapter_dir, read_run_config
from .tokenization import fit_prompts

if TYPE_CHECKING:
    import torch


class AdapterMismatch(ValueError):
    """The adapter's shapes do not fit the base model: it was trained on another base."""


class NotACausalLM(ValueError):
    """A ``--model`` folder holds a sequence classifier (``qwen-cls export --seq-cls``), not a causal LM."""


def check_causal_lm(folder: str | os.PathLike, option: str = "--model") -> None:
    """:class:`NotACausalLM` when ``folder``'s ``config.json`` names a ``*ForSequenceClassification``
    architecture: loaded as a causal LM its head would be dropped and its scores meaningless. A missing or
    broken ``config.json`` is left to the model check, which names it."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    architectures = config.get("architectures") if isinstance(config, dict) else None
    found = [a for a in architectures or [] if isinstance(a, str) and a.endswith("ForSequenceClassification")]
    if not found:
        return
    labels = [str(label) for label in (config.get("id2label") or {}).values()]
    shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
    raise NotACausalLM(
        f"{option} {folder}: a sequence-classification model ({found[0]}, id2label: {shown or 'none'}), as "
        "`qwen-cls export --seq-cls` writes it, not a causal language model; predict and serve score each row's "
        "candidates with a causal LM and cannot use its head: give --run RUN, or --model with a plain export "
        "(`qwen-cls export --run RUN --out DIR`), and load this folder with "
        "transformers.pipeline(\"text-classification\") (see its README.md)")


def run_dtype(run_dir: str | os.PathLike, device=None) -> torch.dtype:
    """The dtype to load ``run_dir``'s model in on ``device``: the one it was trained in where the device computes
    it natively (``run_config.json`` ``dtype``, :func:`~qwen_cls.run_record.run_precision`), else float32."""
    from .model import trained_dtype

    return trained_dtype(read_run_config(run_dir), device)


def load_run(run_dir: str | os.PathLike, *, device=None, verify: bool = False, dtype: torch.dtype | None = None):
    """(model, tokenizer, config) for a run dir: its ``base_model`` with the LoRA ``adapter/`` on top, in ``dtype``
    (default :func:`~qwen_cls.model.pick_dtype`: float32 on a CPU, even for a run trained in bfloat16). ``predict``
    and ``serve`` keep that default: in bfloat16 a row's scores depend on the rows batched with it (padding changes
    the rounding by about 1e-2), so ``serve``, which batches whatever arrives together, could not give ``predict``'s
    numbers. The notebooks load in the run's dtype (:func:`run_dtype`) for speed."""
    from .model import load_model

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    adapter = adapter_dir(run_dir)
    mismatch = AdapterMismatch(
        f"{adapter}: this adapter does not fit the base model {config['base_model']!r} (its layers or tensor "
        "shapes differ), so it was trained on a different base; point base_model in "
        f"{run_dir / RUN_CONFIG} at the model it was trained on"
    )
    try:
        model, tokenizer = load_model(config["base_model"], device=device, adapter=str(adapter), verify=verify,
                                      dtype=dtype)
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise mismatch from None
        raise
    if set(_adapter_keys(adapter)) != set(_model_adapter_keys(model)):
        raise mismatch  # e.g. a base with more layers: PEFT would leave the extra LoRA layers untrained
    return model, tokenizer, config


def _adapter_keys(adapter: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        return list(handle.keys())


def _model_adapter_keys(model) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model))


def load_exported(model_dir: str | os.PathLike, *, device=None, verify: bool = False):
    """(model, tokenizer, config) for a plain or exported (merged) model folder."""
    from .hub import ModelNotFound
    from .model import load_model

    folder = Path(model_dir)
    if folder.is_dir() and (folder / ADAPTER).is_dir() and (folder / RUN_CONFIG).is_file():
        raise ModelNotFound(f"{folder} is a run dir, not a model folder; use --run {folder}")
    check_causal_lm(folder)
    config = read_run_config(folder) if (folder / RUN_CONFIG).is_file() else {}
    model, tokenizer = load_model(str(model_dir), device=device, verify=verify)
    return model, tokenizer, config


def predict_rows(model, tokenizer, rows, *, max_length: int = MAX_LENGTH, batch_size: int = 8,
                 progress: bool = False, min_confidence: float | None = None) -> list[dict]:
    """``{"prediction", "scores", "probabilities"}`` per row (dicts or :class:`~qwen_cls.data.RawRow`), batched;
    with ``min_confidence`` also ``confidence`` and ``abstain`` (confidence below it)."""
    from .evaluate import score_candidates

    scored = score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=batch_size,
                              progress=progress)
    results = [{"prediction": s.prediction, "scores": s.scores, "probabilities": s.probabilities} for s in scored]
    if min_confidence is not None:
        for result, s in zip(results, scored):
            result["confidence"] = s.confidence
            result["abstain"] = s.confidence < min_confidence
    return results


def check_min_confidence(min_confidence) -> None:
    """``ValueError`` naming ``--min-confidence`` unless it is a number in [0, 1] (or ``None``: no abstention)."""
    if min_confidence is None:
        return
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) \
            or not 0 <= min_confidence <= 1:
        raise ValueError(f"--min-confidence must be a probability between 0 and 1 (rows whose top candidate is "
                         f"less likely are marked abstain), got {min_confidence!r}")


def check_row_fits(tokenizer, text: str, candidates: list[str], *, max_length: int) -> None:
    """``ValueError`` when a row cannot be scored within ``max_length`` tokens (its candidates and the prompt leave
    no room for the text): the check :func:`predict_rows` makes of every row before scoring
    (:func:`~qwen_cls.tokenization.fit_prompts`), with its message, for one row. ``serve`` makes it when a request
    arrives, so such a row is refused alone instead of failing the forward pass it would share."""
    fit_prompts(tokenizer, [text], [list(candidates)], max_length)
