"""The run folder's record of a training: the names of its artifacts, the one ``run_config.json`` schema,
saving the adapter with its config and log (atomically), and reading a run back.

Notebook 03 and ``qwen-cls train`` both build the record with :func:`run_config` and write it with
:func:`save_training`, so a run folder says the same things whichever path trained it; ``predict``,
``export`` and notebooks 04-05 read it back with :func:`read_run_config` and :func:`adapter_dir`.

Taught in: 03, 04
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import DataError, atomic_dir, file_sha256, save_tokenizer, save_weights, write_json_atomic
from .hub import ModelNotFound
from .manifests import safetensors_problem

# What a run folder holds (docs/ARCHITECTURE.md lists who writes each).
PARAMS = "params.json"
RUN_INCOMPLETE = "RUN_INCOMPLETE"  # written first, removed last: present = this folder is not a finished run
ADAPTER = "adapter"
RUN_CONFIG = "run_config.json"
TRAIN_LOG = "train_log.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
SCORING = "scoring.json"  # 04: what predictions.jsonl's scores were computed with (qwen_cls.saved_scores)
# What the chain and `qwen-cls train` write (a folder holding only these is a run, even without params.json).
RUN_LAYOUT = frozenset({
    PARAMS, RUN_INCOMPLETE, "notebooks", "data", "tokenized", "truncation_report.json", ADAPTER, "checkpoints",
    RUN_CONFIG, TRAIN_LOG, "loss_curve.png", "learning_curve.png", PREDICTIONS, SCORING,
    METRICS, "confusion_matrix.png", "swanlog", "retriever", "rag_metrics.json", "ranks",
    "damaged-checkpoints", "calibration.png", "rag_predictions.jsonl", "rag_timing.json", "seq_cls",
    "approaches.json", "approaches.png", "serve_metrics.json", "chain.json",
})
REQUIRED_KEYS = ("base_model", "max_length")  # what predict/export need to rebuild the model
ADAPTER_CONFIG = "adapter_config.json"  # a saved PEFT adapter: its config and weights (adapter/, seq_cls/)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_KEYS = ("peft_type", "r", "lora_alpha", "target_modules")  # what loading a LoRA adapter reads


def run_config(*, profile: str | None, base_model: str, max_length: int, lora_config, args, seed: int,
               gradient_checkpointing: bool, train_rows: int, train_file: str | os.PathLike | None = None,
               eval_rows: int | None = None, world_size: int = 1, global_step: int | None = None,
               train_seconds: float | None = None, resumed_from: str | None = None,
               dtype: str | None = None, validation_file: str | os.PathLike | None = None,
               validation_rows: int | None = None, validation_sha256: str | None = None) -> dict:
    """The ``run_config.json`` of a training: the same keys, top level and nested, for every path.

    ``lora_config`` is the ``peft.LoraConfig`` trained, ``args`` the ``TrainingArguments``; ``profile`` is
    ``None`` for ``qwen-cls train`` (no profile), ``train_file`` the raw rows trained on (fingerprinted).
    ``dtype``: the base model's weights while training (``"float32"`` or ``"bfloat16"``; default: bfloat16
    when ``args.bf16``); ``predict`` and ``serve`` load the run in it (:func:`run_precision`).
    ``validation_file``, ``validation_rows``, ``validation_sha256``: the validation rows 01 split off the training
    file (``out_dir/data/validation.jsonl``), their count and ``data.rows_sha256`` digest, recorded as
    ``validation`` (the same keys, each ``None``, for ``qwen-cls train``, which has no validation split).
    """
    validation = {"file": None if validation_file is None else str(validation_file), "rows": validation_rows,
                  "sha256": validation_sha256}
    return {
        "profile": profile,
        "base_model": str(base_model),
        "max_length": max_length,
        "dtype": dtype or ("bfloat16" if args.bf16 else "float32"),
        "lora": {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha, "lora_dropout": lora_config.lora_dropout,
                 "target_modules": sorted(lora_config.target_modules)},
        "training": {
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs,
            "max_steps": args.max_steps,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "gradient_checkpointing": bool(gradient_checkpointing),
            "logging_steps": args.logging_steps,
            "use_cpu": bool(args.use_cpu),
            "bf16": bool(args.bf16),
            "world_size": world_size,
            "global_step": global_step,
            "train_seconds": train_seconds,
            "resumed_from": resumed_from,
            "train_file": str(train_file) if train_file is not None else None,
            "train_sha256": file_sha256(train_file) if train_file is not None else None,
            "train_rows": train_rows,
            "eval_rows": eval_rows,
        },
        "validation": validation,
        "seed": seed,
    }


def save_training(out_dir: str | os.PathLike, model, tokenizer, config: dict, log_history: list[dict]) -> list[str]:
    """Write ``adapter/`` (LoRA weights as safetensors + tokenizer), ``run_config.json`` and
    ``train_log.json`` into ``out_dir``, each atomically; return the names written."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir / ADAPTER) as tmp:  # never a half-written adapter
        save_weights(model, str(tmp), safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
    write_json_atomic(config, out_dir / RUN_CONFIG)
    write_json_atomic(log_history, out_dir / TRAIN_LOG)
    return [ADAPTER, RUN_CONFIG, TRAIN_LOG]


def validation_result(folder: str | os.PathLike) -> dict | None:
    """``metrics.json``'s ``validation``: 03's last evaluation (``train_log.json``'s last ``eval_accuracy``, after
    the last epoch) on the first ``eval_rows`` of the validation rows 01 split off the training file: ``rows``
    (rows scored), ``accuracy``, ``macro_f1``, ``of`` (validation rows in all) and their ``sha256``
    (``run_config.json``'s ``validation``). ``None`` when the run recorded no evaluation (``qwen-cls train``)."""
    folder = Path(folder)
    config = read_run_config(folder)
    log = json.loads((folder / TRAIN_LOG).read_text(encoding="utf-8")) if (folder / TRAIN_LOG).is_file() else []
    evaluations = [entry for entry in log if "eval_accuracy" in entry]
    if not evaluations:
        return None
    recorded = config.get("validation") or {}
    last = evaluations[-1]
    return {"rows": config.get("training", {}).get("eval_rows"), "accuracy": last["eval_accuracy"],
            "macro_f1": last.get("eval_macro_f1"), "of": recorded.get("rows"), "sha256": recorded.get("sha256")}


def read_run_config(folder: str | os.PathLike) -> dict:
    """``run_config.json`` of a run dir (or an export), with a clear error when it is missing or broken."""
    path = Path(folder) / RUN_CONFIG
    if not Path(folder).is_dir():
        raise ModelNotFound(f"{folder}: no such run dir")
    if not path.is_file():
        raise ModelNotFound(f"{folder}: not a run dir (no {RUN_CONFIG}); train one with `qwen-cls train` or "
                            "`qwen-cls run`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"invalid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise DataError(path, None, "is not a JSON object; the run-dir contract needs base_model and max_length")
    for key in REQUIRED_KEYS:
        if key not in config:
            raise DataError(path, None, f"lacks {key!r}; the run-dir contract needs base_model and max_length")
    return config


def run_precision(config: dict) -> str | None:
    """The ``precision`` (:func:`qwen_cls.model.pick_dtype`) to load a run in: ``"auto"`` for a run trained in
    bfloat16 (bfloat16 again where the device computes it natively, float32 where it would be emulated),
    ``"float32"`` for a float32 run, ``None`` (the device's default) for runs that did not record it."""
    return {"bfloat16": "auto", "float32": "float32"}.get(config.get("dtype"))


def adapter_dir(run_dir: str | os.PathLike) -> Path:
    """The run's ``adapter/``, checked complete and readable (:func:`check_adapter`), before any model loads."""
    adapter = Path(run_dir) / ADAPTER
    if not (adapter / ADAPTER_CONFIG).is_file() or not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ModelNotFound(f"{adapter}: missing or incomplete adapter (needs {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS}); did training finish?")
    check_adapter(adapter, fix="the adapter is damaged: retrain the run (`qwen-cls train`, or `qwen-cls run "
                               "--overwrite`) or restore adapter/ from a copy")
    return adapter


def check_adapter(folder: str | os.PathLike, *, fix: str) -> None:
    """:class:`~qwen_cls.files.DataError` naming the file when a saved PEFT adapter in ``folder`` cannot load:
    ``adapter_config.json`` not a JSON object with :data:`ADAPTER_KEYS`, or ``adapter_model.safetensors``
    shorter or longer than its own header says (read without loading a tensor). ``fix`` says what to do."""
    config_path, weights = Path(folder) / ADAPTER_CONFIG, Path(folder) / ADAPTER_WEIGHTS
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(config_path, None, f"not UTF-8 text, so not the JSON PEFT wrote; {fix}") from None
    except json.JSONDecodeError as exc:
        raise DataError(config_path, exc.lineno, f"invalid JSON ({exc.msg}); {fix}") from None
    if not isinstance(config, dict):
        raise DataError(config_path, None, f"not a JSON object, so not the config PEFT wrote; {fix}")
    missing = [key for key in ADAPTER_KEYS if key not in config]
    if missing:
        raise DataError(config_path, None, f"lacks {', '.join(map(repr, missing))}, which PEFT needs to load the "
                                           f"adapter; {fix}")
    problem = safetensors_problem(weights)
    if problem is not None:
        raise DataError(weights, None, f"{problem}; {fix}")
