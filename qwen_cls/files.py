"""Files, on the ground floor: atomic file and folder writes, JSONL reading with ``path:line`` errors,
SHA-256 of a file, folder-path checks, the lock of a folder a long command writes, and built model folders that
verify themselves (a manifest written last; temp folders of killed builds recognised by their owner mark). Every
module that writes or reads a file uses these.

Writes go to a temp file (or folder) beside the target and are renamed into place, so nothing is ever
half-written; new files get the umask's mode, an overwritten file keeps its own; symlinks are written
through; devices, pipes and sockets are refused. Weights saved through :func:`save_weights` get the umask's mode
too (the safetensors writer alone makes them 0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import sys
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
# --------------------------------------------------------------------------- built folders verify themselves
# A built model folder that verifies itself: its manifest, and the temp folders of builds that died.
#
# A folder built by this package (``tiny``, ``gemma3-270m``) gets :data:`MANIFEST` as its last file: the
# model it holds, the build's version, and every file's size and SHA-256. Before a folder is used its sizes
# are compared (cheap), its hashes too when asked (``--verify``). A folder without the manifest of the
# expected model is not taken for a build: the user's folder (an export, another model) is never replaced.
# Folders built before manifests existed (:func:`folder_state` ``legacy``) are recognised by their own model
# card and file names, checked structurally (the safetensors header against the file size, JSON files parse)
# and then get their manifest once.
#
# A build's temp folders (beside the target, named ``.<target>.…``) hold :data:`OWNER_FILE` with the process
# id and start time of the build; a later build removes those whose owner is dead (``kill -9``), and nothing
# else.

MANIFEST = "qwen_cls_manifest.json"
OWNER_FILE = ".qwen_cls_build_owner"


class DamagedModel(FileNotFoundError):
    """A built model folder whose files no longer match its manifest; the message names file and fix."""


# --------------------------------------------------------------------------- the manifest


def write_manifest(folder: Path, model: str, version: str) -> Path:
    """Record every file of ``folder`` (name, size, SHA-256) in :data:`MANIFEST`, atomically; call it last."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name in (MANIFEST, OWNER_FILE) or not path.is_file():
            continue
        files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return write_json_atomic({"model": model, "version": version, "files": files}, folder / MANIFEST)


def read_manifest(folder: Path) -> dict | None:
    """The manifest as written by :func:`write_manifest`, or None when absent or not one of ours."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("files"), dict) and isinstance(data.get("model"), str)):
        return None
    if not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
               for v in data["files"].values()):
        return None
    return data


def earlier_builds(out: Path, model: str, version: str) -> list[Path]:
    """Folders beside ``out`` holding a whole build of ``model`` of another version (their manifest says so): a
    version bump leaves the old build in the cache, unused. Only listed; whoever built them decides."""
    out = Path(out)
    return [folder for folder in sorted(out.parent.iterdir())
            if folder != out and folder.is_dir() and (manifest := read_manifest(folder))
            and manifest["model"] == model and manifest.get("version") != version]


def note_earlier_builds(out: Path, model: str, version: str) -> None:
    """One stderr note per :func:`earlier_builds` folder: its size and that it may be deleted."""
    for folder in earlier_builds(out, model, version):
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        print(f"note: {folder} holds an earlier build of {model} ({size / 2**20:,.0f} MiB) that this version "
              "no longer reads; delete it to free the space", file=sys.stderr)


def manifest_problems(folder: Path, manifest: dict, *, hashes: bool = False) -> list[str]:
    """What differs from the manifest: ``name: missing``, ``name: N bytes, expected M``, changed content."""
    problems = []
    for name, info in manifest["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != info["size"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, expected {info['size']} (truncated or changed)")
        elif hashes and file_sha256(path) != info["sha256"]:
            problems.append(f"{name}: content changed since the build (SHA-256 differs from {MANIFEST})")
    return problems


def structure_problems(folder: Path, required: tuple[str, ...]) -> list[str]:
    """For a folder without a manifest: required files present, ``*.json`` parse, each safetensors file as long
    as its header says (a truncated download or copy is caught without reading the weights)."""
    folder = Path(folder)
    problems = [f"{name}: missing" for name in required if not (folder / name).is_file()]
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
            if problem:
                problems.append(f"{path.name}: {problem}")
        elif path.suffix == ".json" and path.stat().st_size < (1 << 20):  # config files (not tokenizer.json)
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                problems.append(f"{path.name}: not valid JSON")
    return problems


def safetensors_problem(path: Path) -> str | None:
    """None when the file is as long as its header declares, else what is wrong."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return f"{size} bytes, shorter than its own header (truncated)"
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return f"{size} bytes, no readable safetensors header (truncated or not safetensors)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, expected {expected} from its header (truncated or changed)"
    return None


