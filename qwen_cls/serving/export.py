"""``qwen-cls export``: merge a run's LoRA adapter into its base weights and save a standalone model.

The folder holds safetensors weights, the tokenizer, the run's ``run_config.json`` and a model card
(``README.md``) with the run's metrics; ``qwen-cls predict --model`` on it gives the predictions of
``--run`` (base + adapter). It is written to a temp folder and renamed, so a failure leaves nothing.

It never deletes what it did not create: ``--out`` must be new, empty, or an earlier export of the same
run, of the same kind (plain or ``--seq-cls``), whose every file is one the export wrote, unchanged.
:data:`MARKER`, written last, records the run, the kind and a manifest of those files (relative name, size,
SHA-256), and is signed: an HMAC-SHA256 of its content under a secret that only ``qwen-cls export`` writes
(:data:`EXPORT_KEY` in the cache folder, 32 random bytes, mode 0600, made on first use). So a marker proves
that this user's exports wrote exactly the files it lists: a hand-written one (even with the right hashes of the
user's files), an edited one, or one from another machine or from an export before markers were signed, is
refused, and so is a file it does not list or that no longer matches (the user's notes, an edited card); the
refusal names the file and nothing changes. A run folder, a folder inside a run, or a folder holding the run is
refused too, and so is a run that is not finished or whose adapter is damaged (the checks ``predict`` makes:
:func:`~qwen_cls.serving.load_options.check_run_finished`, :func:`~qwen_cls.serving.load_options.check_run_files`).
A ``--out`` that is a dangling link or that cannot be written is refused before anything is merged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path

from ..files import DataError, atomic_dir, check_output_folder, file_sha256, save_tokenizer, save_weights
from ..hub import TINY, cache_dir
from ..predict import load_run
from ..run_record import ADAPTER, PARAMS, RUN_CONFIG, check_adapter
from .load_options import check_run_files, check_run_finished

METRIC_KEYS = ("accuracy", "macro_f1", "invalid_rate", "n_test")
MARKER = "qwen_cls_export.json"  # {"exported_from", "kind", "files": {name: {"size", "sha256"}}, "signature"}
RUN_FILES = (RUN_CONFIG, PARAMS)  # a folder holding one of these is a run (or an export of one)
EXPORT_KEY = "export_key"  # in the cache folder: the secret that signs this user's export markers
PLAIN, SEQ_CLS = "causal_lm", "seq_cls"  # the marker's kind: merged causal LM, or `--seq-cls`'s sequence classifier
KIND_NAMES = {PLAIN: "a plain (causal-LM) export", SEQ_CLS: "a sequence-classification export (--seq-cls)"}


class ExportRefused(ValueError):
    """``--out`` holds something the export did not make; the message says why and what to do."""


def export_key() -> bytes | None:
    """The secret that signs markers (:data:`EXPORT_KEY` in :func:`~qwen_cls.hub.cache_dir`), made on first use;
    None when it cannot be read or made (a read-only cache): the marker then goes unsigned, and a later export
    refuses to replace that folder rather than guess."""
    path = cache_dir() / EXPORT_KEY
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{EXPORT_KEY}.", dir=path.parent)  # mode 0600
            try:
                os.write(fd, secrets.token_bytes(32))
                os.close(fd)
                try:
                    os.link(tmp, path)  # whole or absent, never half-written
                except FileExistsError:
                    pass  # another export made it first: use that one
            finally:
                os.unlink(tmp)
        key = path.read_bytes()
    except OSError:
        return None
    return key if len(key) == 32 else None


def signature(marker: dict, key: bytes) -> str:
    """HMAC-SHA256 (hex) of ``marker`` without its ``signature``, as canonical JSON, under ``key``."""
    content = {k: v for k, v in marker.items() if k != "signature"}
    text = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def write_marker(folder: Path, run_dir: Path, kind: str) -> None:
    """Write :data:`MARKER` into ``folder`` (last): the run, ``kind``, the manifest of every file, the signature."""
    marker = {"exported_from": str(run_dir.resolve()), "kind": kind, "files": manifest(folder)}
    key = export_key()
    if key is not None:
        marker["signature"] = signature(marker, key)
    (folder / MARKER).write_text(json.dumps(marker, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def signed_here(marker: dict) -> bool:
    """True when ``marker`` carries the signature this user's exports give it (compared in constant time)."""
    key, given = export_key(), marker.get("signature")
    return key is not None and isinstance(given, str) and hmac.compare_digest(given, signature(marker, key))


