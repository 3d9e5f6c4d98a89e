"""The comparison a ``qwen-cls sweep`` writes from its points' own files: ``sweep.csv`` and ``sweep.md`` (one row
per point, ranked by validation accuracy alone: :func:`ranked`) and ``sweep.png`` (:func:`sweep_plot`), each
rewritten only when its content changes. :mod:`qwen_cls.chain.sweep` runs the points and calls
:func:`write_comparison`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from ..files import atomic_file
from ..run_record import METRICS, RUN_CONFIG, TRAIN_LOG

TABLE_CSV, TABLE_MD, PLOT = "sweep.csv", "sweep.md", "sweep.png"
# Columns after the grid keys. Points are ranked by validation_accuracy (03's last evaluation on validation rows,
# metrics.json's validation); accuracy, macro_f1 and zero_shot are the test rows' (04), shown, never ranked by.
RESULTS = ("validation_accuracy", "accuracy", "macro_f1", "zero_shot", "train_seconds")


def value_text(value) -> str:
    """A value as it appears in a point name and the tables: shortest float repr (``0.001``), else ``str``."""
    return repr(value) if isinstance(value, float) else str(value)


def sweep_arguments(record: dict) -> str:
    """``--profile tiny -g learning_rate 0.001,0.005 -p max_train_samples 16`` for a ``sweep.json`` record."""
    text = f"--profile {record.get('profile')}"
    for key, values in dict(record.get("grid") or {}).items():
        text += f" -g {key} {','.join(value_text(v) for v in values)}"
    for key, value in dict(record.get("fixed") or {}).items():
        text += f" -p {key} {value_text(value)}"
    return text


def train_seconds(folder: Path) -> float | None:
    """Training time of a run: ``run_config.json``'s ``training.train_seconds``, else the Trainer's
    ``train_runtime`` in ``train_log.json`` (``None`` when neither records it)."""
    with contextlib.suppress(OSError, ValueError, LookupError, TypeError):
        seconds = json.loads((folder / RUN_CONFIG).read_text(encoding="utf-8"))["training"]["train_seconds"]
        if isinstance(seconds, (int, float)):
            return float(seconds)
    with contextlib.suppress(OSError, ValueError):
        log = json.loads((folder / TRAIN_LOG).read_text(encoding="utf-8"))
        for entry in reversed(log if isinstance(log, list) else []):
            if isinstance(entry, dict) and isinstance(entry.get("train_runtime"), (int, float)):
                return float(entry["train_runtime"])
    return None


def result_row(point, folder: Path) -> dict:
    """One row of the comparison for ``point`` (a :class:`~qwen_cls.chain.sweep.Point`: its ``name`` and grid
    ``values``), read from its run ``folder``: ``point``, the grid values, ``validation_accuracy``
    (``metrics.json``'s ``validation``: 03's last evaluation on validation rows), the test rows' ``accuracy``,
    ``macro_f1``, ``zero_shot`` (accuracy with the adapter off, where ``metrics.json`` has it) and ``train_seconds``."""
    metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
    zero_shot = metrics.get("zero_shot")
    validation = metrics.get("validation")
    return {"point": point.name, **point.values,
            "validation_accuracy": validation.get("accuracy") if isinstance(validation, dict) else None,
            "accuracy": metrics.get("accuracy"),
            "macro_f1": metrics.get("macro_f1"),
            "zero_shot": zero_shot.get("accuracy") if isinstance(zero_shot, dict) else None,
            "train_seconds": train_seconds(folder), "tiny_model": bool(metrics.get("tiny_model"))}


def ranked(rows: list[dict]) -> list[dict]:
    """``rows`` best first by ``validation_accuracy`` alone (ties and points without one keep their grid order,
    the latter last), each with its ``rank`` (1 = best; ``None`` without a validation accuracy). The test
    accuracy plays no part: choosing by it would be model selection on the test rows."""
    def key(item):
        position, row = item
        value = row["validation_accuracy"]
        missing = value is None or isinstance(value, float) and math.isnan(value)
        return (missing, 0.0 if missing else -value, position)

    order = [row for _, row in sorted(enumerate(rows), key=key)]
    out, rank = [], 0
    for row in order:
        has = row["validation_accuracy"] is not None and not (isinstance(row["validation_accuracy"], float)
                                                              and math.isnan(row["validation_accuracy"]))
        rank += has
        out.append({**row, "rank": rank if has else None})
    return out


def csv_text(rows: list[dict], keys: list[str]) -> str:
    """``sweep.csv``: one row per point, ranked (:func:`ranked`); empty cells where a run recorded nothing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "point", *keys, *RESULTS])
    for row in ranked(rows):
        writer.writerow(["" if row[c] is None else value_text(row[c]) for c in ("rank", "point", *keys, *RESULTS)])
    return buffer.getvalue()


