"""Built model folders verify themselves: a manifest written last (every file's size and SHA-256), the folder's
state (``absent``/``empty``/``built``/``damaged``/``legacy``/``foreign``, :func:`build_state`), and the owner marks
of build temp folders, so a later build removes those of killed builds and nothing else.

Plumbing under: 00, 02, 03
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import sys
from pathlib import Path

from .files import file_sha256, write_json_atomic

# --------------------------------------------------------------------------- built folders verify themselves
# A built model folder that verifies itself: its manifest, and the temp folders of builds that died.
#
# A folder built by this package (``tiny``, ``gemma3-270m``) gets :data:`MANIFEST` as its last file: the
# model it holds, the build's version, and every file's size and SHA-256. Before a folder is used its sizes
# are compared (cheap), its hashes too when asked (``--verify``). A folder without the manifest of the
# expected model is not taken for a build: the user's folder (an export, another model) is never replaced.
# Folders built before manifests existed (:func:`build_state` ``legacy``) are recognised by their own model
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


def build_state(folder: Path, model: str, version: str, *, card: str, names: frozenset[str],
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
    """Decide what a build of ``model`` does at ``out``, given :func:`build_state`: True when it must (re)build
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
