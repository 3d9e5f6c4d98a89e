"""Checkpoints that survive ``kill -9``: written atomically, rotated, and found again on resume.

``Trainer`` writes each checkpoint into ``checkpoints/.staging``; :class:`ResumableTrainer` renames the
finished folder to ``checkpoints/checkpoint-N`` (so a checkpoint either exists completely or not at all)
and rotates the oldest away. :func:`last_complete_checkpoint` skips anything incomplete all the same, and
:func:`resume_checkpoint` also skips a checkpoint whose files are damaged (truncated by a full disk, a copy
cut short, ...), naming the file. Each checkpoint records the settings it was trained with
(:data:`TRAIN_CONFIG`) so that a resume with other data or hyperparameters can be refused
(:func:`settings_differences`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

from transformers import TrainerCallback

from ..train import AnswerOnlyTrainer

CHECKPOINTS = "checkpoints"
STAGING = ".staging"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# A checkpoint is complete when all of these exist (the trainer state is written last) ...
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
# ... or, under DeepSpeed (which keeps optimizer and scheduler in its own folder), these.
DEEPSPEED_CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "latest")
# The settings a checkpoint was trained with (data fingerprint, hyperparameters), written into each checkpoint.
TRAIN_CONFIG = "train_config.json"


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


def _json_problem(path: Path) -> str | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text (corrupt)"
    except json.JSONDecodeError as exc:
        return f"invalid JSON at line {exc.lineno} ({exc.msg}): truncated or corrupt"
    if path.name == "trainer_state.json" and not (isinstance(obj, dict) and isinstance(obj.get("global_step"), int)):
        return "no global_step: not a trainer state"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes: the header
    says how long the file must be."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes)"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"truncated ({size} bytes; its header alone needs {length + 8})"
        try:
            header = json.loads(handle.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "corrupt header"
    if size != 8 + length + end:
        return f"truncated or corrupt ({size} bytes, {8 + length + end} expected)"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """``torch.save`` writes a zip archive: its directory sits at the end, each member carries a CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError):
        return f"truncated or corrupt ({path.stat().st_size} bytes; not a complete torch.save archive)"
    return f"corrupt ({bad} fails its checksum)" if bad else None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """``None`` when the complete checkpoint ``folder`` can be loaded, else ``"FILE: what is wrong"``.

    Reads every file a resume loads: the JSON files parse, each safetensors file is as long as its header
    says, each ``torch.save`` file (optimizer, scheduler, RNG states) is a whole archive with good checksums.
    """
    folder = Path(folder)
    if not is_complete_checkpoint(folder):
        missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
        return f"{folder / (missing[0] if missing else 'latest')}: missing"
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            if path.suffix == ".json":
                problem = _json_problem(path)
            elif path.suffix == ".safetensors":
                problem = _safetensors_problem(path)
            elif path.suffix in (".pt", ".pth", ".bin"):
                problem = _torch_file_problem(path)
            else:
                continue
        except OSError as exc:
            problem = f"unreadable ({exc.strerror or exc})"
        if problem:
            return f"{path}: {problem}"
    return None


def resume_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete *and loadable* ``checkpoint-N`` of a run dir (``None`` if there is none), and the
    newer ones passed over as ``(folder, problem)`` (see :func:`checkpoint_problem`)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None, []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    damaged = []
    for _, path in sorted(found, reverse=True):
        if not is_complete_checkpoint(path):
            continue  # an interrupted save: removed by remove_incomplete_checkpoints, no warning needed
        try:
            problem = checkpoint_problem(path)
        except OSError as exc:  # e.g. removed by rank 0 while another rank looks at it
            problem = f"{path}: unreadable ({exc.strerror or exc})"
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def read_train_config(checkpoint: str | os.PathLike) -> dict | None:
    """The settings recorded in a checkpoint (:data:`TRAIN_CONFIG`); ``None`` for a checkpoint without them."""
    path = Path(checkpoint) / TRAIN_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        from ..files import DataError

        raise DataError(path, None, f"unreadable ({exc}); --no-resume starts over") from None
    return config if isinstance(config, dict) else None


def settings_differences(recorded: dict, current: dict) -> list[str]:
    """``key (checkpoint X, now Y)`` for every key both record with different values."""
    return [f"{key} (checkpoint {recorded[key]!r}, now {current[key]!r})"
            for key in current if key in recorded and recorded[key] != current[key]]


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

    def __init__(self, *args, train_config: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_config = train_config  # written into every checkpoint as TRAIN_CONFIG
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
            if self.train_config is not None:
                from ..files import write_json_atomic

                write_json_atomic(self.train_config, os.path.join(staging, name, TRAIN_CONFIG))
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
