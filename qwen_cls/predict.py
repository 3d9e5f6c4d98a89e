"""``qwen-cls predict``: classify raw rows with a trained run (base + adapter) or an exported model.

Every row gets ``prediction`` (always one of its candidates: candidate scoring, not free generation),
``scores`` (each candidate's total log-probability) and ``probabilities`` (their softmax over the row's
candidates). With ``--min-confidence P`` every row also gets ``confidence`` (the top probability) and ``abstain``
(true when it is below P: the caller should not trust this prediction); ``prediction`` stays the top label.
Rows are validated like ``convert`` (``output`` is optional) before any model loads, and the output file is
written atomically. Before any model loads, a run's damaged ``run_config.json`` or adapter is named
(:func:`check_run_files`), and a ``--model`` folder holding a sequence classifier (``export --seq-cls``) is
refused by name (:func:`check_causal_lm`): loaded as a causal LM its head would be dropped and its answers
meaningless.

Taught in: 04, 05, 06, 07
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .data import read_raw_rows
from .files import read_jsonl, write_jsonl_atomic
from .hub import TINY
from .recipe import MAX_LENGTH
from .run_record import ADAPTER, RUN_CONFIG, adapter_dir, check_run_finished, read_run_config
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


def check_run_files(run_dir: str | os.PathLike) -> None:
    """What ``predict``, ``serve`` and ``export`` check of a (finished) run's files before a model loads: a
    readable ``run_config.json`` and a whole adapter (:func:`~qwen_cls.run_record.adapter_dir`)."""
    read_run_config(run_dir)
    adapter_dir(run_dir)  # adapter_config.json and the safetensors header, named when damaged


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


def check_device(device) -> None:
    """``ValueError`` naming ``--device`` when it is not a device this machine's torch can use."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch build has no CUDA support (torch {torch.__version__})" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"--device {device}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N or mps")


def check_max_length(max_length) -> None:
    """``ValueError`` naming ``--max-length`` unless it is ``None`` (the run's) or an integer of at least
    :data:`~qwen_cls.profiles.MIN_MAX_LENGTH`: what ``predict`` and ``serve`` check before a model loads."""
    from .profiles import MIN_MAX_LENGTH

    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < MIN_MAX_LENGTH):
        raise ValueError(f"--max-length must be an integer >= {MIN_MAX_LENGTH} (tokens per row; the prompt alone "
                         f"takes about 50), got {max_length!r}")


def check_row_fits(tokenizer, text: str, candidates: list[str], *, max_length: int) -> None:
    """``ValueError`` when a row cannot be scored within ``max_length`` tokens (its candidates and the prompt leave
    no room for the text): the check :func:`predict_rows` makes of every row before scoring
    (:func:`~qwen_cls.tokenization.fit_prompts`), with its message, for one row. ``serve`` makes it when a request
    arrives, so such a row is refused alone instead of failing the forward pass it would share."""
    fit_prompts(tokenizer, [text], [list(candidates)], max_length)


def check_predict_options(*, run=None, model=None, output=None, batch_size: int = 8,
                          max_length: int | None = None, device=None, min_confidence=None) -> None:
    """Every option of ``qwen-cls predict`` checked before a row is read or a model loads (exit 2, naming it)."""
    from .files import write_target

    if (run is None) == (model is None):
        raise ValueError("give exactly one of --run RUN_DIR or --model MODEL_DIR")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1 (rows scored together), got {batch_size!r}")
    check_max_length(max_length)
    for option, folder in (("--run", run), ("--model", model)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise NotADirectoryError(f"{option} {folder}: is a file, not a folder")
    if run is not None:
        check_run_finished(run)  # marked incomplete, being written, or never evaluated: refused, as by export
    if output is not None:
        write_target(output)  # a folder, a device, or a file where a folder should be: refused now, not after
    check_min_confidence(min_confidence)
    check_device(device)
    if run is not None:
        check_run_files(run)  # its config or adapter damaged: named, as by export and serve
    if model is not None:
        check_causal_lm(model)


def predict_file(input_path, output_path, *, run=None, model=None, batch_size: int = 8,
                 max_length: int | None = None, device=None, progress: bool = True,
                 min_confidence: float | None = None, verify: bool = False) -> dict:
    """Validate ``input_path``, predict every row, write ``output_path`` atomically; return a summary."""
    check_predict_options(run=run, model=model, output=output_path, batch_size=batch_size, max_length=max_length,
                          device=device, min_confidence=min_confidence)
    rows = read_raw_rows(input_path, require_output=False)  # path:line errors before any model loads
    originals = read_jsonl(input_path)  # same non-blank lines: keeps extra fields such as ids
    if output_path is not None and Path(output_path).resolve() == Path(input_path).resolve():
        raise ValueError(f"{output_path}: the output would overwrite the input; choose another file")
    loaded = (load_run(run, device=device, verify=verify) if run is not None
              else load_exported(model, device=device, verify=verify))
    net, tokenizer, config = loaded
    max_length = max_length or config.get("max_length", MAX_LENGTH)
    results = predict_rows(net, tokenizer, rows, max_length=max_length, batch_size=batch_size, progress=progress,
                           min_confidence=min_confidence)
    out_rows = [{**orig, **row.to_dict(), **res} for orig, row, res in zip(originals, rows, results)]
    write_jsonl_atomic(out_rows, output_path)
    labelled = [r for r in out_rows if r.get("output") is not None]
    summary = {"rows": len(out_rows), "labelled": len(labelled),
               "accuracy": (sum(r["prediction"] == r["output"] for r in labelled) / len(labelled)
                            if labelled else None),
               "tiny_model": config.get("base_model") == TINY,
               "abstained": sum(r["abstain"] for r in out_rows) if min_confidence is not None else None}
    return summary


def cmd_predict(args) -> int:
    summary = predict_file(args.input, args.output, run=args.run, model=args.model, batch_size=args.batch_size,
                           max_length=args.max_length, device=args.device, progress=not args.quiet,
                           min_confidence=args.min_confidence, verify=args.verify)
    line = f"wrote {summary['rows']} predictions to {args.output}"
    if summary["abstained"] is not None:
        line += f" ({summary['abstained']} marked abstain: confidence below {args.min_confidence:g})"
    if summary["accuracy"] is not None:
        line += f"; accuracy on {summary['labelled']} labelled rows: {summary['accuracy']:.3f}"
        if summary["tiny_model"]:
            line += " (tiny random model: it learned nothing, this number shows mechanics only)"
    print(line)
    return 0


def add_model_source(parser) -> None:
    """``--run RUN_DIR`` or ``--model FOLDER`` (exactly one): the model ``predict`` and ``serve`` classify with."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run dir (adapter/ + run_config.json)")
    source.add_argument("--model", help="model folder, e.g. from `qwen-cls export`")


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify raw JSONL rows with a run dir or an exported model")
    add_model_source(p)
    p.add_argument("--input", required=True, help="raw JSONL {text, category[, output]}")
    p.add_argument("--output", required=True,
                   help="JSONL: each row + prediction + scores + probabilities (written atomically)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help=f"default: the run's max_length (else {MAX_LENGTH})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="add confidence (top probability) and abstain (confidence < P) to every row; 0 <= P <= 1")
    p.add_argument("--verify", action="store_true",
                   help="check the base model folder's files against their SHA-256 (its manifest), not only sizes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

