"""Checkpoints that survive ``kill -9``: written atomically, rotated, and found again on resume.

``Trainer`` writes each checkpoint into ``checkpoints/.staging``; :class:`ResumableTrainer` renames the
finished folder to ``checkpoints/checkpoint-N`` (so a checkpoint either exists completely or not at all)
and rotates the oldest away. :func:`last_complete_checkpoint` skips anything incomplete all the same.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from .train import AnswerOnlyTrainer

CHECKPOINTS = "checkpoints"
STAGING = ".staging"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# A checkpoint is complete when all of these exist (the trainer state is written last) ...
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
# ... or, under DeepSpeed (which keeps optimizer and scheduler in its own folder), these.
DEEPSPEED_CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "latest")


def is_complete_checkpoint(folder: Path) -> bool:
    """True when ``folder`` holds everything needed to resume (see :data:`CHECKPOINT_FILES`)."""
    if not folder.is_dir():
        return False
    if all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return True
    if all((folder / name).is_file() for name in DEEPSPEED_CHECKPOINT_FILES):
        tag = (folder / "latest").read_text(encoding="utf-8").strip()
        return bool(tag) and (folder / tag).is_dir()  # DeepSpeed's global_stepN folder
    return False


def last_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The highest-step complete ``checkpoints/checkpoint-N`` of a run dir; incomplete folders are skipped."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    for _, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            return path
    return None


def remove_incomplete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the staging folder and any ``checkpoint-N`` that is not complete; return what was removed."""
    folder = Path(run_dir) / CHECKPOINTS
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name == STAGING or (CHECKPOINT_RE.match(path.name) and not is_complete_checkpoint(path)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


class ResumableTrainer(AnswerOnlyTrainer):
    """:class:`AnswerOnlyTrainer` with atomic checkpoints and a count of the batches this rank trained on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_seen = 0
        self.rows_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.batches_seen += 1
            self.rows_seen += int(inputs["input_ids"].shape[0])
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        """Let ``Trainer`` write into ``checkpoints/.staging``, then rename the finished folder into place."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        final_root = self.args.output_dir
        staging = os.path.join(final_root, STAGING)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = final_root
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            target = os.path.join(final_root, name)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=final_root, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


class SleepAfterStep(TrainerCallback):
    """Test hook: sleep after each optimizer step so that an interruption can be staged."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)
