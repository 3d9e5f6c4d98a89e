"""The run folder of ``qwen-cls run``: one run, locked, marked :data:`~qwen_cls.run_record.RUN_INCOMPLETE` while
written, a finished run replaced only whole (``--overwrite``: kept in ``OUT.previous`` until the new run succeeds; a
failed attempt in ``OUT.failed``); what a killed run left is repaired by the next (:func:`recover`).

Why a marker and not a staging folder renamed at the end: the notebooks receive ``out_dir`` as a parameter
and record it (``params.json``, the injected parameter cell and printed paths of every executed notebook, the
SwanLab logs), so a run built in a staging folder would point at a path that no longer exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..run_record import PARAMS, RUN_INCOMPLETE, RUN_LAYOUT
from .locks import hold_lock


class NotebookFailed(RuntimeError):
    """A notebook of the chain raised; the message names the notebook, the error and the saved copy."""

    def __init__(self, notebook: str, what: str, run_dir: Path):
        super().__init__(notebook, what)
        self.notebook, self.what, self.run_dir, self.note = notebook, what, run_dir, ""

    def __str__(self) -> str:
        text = f"{self.notebook} failed {self.what}\n  executed copy: {self.run_dir / 'notebooks' / self.notebook}"
        return text + (f"\n  {self.note}" if self.note else "")


class RunFolderError(ValueError):
    """The run folder cannot take this run: a finished run without ``--overwrite``, or not a run folder (a busy
    one raises :class:`~qwen_cls.chain.locks.FolderBusy`)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl+C (or SIGTERM) during a run; ``note`` says what became of the run folder."""

    def __init__(self, note: str = ""):
        super().__init__(note)
        self.note = note


def previous_path(run_dir: Path) -> Path:
    """Where a finished run waits while ``--overwrite`` replaces it."""
    return run_dir.with_name(run_dir.name + ".previous")


def failed_path(run_dir: Path) -> Path:
    """Where a failed attempt to replace a finished run is kept (marked incomplete)."""
    return run_dir.with_name(run_dir.name + ".failed")


def _run_owned(name: str) -> bool:
    """A name a run writes: the run layout, or a temp file/folder of an atomic write of one (``.adapter.x9``)."""
    if name in RUN_LAYOUT:
        return True
    return name.startswith(".") and any(name.startswith(f".{owned}.") for owned in RUN_LAYOUT)


def run_folder_state(folder: Path) -> str:
    """``absent``, ``empty``, ``incomplete`` (marked :data:`RUN_INCOMPLETE`), ``finished`` (a run's
    ``params.json`` and nothing but run files) or ``foreign`` (anything else: files this tool did not write,
    dotfiles such as ``.git`` included, are never replaced)."""
    if not folder.exists():
        return "absent"
    if not folder.is_dir():
        raise RunFolderError(f"--out {folder}: not a folder; choose another --out")
    names = {p.name for p in folder.iterdir()}
    if RUN_INCOMPLETE in names and all(_run_owned(n) for n in names):
        return "incomplete"
    if not names:
        return "empty"
    if not all(_run_owned(n) for n in names):
        return "foreign"
    try:
        params = json.loads((folder / PARAMS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        params = None
    if isinstance(params, dict) and {"profile", "out_dir"} <= set(params):
        return "finished"
    return "foreign"


def _foreign(folder: Path) -> RunFolderError:
    names = sorted(p.name for p in folder.iterdir() if not _run_owned(p.name))
    if not names:
        return RunFolderError(f"{folder} is not a run folder (it has no {PARAMS} written by `qwen-cls run`); "
                              "choose a new or empty folder for --out")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return RunFolderError(f"{folder} is not a run folder (it holds {shown}, which `qwen-cls run` did not write); "
                          "choose a new or empty folder for --out")


def _clear_failed(run_dir: Path) -> Path:
    """``OUT.failed`` made free: an older failed attempt there (marked incomplete) is removed."""
    failed = failed_path(run_dir)
    if failed.exists():
        if run_folder_state(failed) not in ("incomplete", "empty"):
            raise RunFolderError(f"{failed} exists and is not a failed run attempt; move it away")
        shutil.rmtree(failed)
    return failed


def recover(run_dir: Path) -> str | None:
    """Repair what a killed run left (call with the lock held); return a note when something was done.

    ``OUT.previous`` beside an unfinished ``OUT`` means a replacement died: the previous run goes back into
    ``OUT`` and the dead attempt into ``OUT.failed``. Beside a finished ``OUT`` it is a leftover: removed.
    """
    previous = previous_path(run_dir)
    if not previous.exists():
        return None
    state = run_folder_state(run_dir)
    if run_folder_state(previous) != "finished":  # not what a run moved aside: never removed, never restored
        raise RunFolderError(f"{previous} exists but holds no finished run; move it away and rerun")
    if state == "finished":
        shutil.rmtree(previous)
        return None
    if state == "foreign":
        raise _foreign(run_dir)
    note = f"restored the previous run into {run_dir} (the run that was replacing it did not finish"
    if state in ("incomplete", "empty"):
        failed = _clear_failed(run_dir)
        os.replace(run_dir, failed)
        note += f"; its files are in {failed}"
    os.replace(previous, run_dir)
    return note + ")"


def _marker_text(run_dir: Path, previous: Path | None) -> str:
    text = (f"This run folder is incomplete: `qwen-cls run` (pid {os.getpid()}) started writing it at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} and has not finished (it is still running, failed, or was "
            f"interrupted). Its files are partial; do not use them.\n"
            f"Rerun `qwen-cls run --out {run_dir}` to replace it.\n")
    if previous is not None:
        text += (f"The finished run it replaces waits in {previous}; the next `qwen-cls run --out {run_dir}` "
                 "puts it back if this run did not finish.\n")
    return text


@contextlib.contextmanager
def run_folder(run_dir: str | os.PathLike, *, overwrite: bool = False):
    """Lock ``run_dir``, mark it :data:`RUN_INCOMPLETE` and yield it; the marker goes when the block succeeds.

    An existing finished run is refused (:class:`RunFolderError`) unless ``overwrite``; then it waits in
    ``OUT.previous`` and is removed only on success. On failure or Ctrl+C it comes back into ``OUT`` and the
    attempt, still marked incomplete, goes to ``OUT.failed``; with nothing to restore the attempt stays in
    ``OUT``, marked. An unfinished earlier attempt (marked) is simply replaced. A folder holding other files
    is never touched.
    """
    run_dir = Path(run_dir)
    with hold_lock(run_dir, "qwen-cls run"):
        note = recover(run_dir)
        if note:
            print(f"note: {note}", file=sys.stderr)
        state = run_folder_state(run_dir)
        if state == "foreign":
            raise _foreign(run_dir)
        if state == "finished" and not overwrite:
            raise RunFolderError(f"{run_dir} already holds a finished run; add --overwrite to replace it (the old "
                                 "run is kept until the new one succeeds) or choose another --out")
        previous = None
        if state == "finished":
            previous = previous_path(run_dir)
            os.replace(run_dir, previous)
        elif state == "incomplete":
            shutil.rmtree(run_dir)
            print(f"note: replacing the unfinished run in {run_dir}", file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_INCOMPLETE).write_text(_marker_text(run_dir, previous), encoding="utf-8")
        try:
            yield run_dir
        except BaseException as exc:
            where = run_dir
            if previous is not None:
                where = _clear_failed(run_dir)
                os.replace(run_dir, where)
                os.replace(previous, run_dir)
                note = (f"{run_dir} still holds the previous run, unchanged; this attempt's files "
                        f"(marked {RUN_INCOMPLETE}) are in {where}")
            else:
                note = f"{run_dir} is marked incomplete ({RUN_INCOMPLETE}); rerun to replace it"
            if isinstance(exc, NotebookFailed):
                exc.run_dir, exc.note = where, note
            elif isinstance(exc, Interrupted):
                exc.note = note
            elif isinstance(exc, KeyboardInterrupt):
                raise Interrupted(note) from None
            else:
                print(f"note: {note}", file=sys.stderr)
            raise
        (run_dir / RUN_INCOMPLETE).unlink()
        if previous is not None:
            shutil.rmtree(previous)
        failed = failed_path(run_dir)
        if failed.exists() and run_folder_state(failed) == "incomplete":
            shutil.rmtree(failed)  # an older failed attempt at this run: superseded
