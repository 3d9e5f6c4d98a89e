"""The lock of a folder a long command writes (``run``, ``sweep``, ``train``, a model build): ``fcntl.flock`` on
``.NAME.lock`` beside the folder, released by the kernel even after ``kill -9``; a second command is refused with
:class:`FolderBusy`, naming the holder's command and PID.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

# --- the lock of a folder a long command writes (`run`, `sweep`, `train`, a model build) ---------------------------

class FolderBusy(ValueError):
    """Another process holds a folder's lock (:func:`hold_lock`); the message names its command and PID."""


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of a folder (beside it, ``.NAME.lock``, so it survives the folder being moved aside)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _holder(fd: int, command: str) -> tuple[str, str]:
    """(``pid N, since T``, the holder's command) read from a held lock file; ``command`` when it names none."""
    lines = os.read(fd, 400).decode("utf-8", "replace").strip().splitlines()
    return (lines[0].strip() if lines else ""), (lines[1].strip() if len(lines) > 1 else command)


def _busy(folder: Path, holder: str, command: str) -> FolderBusy:
    return FolderBusy(f"{folder} is being written by another `{command}`{f' ({holder})' if holder else ''}; "
                      "wait for it to finish or choose another --out")


@contextmanager
def hold_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (``command``, e.g. ``qwen-cls run``, names the holder);
    :class:`FolderBusy` at once, naming the holder's command and PID, when another process holds it.

    ``flock`` belongs to the open file, so the kernel releases it when the process dies, however it dies: a
    lock file left behind by a killed command blocks nothing. The file is removed on the way out.
    """
    import fcntl

    folder = Path(folder)
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder, held_by = _holder(fd, command)
            finally:
                os.close(fd)
            raise _busy(folder, holder, held_by) from None
        try:  # the previous holder may have removed the file between our open and our lock: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n{command}\n".encode())
        yield path
    finally:
        with suppress(OSError):
            path.unlink()
        os.close(fd)


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds ``folder``'s lock now (``` `qwen-cls train` (pid N, since T)` ``), or None; creates nothing."""
    import fcntl

    try:
        fd = os.open(lock_path(folder), os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it (a holder creates it before locking)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: two readers checking never block each other
        except BlockingIOError:
            holder, command = _holder(fd, "qwen-cls run")
            return f"`{command}`" + (f" ({holder})" if holder else "")
        return None
    finally:
        os.close(fd)  # closing drops a shared lock we took
