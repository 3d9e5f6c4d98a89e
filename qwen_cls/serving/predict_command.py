"""``qwen-cls predict``: classify raw JSONL rows with a trained run (base + adapter) or an exported model.

Every row gets ``prediction`` (always one of its candidates: candidate scoring, not free generation),
``scores`` (each candidate's total log-probability) and ``probabilities`` (their softmax over the row's
candidates), as :func:`~qwen_cls.predict.predict_rows` gives them. With ``--min-confidence P`` every row also gets
``confidence`` (the top probability) and ``abstain`` (true when it is below P: the caller should not trust this
prediction); ``prediction`` stays the top label. Rows are validated like ``convert`` (``output`` is optional) before
any model loads, and the output file is written atomically. Before any model loads, every option is checked
(:mod:`~qwen_cls.serving.load_options`): a run that is not finished, or whose ``run_config.json`` or adapter is
damaged, is named, and a ``--model`` folder holding a sequence classifier (``export --seq-cls``) is refused by
name (:func:`~qwen_cls.predict.check_causal_lm`): loaded as a causal LM its head would be dropped and its answers
meaningless.
"""

from __future__ import annotations

from pathlib import Path

from ..data import read_raw_rows
from ..files import read_jsonl, write_jsonl_atomic
from ..hub import TINY
from ..predict import check_causal_lm, check_min_confidence, load_exported, load_run, predict_rows
from ..recipe import MAX_LENGTH
from .load_options import add_model_source, check_device, check_max_length, check_run_files, check_run_finished


def check_predict_options(*, run=None, model=None, output=None, batch_size: int = 8,
                          max_length: int | None = None, device=None, min_confidence=None) -> None:
    """Every option of ``qwen-cls predict`` checked before a row is read or a model loads (exit 2, naming it)."""
    from ..files import write_target

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
