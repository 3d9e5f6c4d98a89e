"""Experiment tracking with SwanLab (provisional API; the tracking issue completes it).

``swanlab_mode``: ``local`` (dashboard package installed), ``offline``, ``disabled``, ``cloud``.
"""

from __future__ import annotations

import os
from pathlib import Path

MODES = ("local", "offline", "disabled", "cloud")


def swanlab_callbacks(mode: str, out_dir: str | os.PathLike, config: dict, *, project: str = "qwen-cls",
                      experiment_name: str | None = None) -> list:
    """Trainer callbacks that log to SwanLab under ``out_dir/swanlog``; ``[]`` when disabled."""
    if mode not in MODES:
        raise ValueError(f"swanlab_mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "disabled":
        return []
    from swanlab.integration.transformers import SwanLabCallback

    log_dir = Path(out_dir) / "swanlog"
    log_dir.mkdir(parents=True, exist_ok=True)
    swan_mode = "offline" if mode == "offline" else mode
    callback = SwanLabCallback(project=project, experiment_name=experiment_name, log_dir=str(log_dir),
                               mode=swan_mode)
    callback.update_config(config)
    return [callback]


def log_evaluation(metrics: dict, *, confusion_png: str | os.PathLike | None = None,
                   samples: list[dict] | None = None) -> None:
    """Log evaluation metrics (and the confusion matrix image, sample predictions) to the active run."""
    import swanlab

    if swanlab.get_run() is None:
        return
    swanlab.log({f"eval/{k}": metrics[k] for k in ("accuracy", "macro_f1", "invalid_rate") if k in metrics})
    if confusion_png is not None:
        swanlab.log({"eval/confusion_matrix": swanlab.Image(str(confusion_png))})
    if samples:
        lines = [f"{s.get('prediction')} | truth {s.get('output')} | {s.get('category')} | {s.get('text', '')[:80]}"
                 for s in samples]
        swanlab.log({"eval/samples": swanlab.Text("\n".join(lines))})


def finish() -> None:
    """Close the active SwanLab run, if any."""
    import swanlab

    if swanlab.get_run() is not None:
        swanlab.finish()