def folder_state(folder: Path, model: str, version: str, *, card: str, names: frozenset[str],
                 required: tuple[str, ...], hashes: bool = False) -> tuple[str, list[str]]:
    """``(state, problems)`` of a would-be build of ``model`` at ``folder``:

    - ``absent`` / ``empty``: nothing there, build it;
    - ``built``: the manifest of ``model`` at ``version`` and every file as recorded;
    - ``damaged``: our manifest, but files missing, truncated, changed (``problems`` names each), or built by
      another version;
    - ``legacy``: no manifest, but our model ``card`` (README.md's first line) and only the build's ``names``:
      built before manifests; ``problems`` are :func:`structure_problems`;
    - ``foreign``: anything else (another model, an export, the user's files): never replaced.
    """
    folder = Path(folder)
    if not folder.exists():
        return "absent", []
    if not folder.is_dir():
        return "foreign", [f"{folder} is a file"]
    present = {p.name for p in folder.iterdir()}
    if not present:
        return "empty", []
    manifest = read_manifest(folder)
    if manifest is not None:
        if manifest["model"] != model:
            return "foreign", [f"{MANIFEST} says it holds {manifest['model']!r}"]
        problems = manifest_problems(folder, manifest, hashes=hashes)
        if str(manifest.get("version")) != version:
            problems.append(f"{MANIFEST}: built by version {manifest.get('version')} of the build, now {version}")
        return ("damaged" if problems else "built"), problems
    try:
        first_line = (folder / "README.md").read_text(encoding="utf-8").splitlines()[0]
    except (OSError, ValueError, IndexError):
        first_line = None
    if first_line == card and present <= names:
        return "legacy", structure_problems(folder, required)
    return "foreign", []


def extra_files(folder: Path) -> list[str]:
    """Names in a built folder that its manifest does not list (the user's files: a rebuild must keep away)."""
    manifest = read_manifest(folder) or {"files": {}}
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in manifest["files"] and p.name != MANIFEST)


# --------------------------------------------------------------------------- temp folders of builds


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def mark_owner(folder: Path) -> None:
    """Write :data:`OWNER_FILE` into a build's temp ``folder``: this process's id, start time and host."""
    record = {"pid": os.getpid(), "start": _start_time(os.getpid()), "host": socket.gethostname()}
    (Path(folder) / OWNER_FILE).write_text(json.dumps(record), encoding="utf-8")


def owner_is_dead(folder: Path) -> bool:
    """True only when ``folder`` holds our :data:`OWNER_FILE` and its process (same host) no longer runs."""
    try:
        record = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
        pid, start, host = int(record["pid"]), record["start"], record["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not a marked temp folder of a build: not ours to judge
    if host != socket.gethostname() or start is None:
        return False
    return _start_time(pid) != start  # gone, or the id now belongs to another process


def remove_stale_builds(target: Path) -> list[Path]:
    """Remove the temp folders beside ``target`` (``.<target name>.…``) that a build marked and that outlived
    their owner; return them. Unmarked folders and live builds' folders are left alone."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for path in sorted(target.parent.glob(f".{target.name}.*")):
        if path.is_dir() and not path.is_symlink() and owner_is_dead(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- what a build does with a folder


def settle(out: Path, state: str, problems: list[str], *, model: str, version: str, rebuild: bool,
           command: str) -> bool:
    """Decide what a build of ``model`` does at ``out``, given :func:`folder_state`: True when it must (re)build
    now, False when ``out`` is ready; raise when it may not touch ``out`` (a foreign folder: never replaced)
    or, without ``rebuild``, when it is damaged (:class:`DamagedModel` naming the file and ``command``)."""
    if state == "built":
        return False
    if state in ("absent", "empty"):
        return True
    if state == "foreign":
        why = f" ({problems[0]})" if problems else f" (it has no {MANIFEST} of {model})"
        raise FileExistsError(f"{out}: holds files but is not a {model} build{why}, so it is neither used nor "
                              "replaced; nothing was changed: choose a new or empty folder for --out")
    if state == "legacy" and not problems:  # built before manifests, and whole as far as can be told cheaply
        try:
            write_manifest(out, model, version)
            print(f"note: {out} was built before model folders carried {MANIFEST}; recorded it now",
                  file=sys.stderr)
        except OSError:
            pass  # a read-only cache: used as it is, checked structurally on every use
        return False
    listed = "; ".join(problems)
    if not rebuild:
        raise DamagedModel(f"{out}: damaged model folder ({listed}); rebuild it with `{command}`")
    extras = extra_files(out) if state == "damaged" else []
    if extras:
        raise FileExistsError(f"{out}: damaged ({listed}) and holds {', '.join(extras)}, which the build did not "
                              f"write; nothing was changed: move them away and rerun `{command}`")
    print(f"note: {out} is damaged ({listed}); rebuilding it", file=sys.stderr)
    return True
