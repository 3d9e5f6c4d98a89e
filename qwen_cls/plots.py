"""Matplotlib figures of the notebooks: label distribution, token lengths, loss and learning curves,
confusion matrix, reliability diagram, accuracy vs coverage, accuracy against cost (notebook 06), and two
explanatory pictures: one training row as a strip of tokens coloured by role (:func:`token_strip`) and the
LoRA idea with a model's real shapes (:func:`lora_picture`).

Each function returns the ``Figure``; with ``path`` it is also saved as PNG (temp file + rename).
Importing this module registers the Simplified-Chinese font of :mod:`qwen_cls.fonts` (Noto Sans SC, from the
PyPI package ``pylopdf-fonts-zh-cn``) so that Chinese titles and token text render instead of empty boxes.

Taught in: 01, 02, 03, 04, 06
"""

from __future__ import annotations

import math
import os
import unicodedata
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from .files import atomic_file
from .fonts import use_cjk_font

CJK_FONT_FAMILY = use_cjk_font()  # Chinese text in every figure: registered on import


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_file(path, binary=True) as handle:
        fig.savefig(handle, dpi=dpi, bbox_inches="tight", format="png")
    return path


def finish_figure(fig, path):
    """Lay ``fig`` out and save it atomically at ``path`` (none: not saved); returns the figure."""
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def label_distribution(counts_by_split: Mapping[str, Mapping[str, int]], *, path=None, title="Label distribution"):
    """Grouped horizontal bars: rows per answer label, one colour per split (e.g. train / test)."""
    labels = sorted({label for counts in counts_by_split.values() for label in counts},
                    key=lambda lab: -sum(c.get(lab, 0) for c in counts_by_split.values()))
    height = 0.8 / max(1, len(counts_by_split))
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.5))
    y = np.arange(len(labels))
    for k, (split, counts) in enumerate(counts_by_split.items()):
        ax.barh(y + k * height, [counts.get(lab, 0) for lab in labels], height=height, label=split)
    ax.set_yticks(y + height * (len(counts_by_split) - 1) / 2, labels)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars, never on them
    return finish_figure(fig, path)


