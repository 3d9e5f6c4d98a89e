"""Matplotlib figures of the notebooks: label distribution, token lengths, loss and learning curves,
confusion matrix.

Each function returns the ``Figure``; with ``path`` it is also saved as PNG (temp file + rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .data import atomic_file


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_file(path, binary=True) as handle:
        fig.savefig(handle, dpi=dpi, bbox_inches="tight", format="png")
    return path


def _finish(fig, path):
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
    ax.legend()
    return _finish(fig, path)


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
    ax.legend()
    return _finish(fig, path)


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
    return _finish(fig, path)


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
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.08)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _finish(fig, path)


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
    return _finish(fig, path)