def _cell(value, digits: int) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_text(rows: list[dict], keys: list[str], record: dict) -> str:
    """``sweep.md``: the command, then the table ranked by validation accuracy (:func:`ranked`; accuracies and
    macro-F1 to 3 places, seconds to 1)."""
    lines = [f"# qwen-cls sweep {sweep_arguments(record)}", "",
             "Ranked by validation accuracy (validation rows split off the training file); the test columns "
             "(accuracy, macro_f1, zero_shot) are shown, never ranked by.", ""]
    lines.append("| rank | point | " + " | ".join(keys) + " | validation_accuracy | test accuracy | test macro_f1 | "
                 "test zero_shot | train_seconds |")
    lines.append("|---" * (len(keys) + 7) + "|")
    for row in ranked(rows):
        cells = ["—" if row["rank"] is None else str(row["rank"]), row["point"], *(value_text(row[k]) for k in keys),
                 _cell(row["validation_accuracy"], 3), _cell(row["accuracy"], 3),
                 _cell(row["macro_f1"], 3), _cell(row["zero_shot"], 3), _cell(row["train_seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if any(row["tiny_model"] for row in rows):
        lines += ["", "tiny random Qwen2: it learns nothing; these numbers show the mechanics only, not results"]
    return "\n".join(lines) + "\n"


def _write_text_if_changed(path: Path, text: str) -> bool:
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return False
    with atomic_file(path) as handle:
        handle.write(text)
    return True


def write_comparison(out: Path, points: list, record: dict, *, force: bool = False) -> list[dict]:
    """``sweep.csv``, ``sweep.md`` and ``sweep.png`` from the points' own files; each written (atomically)
    only when its content changes (``force``: the plot is drawn again even so)."""
    keys = list(record["grid"])
    rows = [result_row(point, out / point.name) for point in points]
    changed = _write_text_if_changed(out / TABLE_CSV, csv_text(rows, keys))
    _write_text_if_changed(out / TABLE_MD, markdown_text(rows, keys, record))
    if changed or force or not (out / PLOT).is_file():
        import matplotlib.pyplot as plt

        fig = sweep_plot(rows, keys, path=out / PLOT, title=f"qwen-cls sweep ({record['profile']})")
        plt.close(fig)
    return rows


def sweep_plot(rows: Sequence[Mapping], keys: Sequence[str], *, path=None, title="Accuracy per sweep point"):
    """Test accuracy per point of a ``qwen-cls sweep`` (``rows``: the grid values under ``keys``,
    ``accuracy`` and optionally ``zero_shot``). One key: its values along x (in grid order), one line, and
    the zero-shot accuracy dashed; two keys: the first along x, a line per value of the second; more: a bar
    per point."""
    import matplotlib.pyplot as plt

    from ..plots import finish_figure

    keys = list(keys)
    fig, ax = plt.subplots(figsize=(7, 3.5))

    def along(key):  # the key's values in grid order, and each row's position among them
        values = list(dict.fromkeys(row[key] for row in rows))
        return values, [values.index(row[key]) for row in rows]

    if len(keys) <= 2:
        xs, positions = along(keys[0])
        groups = list(dict.fromkeys(row[keys[1]] for row in rows)) if len(keys) == 2 else [None]
        for group in groups:
            chosen = [(x, row) for x, row in zip(positions, rows) if group is None or row[keys[1]] == group]
            chosen = [(x, row) for x, row in sorted(chosen, key=lambda item: item[0]) if row["accuracy"] is not None]
            if not chosen:
                continue
            label = "accuracy (LoRA)" if group is None else f"{keys[1]} = {value_text(group)}"
            ax.plot([x for x, _ in chosen], [row["accuracy"] for _, row in chosen], marker="o", label=label)
            for x, row in chosen:
                ax.annotate(f"{row['accuracy']:.2f}", (x, row["accuracy"]), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=8)
        zero = [(x, row["zero_shot"]) for x, row in zip(positions, rows) if row.get("zero_shot") is not None]
        if len(keys) == 1 and zero:
            ax.plot(*zip(*sorted(zero)), color="grey", linestyle="--", marker=".", label="zero-shot (adapter off)")
        ax.set_xticks(range(len(xs)), [value_text(x) for x in xs])
        ax.set_xlabel(keys[0])
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(3, len(groups) + 1), frameon=False)
    else:
        names = [row.get("point") or ",".join(value_text(row[k]) for k in keys) for row in rows]
        ax.bar(range(len(rows)), [row["accuracy"] or 0 for row in rows])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("point")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.08)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return finish_figure(fig, path)
