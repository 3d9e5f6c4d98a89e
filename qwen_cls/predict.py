"""``qwen-cls predict``: classify raw rows with a trained run (base + adapter) or an exported model.

Every row gets ``prediction`` (always one of its candidates: candidate scoring, not free generation) and
``scores`` (each candidate's total log-probability). Rows are validated like ``convert`` (``output`` is
optional) before any model loads, and the output file is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data import DataError, read_jsonl, read_raw_rows, write_jsonl_atomic

RUN_CONFIG = "run_config.json"
RUN_INCOMPLETE = "RUN_INCOMPLETE"  # = qwen_cls.pipeline.RUN_INCOMPLETE: `qwen-cls run` has not finished this folder
TINY = "tiny"  # = qwen_cls.model.TINY
DEFAULT_MAX_LENGTH = 384


class AdapterMismatch(ValueError):
    """The adapter's shapes do not fit the base model: it was trained on another base."""


def read_run_config(folder: str | os.PathLike) -> dict:
    """``run_config.json`` of a run dir (or an export), with a clear error when it is missing or broken."""
    from .model import ModelNotFound

    path = Path(folder) / RUN_CONFIG
    if not Path(folder).is_dir():
        raise ModelNotFound(f"{folder}: no such run dir")
    if not path.is_file():
        raise ModelNotFound(f"{folder}: not a run dir (no {RUN_CONFIG}); train one with `qwen-cls train` or `qwen-cls run`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"invalid JSON ({exc.msg})") from None
    for key in ("base_model", "max_length"):
        if key not in config:
            raise DataError(path, None, f"lacks {key!r}; the run-dir contract needs base_model and max_length")
    return config


def load_run(run_dir: str | os.PathLike, *, device=None):
    """(model, tokenizer, config) for a run dir: its ``base_model`` with the LoRA ``adapter/`` on top."""
    from .model import ModelNotFound, load_model

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise ModelNotFound(f"{adapter}: missing or incomplete adapter (needs adapter_config.json and "
                            "adapter_model.safetensors); did training finish?")
    mismatch = AdapterMismatch(
        f"{adapter}: this adapter does not fit the base model {config['base_model']!r} (its layers or tensor "
        "shapes differ), so it was trained on a different base; point base_model in "
        f"{run_dir / RUN_CONFIG} at the model it was trained on"
    )
    try:
        model, tokenizer = load_model(config["base_model"], device=device, adapter=str(adapter))
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


def load_exported(model_dir: str | os.PathLike, *, device=None):
    """(model, tokenizer, config) for a plain or exported (merged) model folder."""
    from .model import ModelNotFound, load_model

    folder = Path(model_dir)
    if folder.is_dir() and (folder / "adapter").is_dir() and (folder / RUN_CONFIG).is_file():
        raise ModelNotFound(f"{folder} is a run dir, not a model folder; use --run {folder}")
    config = read_run_config(folder) if (folder / RUN_CONFIG).is_file() else {}
    model, tokenizer = load_model(str(model_dir), device=device)
    return model, tokenizer, config


def predict_rows(model, tokenizer, rows, *, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8,
                 progress: bool = False) -> list[dict]:
    """``{"prediction", "scores"}`` per row (dicts or :class:`~qwen_cls.data.RawRow`), batched."""
    from .evaluate import score_candidates

    scored = score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=batch_size,
                              progress=progress)
    return [{"prediction": s.prediction, "scores": s.scores} for s in scored]


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


def check_predict_options(*, run=None, model=None, output=None, batch_size: int = 8,
                          max_length: int | None = None, device=None) -> None:
    """Every option of ``qwen-cls predict`` checked before a row is read or a model loads (exit 2, naming it)."""
    from .data import write_target
    from .profiles import MIN_MAX_LENGTH

    if (run is None) == (model is None):
        raise ValueError("give exactly one of --run RUN_DIR or --model MODEL_DIR")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1 (rows scored together), got {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < MIN_MAX_LENGTH):
        raise ValueError(f"--max-length must be an integer >= {MIN_MAX_LENGTH} (tokens per row; the prompt alone "
                         f"takes about 50), got {max_length!r}")
    for option, folder in (("--run", run), ("--model", model)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise NotADirectoryError(f"{option} {folder}: is a file, not a folder")
    if run is not None and (Path(run) / RUN_INCOMPLETE).is_file():
        raise ValueError(f"--run {run}: marked incomplete ({RUN_INCOMPLETE}): its `qwen-cls run` did not finish, so "
                         "its files are partial; rerun it first")
    if output is not None:
        write_target(output)  # a folder, a device, or a file where a folder should be: refused now, not after
    check_device(device)


def predict_file(input_path, output_path, *, run=None, model=None, batch_size: int = 8,
                 max_length: int | None = None, device=None, progress: bool = True) -> dict:
    """Validate ``input_path``, predict every row, write ``output_path`` atomically; return a summary."""
    check_predict_options(run=run, model=model, output=output_path, batch_size=batch_size, max_length=max_length,
                          device=device)
    rows = read_raw_rows(input_path, require_output=False)  # path:line errors before any model loads
    originals = read_jsonl(input_path)  # same non-blank lines: keeps extra fields such as ids
    if output_path is not None and Path(output_path).resolve() == Path(input_path).resolve():
        raise ValueError(f"{output_path}: the output would overwrite the input; choose another file")
    loaded = load_run(run, device=device) if run is not None else load_exported(model, device=device)
    net, tokenizer, config = loaded
    max_length = max_length or config.get("max_length", DEFAULT_MAX_LENGTH)
    results = predict_rows(net, tokenizer, rows, max_length=max_length, batch_size=batch_size, progress=progress)
    out_rows = [{**orig, **row.to_dict(), **res} for orig, row, res in zip(originals, rows, results)]
    write_jsonl_atomic(out_rows, output_path)
    labelled = [r for r in out_rows if r.get("output") is not None]
    summary = {"rows": len(out_rows), "labelled": len(labelled),
               "accuracy": (sum(r["prediction"] == r["output"] for r in labelled) / len(labelled)
                            if labelled else None),
               "tiny_model": config.get("base_model") == TINY}
    return summary


def cmd_predict(args) -> int:
    summary = predict_file(args.input, args.output, run=args.run, model=args.model, batch_size=args.batch_size,
                           max_length=args.max_length, device=args.device, progress=not args.quiet)
    line = f"wrote {summary['rows']} predictions to {args.output}"
    if summary["accuracy"] is not None:
        line += f"; accuracy on {summary['labelled']} labelled rows: {summary['accuracy']:.3f}"
        if summary["tiny_model"]:
            line += " (tiny random model: it learned nothing, this number shows mechanics only)"
    print(line)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify raw JSONL rows with a run dir or an exported model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run dir (adapter/ + run_config.json)")
    source.add_argument("--model", help="model folder, e.g. from `qwen-cls export`")
    p.add_argument("--input", required=True, help="raw JSONL {text, category[, output]}")
    p.add_argument("--output", required=True, help="JSONL: each row + prediction + scores (written atomically)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="default: the run's max_length (else 384)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

