"""Files, on the ground floor: atomic file and folder writes, JSONL reading with ``path:line`` errors,
SHA-256 of a file, folder-path checks, weights and tokenizers saved with the umask's modes. Every module that
writes or reads a file uses these; the notebooks write their outputs with them.

Writes go to a temp file (or folder) beside the target and are renamed into place, so nothing is ever
half-written; new files get the umask's mode, an overwritten file keeps its own; symlinks are written
through; devices, pipes and sockets are refused. Weights saved through :func:`save_weights` get the umask's mode
too (the safetensors writer alone makes them 0600).

Taught in: 01, 02, 03, 04, 05, 06, 07
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
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


def check_output_folder(folder: str | os.PathLike, option: str = "--out", *, spared: str = "fetched or built") -> Path:
    """Refuse, before any fetch or build, a ``folder`` that is a file (or lies under one) or that cannot be
    written: the nearest existing folder at or above it is tried with a real temp folder (root ignores modes,
    so ``os.access`` would not tell). ``spared`` says in the error what did not happen ("nothing was fetched or
    built"). Returns the folder as a ``Path``."""
    folder = Path(folder).expanduser()
    check_folder_path(folder, option)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    probes = [existing] if existing != folder else [folder, folder.parent]  # a build renames beside it too
    for where in probes:
        try:
            Path(tempfile.mkdtemp(prefix=".qwen-cls-write-check.", dir=where)).rmdir()
        except OSError as exc:
            raise DataError(folder, None, f"cannot write there ({where}: {exc.strerror or exc}); nothing was "
                                          f"{spared}: choose another {option}") from None
    return folder


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


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(folder)``, its added tokens also listed in ``tokenizer_config.json``
    (``added_tokens_decoder``, as transformers 4 wrote it and published checkpoints carry it): without that
    list, transformers 5 parses the whole ``tokenizer.json`` in Python at every load to find them (Gemma 3's
    33 MB: a load took 2.4-2.5 s with the list and 3.4-4.1 s without, on a 2-core AMD EPYC)."""
    tokenizer.save_pretrained(str(folder))
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    write_json_atomic(config, config_path)


def umask_modes(paths: Iterable[Path]) -> None:
    """Give each regular file of ``paths`` the mode a new file gets from the umask (0666 & ~umask)."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def save_weights(model, folder: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained(folder, **kwargs)`` (a transformers or PEFT model), then its ``*.safetensors``
    files get the umask's mode like the files beside them (the safetensors writer makes them 0600)."""
    model.save_pretrained(folder, **kwargs)
    umask_modes(Path(folder).rglob("*.safetensors"))


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