def read_marker(folder: Path) -> dict | None:
    """The marker of an earlier export in ``folder`` (a JSON object), or None when there is none."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def earlier_export_of(folder: Path) -> str | None:
    """The run folder an earlier export in ``folder`` came from, or None when ``folder`` is no export."""
    exported_from = (read_marker(folder) or {}).get("exported_from")
    return exported_from if isinstance(exported_from, str) else None


def manifest(folder: Path) -> dict:
    """``{relative name: {"size", "sha256"}}`` for every file under ``folder`` (what an export wrote)."""
    return {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
            for path in sorted(folder.rglob("*")) if path.is_file()}


def not_written_by_export(out: Path, files: dict) -> tuple[Path, str] | None:
    """The first entry under ``out`` that the manifest ``files`` does not vouch for, with why; None when every
    entry is a file the export wrote, unchanged (folders holding only such files; the marker itself)."""
    for root, dirs, names in os.walk(out):  # does not descend into linked folders: they are listed in dirs
        root = Path(root)
        dirs.sort()
        for name in dirs:
            folder = root / name
            rel = folder.relative_to(out).as_posix()
            if folder.is_symlink() or not any(written.startswith(rel + "/") for written in files):
                return folder, "which `qwen-cls export` did not write"
        for name in sorted(names):
            path = root / name
            rel = path.relative_to(out).as_posix()
            if rel == MARKER:
                continue
            entry = files.get(rel)
            if not isinstance(entry, dict) or path.is_symlink() or not path.is_file():
                return path, "which `qwen-cls export` did not write"
            if path.stat().st_size != entry.get("size") or file_sha256(path) != entry.get("sha256"):
                return path, "which was changed after `qwen-cls export` wrote it (so it is yours now)"
    return None


def is_run_folder(folder: Path) -> bool:
    """A run (or an export of one): ``run_config.json`` beside ``adapter/`` or merged weights, or the
    ``params.json`` of `qwen-cls run` beside its ``notebooks/`` (a lone file of that name is not enough)."""
    if (folder / RUN_CONFIG).is_file() and ((folder / ADAPTER).is_dir() or (folder / MARKER).is_file()):
        return True
    return (folder / PARAMS).is_file() and (folder / "notebooks").is_dir()


def check_out_dir(run_dir: Path, out: Path, kind: str = PLAIN) -> None:
    """Refuse an ``--out`` whose contents the export of ``kind`` would destroy, or that it cannot write (see the
    module docstring)."""
    if out.is_symlink() and not out.exists():
        raise ExportRefused(f"--out {out}: a symbolic link to {os.readlink(out)}, which does not exist; create that "
                            "folder, or choose another --out (nothing was merged)")
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target.is_relative_to(run):
        raise ExportRefused(f"--out {out} is the run folder or inside it; choose a new folder outside {run_dir}")
    if run.is_relative_to(target):
        raise ExportRefused(f"--out {out} holds the run folder {run_dir}; choose a new, empty folder")
    for parent in target.parents:
        if is_run_folder(parent):
            raise ExportRefused(f"--out {out} lies inside the run folder {parent}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"--out {out} is a file; choose a new folder")
    if out.exists() and any(out.iterdir()):
        check_earlier_export(run_dir, out, kind)
    check_output_folder(target, "--out", spared="merged")  # a temp folder is written beside it, then renamed


def check_earlier_export(run_dir: Path, out: Path, kind: str) -> None:
    """Refuse a non-empty ``--out`` unless it is this user's export of ``run_dir`` of the same ``kind``, every file
    in it one the export wrote, unchanged."""
    run = run_dir.resolve()
    names = sorted(p.name for p in out.iterdir())
    if earlier_export_of(out) != str(run):
        what = "another run's folder" if any((out / n).is_file() for n in RUN_FILES) else "not empty"
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ExportRefused(f"--out {out} is {what} (it holds {shown}) and not an earlier export of {run_dir}; "
                            "nothing was changed: choose a new or empty folder")
    marker = read_marker(out)
    files = marker.get("files")
    if not isinstance(files, dict):
        raise ExportRefused(f"--out {out}: its {MARKER} lists no files (an older export, or a marker copied or "
                            "written by hand), so the export cannot tell its own files from yours; nothing was "
                            f"changed: choose a new or empty folder, or empty {out} yourself")
    if not signed_here(marker):
        raise ExportRefused(f"--out {out}: its {MARKER} is not signed by this user's `qwen-cls export` (written or "
                            "edited by hand, from another machine, or from an older version), so it proves "
                            "nothing about the files it lists; nothing was changed: choose a new or empty "
                            f"folder, or empty {out} yourself")
    if marker.get("kind") != kind:
        raise ExportRefused(f"--out {out}: holds {KIND_NAMES.get(marker.get('kind'), 'another kind of export')} "
                            f"of {run_dir}, which {KIND_NAMES[kind]} does not replace; nothing was changed: "
                            f"choose another --out, or delete {out} yourself first")
    found = not_written_by_export(out, files)
    if found is not None:
        path, why = found
        raise ExportRefused(f"--out {out} holds {path}, {why}; nothing was changed: move it out of {out} (or "
                            "choose a new folder for --out) and rerun")


def export_card(config: dict, metrics: dict | None, run_dir: str | os.PathLike) -> str:
    """A short Markdown model card: what was merged, how to use it, the run's metrics."""
    lines = [
        "# qwen-cls merged classifier", "",
        f"Base model `{config['base_model']}` with the LoRA adapter of run `{run_dir}` merged in "
        "(`merge_and_unload`). It answers the classification prompt of `qwen_cls.prompt` (in its model family's "
        "chat format) with one of "
        "the candidate labels.", "",
        f"- max_length: {config['max_length']}",
        f"- LoRA: {json.dumps(config.get('lora', {}), ensure_ascii=False)}",
        f"- seed: {config.get('seed')}", "",
        "Use: `qwen-cls predict --model <this folder> --input rows.jsonl --output predictions.jsonl`", "",
        "## Metrics (from the run's metrics.json)", "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {metrics[k]:.4f} |" if isinstance(metrics[k], float) else f"| {k} | {metrics[k]} |"
                  for k in METRIC_KEYS if k in metrics]
    else:
        lines.append("The run has no metrics.json (not evaluated).")
    if config.get("base_model") == TINY or (metrics or {}).get("tiny_model"):
        lines += ["", "**Tiny random model**: it learned nothing; these numbers show the mechanics only."]
    return "\n".join(lines) + "\n"


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge ``run_dir``'s adapter into its base model and save it (safetensors) to ``out_dir``."""
    import torch

    run_dir, out = Path(run_dir), Path(out_dir)
    check_run_finished(run_dir)  # as predict: not a run still being written, failed, or never evaluated
    check_run_files(run_dir)  # its run_config.json and adapter readable, as predict and serve check them
    check_out_dir(run_dir, out, PLAIN)
    model, tokenizer, config = load_run(run_dir, device="cpu", dtype=torch.float32)  # merged in float32, not rounded
    merged = model.merge_and_unload()
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None

    with atomic_dir(out) as tmp:  # a failure leaves no half-written export
        save_weights(merged, tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        exported = {**config, "dtype": "float32", "exported_from": str(run_dir), "merged": True}
        (tmp / RUN_CONFIG).write_text(json.dumps(exported, ensure_ascii=False, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(export_card(config, metrics, run_dir), encoding="utf-8")
        write_marker(tmp, run_dir, PLAIN)
        check_out_dir(run_dir, out, PLAIN)  # again, just before the old export is replaced: files added meanwhile stay
    return out


SEQ_CLS_DIR = "seq_cls"  # notebook 06's sequence-classification adapter + head, inside the run folder


def seq_cls_card(meta: dict, run_dir: str | os.PathLike, architecture: str) -> str:
    """The model card of a ``--seq-cls`` export: what it is and how engines load it."""
    return "\n".join([
        "# qwen-cls merged sequence classifier", "",
        f"Notebook 06's `seq_cls_lora` of run `{run_dir}`: base model `{meta['base_model']}` as `{architecture}`, "
        "its LoRA adapter and trained `score` head merged in (`merge_and_unload`). It reads the text alone (no "
        f"prompt) and gives one logit per label: {', '.join(meta['labels'])} (`id2label` / `label2id` in "
        "`config.json`). 06 restricts the choice to each row's candidates: take the best-scoring candidate.", "",
        f"- max_length: {meta['max_length']} tokens (06 truncates to it; the tokenizer's `model_max_length`)", "",
        "Use: `transformers.pipeline(\"text-classification\", model=<this folder>, top_k=None)(text, "
        "truncation=True)`, or vLLM: `vllm serve <this folder> --runner pooling --convert classify` "
        "(`/classify`).",
        ""])


def read_seq_cls_meta(folder: Path, rerun: str) -> dict:
    """``seq_cls.json`` of 06's ``folder`` (``base_model``, ``labels``, ``max_length``), named when it is broken."""
    from ..approaches import SEQ_CLS_FILE

    path = folder / SEQ_CLS_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, getattr(exc, "lineno", None), f"not valid JSON; {rerun}") from None
    missing = [k for k in ("base_model", "labels", "max_length") if k not in meta] if isinstance(meta, dict) else None
    if missing is None or missing:
        raise DataError(path, None, f"lacks {', '.join(map(repr, missing or ['everything']))}; {rerun}")
    return meta


def export_seq_cls(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge ``run_dir/seq_cls`` (06's adapter and trained head) into its base and save it to ``out_dir`` as a
    ``*ForSequenceClassification`` folder with ``id2label`` / ``label2id``, under the same ``--out`` rules as
    :func:`export_run` (same checks, same marker)."""
    import torch

    from ..approaches import SEQ_CLS_FILE, load_seq_cls

    run_dir, out = Path(run_dir), Path(out_dir)
    folder = run_dir / SEQ_CLS_DIR
    check_run_finished(run_dir)
    if not (folder / SEQ_CLS_FILE).is_file():
        raise FileNotFoundError(f"{folder / SEQ_CLS_FILE}: no sequence-classification model in this run; notebook "
                                "06 (06_approaches) writes it: run it with this run folder as out_dir first")
    rerun = "rerun notebook 06 (06_approaches) with this run folder as out_dir, or restore seq_cls/ from a copy"
    saved = read_seq_cls_meta(folder, rerun)
    check_adapter(folder, fix=f"the sequence classifier is damaged: {rerun}")
    check_out_dir(run_dir, out, SEQ_CLS)
    model, tokenizer, labels, max_length = load_seq_cls(folder, device="cpu", dtype=torch.float32)  # merged unrounded
    merged = model.merge_and_unload()  # the LoRA deltas into the weights, the trained head in place of the new one
    merged.config.id2label = dict(enumerate(labels))
    merged.config.label2id = {label: i for i, label in enumerate(labels)}
    tokenizer.model_max_length = max_length  # pipeline(..., truncation=True) cuts where 06 cut
    meta = {"base_model": str(saved["base_model"]), "labels": list(labels), "max_length": max_length}
    with atomic_dir(out) as tmp:  # a failure leaves no half-written export
        save_weights(merged, tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        (tmp / SEQ_CLS_FILE).write_text(json.dumps({**meta, "exported_from": str(run_dir), "merged": True},
                                                   ensure_ascii=False, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(seq_cls_card(meta, run_dir, type(merged).__name__), encoding="utf-8")
        write_marker(tmp, run_dir, SEQ_CLS)
        check_out_dir(run_dir, out, SEQ_CLS)  # again just before the old export is replaced: files added meanwhile stay
    return out


def cmd_export(args) -> int:
    if args.seq_cls:
        out = export_seq_cls(args.run, args.out)
        print(f"merged sequence classifier: {out}")
        return 0
    out = export_run(args.run, args.out)
    print(f"merged model: {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="merge a run's LoRA adapter into the base model (safetensors)")
    p.add_argument("--run", required=True, help="run dir (adapter/ + run_config.json)")
    p.add_argument("--out", required=True, help="new or empty folder for the merged model (or an earlier, "
                   "unchanged export of the same run, which is replaced)")
    p.add_argument("--seq-cls", action="store_true", help="export notebook 06's sequence-classification model "
                   "(RUN/seq_cls) instead: a *ForSequenceClassification folder with id2label, for "
                   "transformers.pipeline('text-classification') and vLLM's classify")
    p.set_defaults(func=cmd_export)