def length_histogram(lengths: Sequence[int], max_length: int, *, recipe_lengths: Sequence[int] | None = None,
                     path=None, title="Tokens per training row"):
    """Histogram of row lengths with the ``max_length`` cut marked; optionally the untruncated lengths too."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = list(lengths) + list(recipe_lengths or [])
    bins = np.linspace(0, max(max(values), max_length) * 1.05, 40)
    if recipe_lengths is not None:
        ax.hist(recipe_lengths, bins=bins, alpha=0.5, label="before truncation (prompt + answer + end)")
    ax.hist(lengths, bins=bins, alpha=0.7, label="after answer-preserving truncation")
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length = {max_length}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)  # below the axes
    return finish_figure(fig, path)


def loss_curve(log_history: Sequence[dict], *, path=None, title="Training loss (answer tokens only)"):
    """Training loss per logged step from ``trainer.state.log_history``."""
    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return finish_figure(fig, path)


def learning_curve(history: Sequence[dict], *, chance: float | None = None,
                   key: str = "eval_accuracy", path=None, title="Accuracy on held-out rows while training"):
    """Accuracy per epoch (``history`` entries ``{"epoch", key}``, epoch 0 = before training), with the
    chance level (guessing among each row's candidates) drawn as a dashed line."""
    points = [(e["epoch"], e[key]) for e in history if key in e]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if points:
        epochs, values = zip(*points)
        ax.plot(epochs, values, marker="o", label="accuracy (candidate scoring)")
        for x, y in points:
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", label=f"chance = {chance:.2f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.08)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)  # below the axes
    return finish_figure(fig, path)


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], *, path=None,
                     title="Confusion matrix"):
    """Confusion matrix heat map (rows = truth, columns = prediction) with counts in the cells."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(labels)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    ax.set_title(title)
    return finish_figure(fig, path)


def reliability_diagram(bins: Sequence[Mapping], *, ece: float | None = None, path=None,
                        title="Reliability diagram"):
    """Calibration: per confidence bin (``metrics.reliability_bins``) the accuracy as a bar against the
    diagonal (perfect calibration), the gap to the bin's mean confidence shaded, row counts above the bars."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    for b in bins:
        if not b["count"]:
            continue
        ax.bar(b["low"], b["accuracy"], width=width, align="edge", color="#4c72b0", edgecolor="white",
               label="accuracy in bin" if b is next(x for x in bins if x["count"]) else None)
        low, high = sorted((b["accuracy"], b["confidence"]))
        ax.bar(b["low"], high - low, bottom=low, width=width, align="edge", color="#dd8452", alpha=0.35,
               edgecolor="#dd8452", hatch="//",
               label="gap to mean confidence" if b is next(x for x in bins if x["count"]) else None)
        ax.text(b["low"] + width / 2, max(b["accuracy"], b["confidence"]) + 0.02, str(b["count"]), ha="center",
                fontsize=7, color="dimgrey")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("confidence (probability of the predicted label)")
    ax.set_ylabel("accuracy")
    ax.set_title(title + (f"\nECE = {ece:.3f} (numbers above bars: rows)" if ece is not None else ""), fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return finish_figure(fig, path)


def accuracy_coverage(curve: Sequence[Mapping], *, path=None, title="Accuracy vs coverage (abstention)"):
    """Accuracy of the answered rows against the share answered, one point per confidence threshold
    (``metrics.accuracy_coverage``), each labelled with its threshold."""
    points = [(c["coverage"], c["accuracy"], c["threshold"]) for c in curve if c["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        xs, ys, ts = zip(*points)
        ax.plot(xs, ys, marker="o")
        for x, y, t in points:
            ax.annotate(f"≥{t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.05)
    ax.invert_xaxis()  # left to right: a stricter threshold, fewer rows answered
    ax.set_xlabel("coverage (share of rows answered)")
    ax.set_ylabel("accuracy on answered rows")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return finish_figure(fig, path)


def approaches_cost(table: Mapping[str, Mapping], *, chance: float | None = None, path=None,
                    title="Accuracy against cost"):
    """Two panels, accuracy on the y axis of both: against training seconds (left) and against inference
    milliseconds per row (right, log scale), one labelled point per method of ``approaches.json``."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    placed = {left: [], right: []}  # labelled points per panel: a close neighbour's label goes below its point
    xs = {left: [], right: []}
    for k, (method, m) in enumerate(table.items()):
        color = colors[k % len(colors)]
        ms_per_row = 1000 / m["rows_per_second"] if m["rows_per_second"] else float("nan")
        for ax, x in ((left, m["train_seconds"]), (right, ms_per_row)):
            y = m["accuracy"]
            ax.scatter([x], [y], color=color, s=40, zorder=3)
            near = any(abs(y - py) < 0.05 and abs(math.log10(1 + x) - math.log10(1 + px)) < 0.6
                       for px, py in placed[ax])
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, -11 if near else 4), fontsize=8)
            placed[ax].append((x, y))
            xs[ax].append(x)
    left.set_xscale("symlog", linthresh=1.0)  # 0 s (nothing to train) stays on the axis
    right.set_xscale("log")
    finite = [x for x in xs[left] if math.isfinite(x)]
    left.set_xlim(-0.3, max(finite + [1.0]) * 6)  # room right of the points for their labels; no negative ticks
    shown = [x for x in xs[right] if math.isfinite(x) and x > 0]
    if shown:
        right.set_xlim(min(shown) / 2, max(shown) * 6)
    left.set_xlabel("training seconds (0: nothing to train)")
    right.set_xlabel("inference milliseconds per test row")
    left.set_ylabel("accuracy")
    for ax in (left, right):
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    if chance is not None:
        left.legend(loc="lower right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return finish_figure(fig, path)


# --- pictures that explain -------------------------------------------------------------------------------

ROLE_COLORS = {"prompt": "#d9d9d9", "answer": "#f4a261", "padding": "#ffffff"}  # face colour per token role
ROLE_NAMES = {"prompt": "prompt: labels = -100, 不算 loss",
              "answer": "answer + 结束符: 算 loss (supervised)",
              "padding": "padding: attention_mask = 0, labels = -100"}


def _as_list(values) -> list[int] | None:
    if values is None:
        return None
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def token_roles(input_ids, labels, *, attention_mask=None, pad_token_id: int | None = None) -> list[str]:
    """Role of each position: ``"padding"`` (attention_mask 0; without a mask, the pad id with label -100),
    ``"answer"`` (a label other than -100: the answer and the end-of-turn token), else ``"prompt"``."""
    ids, labels, mask = _as_list(input_ids), _as_list(labels), _as_list(attention_mask)
    if len(labels) != len(ids) or (mask is not None and len(mask) != len(ids)):
        raise ValueError("input_ids, labels and attention_mask must have the same length")
    roles = []
    for k, (token, label) in enumerate(zip(ids, labels)):
        if (mask is not None and mask[k] == 0) or (mask is None and token == pad_token_id and label == -100):
            roles.append("padding")
        else:
            roles.append("answer" if label != -100 else "prompt")
    return roles


def _text_width(text: str) -> int:
    """Display width in half-width cells (a Chinese character takes two)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _token_text(tokenizer, token: int, max_width: int) -> str:
    text = tokenizer.decode([token])
    if "\ufffd" in text:  # part of a multi-byte character: one token is not a whole character
        return "<字节>"
    text = text.replace("\n", "↵").replace(" ", "␣") or "∅"
    if _text_width(text) > max_width:
        while _text_width(text) > max_width - 1:
            text = text[:-1]
        text += "…"
    return text


def _shown_positions(roles: list[str], head: int, tail: int, pads: int) -> list[int | tuple[int, int]]:
    """Positions to draw: all of a short row; else the first ``head`` tokens, the last ``tail`` tokens before
    the padding and the first ``pads`` and the last padding tokens, each gap as ``(start, stop)``."""
    n = len(roles)
    if n <= head + tail:
        return list(range(n))
    real = [k for k, role in enumerate(roles) if role != "padding"]
    padding = [k for k, role in enumerate(roles) if role == "padding"]
    last = real[-1] if real else n - 1
    keep = set(range(head)) | set(range(max(0, last - tail + 1), last + 1)) | set(padding[:pads] + padding[-1:])
    shown, previous = [], -1
    for k in sorted(keep):
        if k > previous + 1:
            shown.append((previous + 1, k))  # an ellipsis box for the hidden tokens previous+1 .. k-1
        shown.append(k)
        previous = k
    return shown


def token_strip(input_ids, labels, tokenizer, *, attention_mask=None, head: int = 24, tail: int = 24,
                pads: int = 3, max_token_width: int = 16, line_width: int = 110, path=None,
                title="一行训练数据 (one training row)"):
    """One training row as a strip of token boxes coloured by role (prompt masked with -100, supervised
    answer incl. the end-of-turn token, padding), the decoded text in each box and its label below it.

    Rows longer than ``head + tail`` tokens show the first ``head`` tokens, the last ``tail`` tokens before
    the padding (so the answer is always seen) and a few padding tokens, with an ellipsis box for each gap;
    the counts per role in the legend are over the whole row.
    """
    ids, label_list = _as_list(input_ids), _as_list(labels)
    roles = token_roles(ids, label_list, attention_mask=attention_mask, pad_token_id=tokenizer.pad_token_id)
    counts = {role: roles.count(role) for role in ROLE_COLORS}
    boxes, x, line = [], 0.0, 0  # (x, line, width, text, role, label text)
    for k in _shown_positions(roles, head, tail, pads):
        if isinstance(k, tuple):
            text, role, below = f"… 省略 {k[1] - k[0]} 个 token …", "ellipsis", ""
        else:
            role = roles[k]
            text = "pad" if role == "padding" else _token_text(tokenizer, ids[k], max_token_width)
            below = str(label_list[k])
        width = max(_text_width(text), 3) + 1.5
        if x + width > line_width and x > 0:
            x, line = 0.0, line + 1
        boxes.append((x, line, width, text, role, below))
        x += width + 0.4
    n_lines = line + 1
    fig, ax = plt.subplots(figsize=(10, 0.62 * n_lines + 1.3))
    for x, line, width, text, role, below in boxes:
        y = -line * 2.0
        if role == "ellipsis":
            ax.add_patch(Rectangle((x, y), width, 1.0, facecolor="none", edgecolor="grey", linestyle=":",
                                   gid="ellipsis"))
            ax.text(x + width / 2, y + 0.5, text, ha="center", va="center", fontsize=8, color="dimgrey")
            continue
        ax.add_patch(Rectangle((x, y), width, 1.0, facecolor=ROLE_COLORS[role], gid=role,
                               edgecolor="grey" if role != "padding" else "darkgrey",
                               linestyle="--" if role == "padding" else "-", linewidth=0.8))
        ax.text(x + width / 2, y + 0.5, text, ha="center", va="center", fontsize=8,
                color="darkgrey" if role == "padding" else "black")
        ax.text(x + width / 2, y - 0.12, below, ha="center", va="top", fontsize=5.5,
                color="#c0392b" if role == "answer" else "grey")
    ax.set_xlim(-0.5, line_width + 0.5)
    ax.set_ylim(-2.0 * line - 0.9, 1.2)
    ax.axis("off")
    handles = [Patch(facecolor=ROLE_COLORS[r], edgecolor="grey", linestyle="--" if r == "padding" else "-",
                     label=f"{ROLE_NAMES[r]} ({counts[r]} 个)") for r in ROLE_COLORS]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False, fontsize=8)
    ax.set_title(f"{title}: {len(ids)} 个 token, 框下的小字是 labels", fontsize=10)
    return finish_figure(fig, path)


def lora_parameter_counts(d_in: int, d_out: int, r: int) -> dict:
    """Parameters of a frozen ``W`` (d_out × d_in) and of LoRA's ``A`` (r × d_in) and ``B`` (d_out × r)."""
    counts = {"W": d_out * d_in, "A": r * d_in, "B": d_out * r}
    counts["lora"] = counts["A"] + counts["B"]
    counts["ratio"] = counts["lora"] / counts["W"]
    return counts


def lora_picture(d_in: int, d_out: int, r: int, alpha: float, *, name: str = "q_proj", path=None, title=None):
    """The LoRA idea with real shapes: ``h = W x + (alpha / r) · B A x``, ``W`` frozen (d_out × d_in),
    ``B`` (d_out × r) and ``A`` (r × d_in) trained, with the parameter counts of ``W`` and of ``A + B``.

    Sizes are to scale except the rank direction, drawn wider so that a rank of 8 stays visible.
    """
    counts = lora_parameter_counts(d_in, d_out, r)
    side = 4.0
    w_w, w_h = side * d_in / max(d_in, d_out), side * d_out / max(d_in, d_out)
    thin = max(side * r / max(d_in, d_out), 0.35)  # the rank direction, widened for the eye
    fig, ax = plt.subplots(figsize=(10, 4.6))
    top = w_h
    x = 0.0
    ax.add_patch(Rectangle((x, 0), w_w, w_h, facecolor="#cfd8dc", edgecolor="#455a64", hatch="//", gid="W"))
    ax.text(x + w_w / 2, w_h / 2, f"W  (冻结 frozen)\n{d_out} × {d_in}\n{counts['W']:,} 参数",
            ha="center", va="center", fontsize=10, bbox=dict(facecolor="white", edgecolor="none", alpha=0.85))
    x += w_w + 0.35
    ax.text(x + 0.25, top / 2, "+", ha="center", va="center", fontsize=22)
    x += 0.8
    ax.text(x + 0.7, top / 2, f"α / r\n= {alpha:g} / {r}\n= {alpha / r:g}", ha="center", va="center", fontsize=10)
    x += 1.6
    ax.add_patch(Rectangle((x, 0), thin, w_h, facecolor="#f4a261", edgecolor="#9c4a12", gid="B"))
    ax.text(x + thin / 2, -0.15, f"B (训练)\n{d_out} × {r}\n{counts['B']:,} 参数", ha="center", va="top", fontsize=9)
    x += thin + 0.3
    ax.text(x + 0.1, top / 2, "·", ha="center", va="center", fontsize=22)
    x += 0.45
    ax.add_patch(Rectangle((x, top - thin), w_w, thin, facecolor="#f4a261", edgecolor="#9c4a12", gid="A"))
    ax.text(x + w_w / 2, top - thin - 0.15, f"A (训练)  {r} × {d_in}\n{counts['A']:,} 参数", ha="center", va="top",
            fontsize=9)
    x += w_w
    ax.text(x / 2, -1.35,
            f"可训练 (trainable) A + B = {r} × ({d_in} + {d_out}) = {counts['lora']:,} 参数"
            f" = W 的 {counts['ratio']:.2%}\nB 初始为 0, 所以训练开始时 B·A = 0, 模型就是基座本身",
            ha="center", va="top", fontsize=9.5)
    ax.set_xlim(-0.3, x + 0.3)
    ax.set_ylim(-2.0, top + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title or f"LoRA on {name}:  h = W x + (α / r) · B A x   (r 方向放大画出, 其余按比例)", fontsize=11)
    return finish_figure(fig, path)
