"""Files, on the ground floor: atomic file and folder writes, JSONL reading with ``path:line`` errors,
SHA-256 of a file, folder-path checks, the lock of a folder a long command writes. Every module that writes
or reads a file uses these.

Writes go to a temp file (or folder) beside the target and are renamed into place, so nothing is ever
half-written; new files get the umask's mode, an overwritten file keeps its own; symlinks are written
through; devices, pipes and sockets are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterable, Iterator


class DataError(ValueError):
    """A user-facing problem with an input file; ``str()`` is ``path:line: message``."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path, self.line, self.message = str(path), line, message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


def check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, "no such file; check the path (raw rows are JSONL: one JSON object per line)")
    if path.is_dir():
        raise DataError(path, None, "is a directory; give the path of a .jsonl file")


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, decoded value)`` for each non-blank line of a UTF-8 JSONL file (a BOM, CRLF are
    fine); undecodable bytes and invalid JSON raise :class:`DataError` naming ``path:line``."""
    check_readable(path)
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, lineno, f"not valid UTF-8 ({exc.reason}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so no other thread sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_folder_path(folder: Path, option: str) -> None:
    """A clear error when ``folder`` (or a folder above it) is a file, instead of a later ``File exists``."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == folder else f" ({path} is a file)"
                raise NotADirectoryError(f"{option} {folder}: not a folder{where}; choose another {option}")
            return


def write_target(path: str | os.PathLike) -> Path:
    """Where a write to ``path`` lands: through symlinks to the file they name; folders and special files
    (devices, pipes, sockets) are refused with :class:`DataError`."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.is_dir():
        raise DataError(path, None, "is a directory; give the path of an output file")
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)  # follows links: /dev/stdout -> a pipe or terminal
    except (FileNotFoundError, NotADirectoryError):
        special = path.is_symlink() and target.parts[:2] == ("/", "proc")  # e.g. /proc/self/fd/1 -> pipe:[..]
    if special:
        raise DataError(path, None, "is not a regular file (a device, pipe or socket); give a file path")
    if target.parent.exists() and not target.parent.is_dir():
        raise DataError(path, None, f"{target.parent} is a file, not a folder; choose another output path")
    return target


@contextmanager
def atomic_file(path: str | os.PathLike, *, binary: bool = False) -> Iterator:
    """Yield a (UTF-8 text, or ``binary``) handle on a temp file beside ``path``; on success it replaces
    ``path``, on error it is removed, so ``path`` is never half-written. A symlink is written through
    (the file it names is replaced); the file keeps its mode, a new one gets the umask's (0666 & ~umask)."""
    target = write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as handle:
            yield handle
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write rows as UTF-8 JSONL via a temp file in the same folder, then rename; returns the count."""
    count = 0
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike) -> list:
    """Plain JSONL reader (for files this package wrote) with ``path:line`` errors."""
    return [obj for _, obj in json_lines(Path(path))]


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented UTF-8 JSON via a temp file in the same folder, then rename."""
    with atomic_file(path) as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it takes ``path``'s place (an existing ``path`` is
    moved aside first and removed only once the new one is in), on error it is removed. The folder gets
    the umask's mode (0777 & ~umask). Callers decide whether an existing ``path`` may be replaced."""
    path = Path(path)
    if path.is_symlink() and path.is_dir():  # a link to a folder (e.g. on another disk): replace its target
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        raise DataError(path, None, "is a file, not a folder; choose another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = None
    keep_old = False
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and (old / path.name).exists():  # put the previous folder back
            try:
                os.replace(old / path.name, path)
            except OSError:
                keep_old = True  # the only copy of the previous folder: never removed
                raise DataError(path, None, f"could not be restored; the previous folder is in {old}") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not keep_old:
            shutil.rmtree(old, ignore_errors=True)


def refuse_non_empty(out: Path) -> None:
    """Build into a new or empty folder only: never over files this package did not write."""
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty and not a built model; nothing was changed: choose a new or "
                              "empty folder for --out")


# --- the lock of a folder a long command writes (`run`, `sweep`, `train`) ------------------------------------------

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
