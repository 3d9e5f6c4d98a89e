"""What a build does with its folders (the writing side of the manifests in :mod:`qwen_cls.manifests`): the
manifest written last (:func:`write_manifest`), what happens to an existing folder (:func:`settle`: used, recorded,
rebuilt or refused), the builds of other versions beside it (named, never deleted), and the owner marks of a
build's temp folders, so a later build removes those of killed builds (``kill -9``) and nothing else.

A build's temp folders (beside the target, named ``.<target>.…``) hold :data:`OWNER_FILE` with the process id
and start time of the build; a later build removes those whose owner is dead, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

from ..files import file_sha256, write_json_atomic
from ..manifests import MANIFEST, damaged_model, not_a_build, read_manifest

OWNER_FILE = ".qwen_cls_build_owner"

# --------------------------------------------------------------------------- the manifest, written last


def write_manifest(folder: Path, model: str, version: str) -> Path:
    """Record every file of ``folder`` (name, size, SHA-256) in :data:`MANIFEST`, atomically; call it last."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name in (MANIFEST, OWNER_FILE) or not path.is_file():
            continue
        files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return write_json_atomic({"model": model, "version": version, "files": files}, folder / MANIFEST)


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
    """Decide what a build of ``model`` does at ``out``, given :func:`~qwen_cls.manifests.build_state`: True when
    it must (re)build now, False when ``out`` is ready; raise when it may not touch ``out`` (a foreign folder: never
    replaced) or, without ``rebuild``, when it is damaged (:class:`~qwen_cls.manifests.DamagedModel` naming the
    file and ``command``)."""
    if state == "built":
        return False
    if state in ("absent", "empty"):
        return True
    if state == "foreign":
        raise not_a_build(out, model, problems)
    if state == "legacy" and not problems:  # built before manifests, and whole as far as can be told cheaply
        try:
            write_manifest(out, model, version)
            print(f"note: {out} was built before model folders carried {MANIFEST}; recorded it now",
                  file=sys.stderr)
        except OSError:
            pass  # a read-only cache: used as it is, checked structurally on every use
        return False
    if not rebuild:
        raise damaged_model(out, problems, command)
    listed = "; ".join(problems)
    extras = extra_files(out) if state == "damaged" else []
    if extras:
        raise FileExistsError(f"{out}: damaged ({listed}) and holds {', '.join(extras)}, which the build did not "
                              f"write; nothing was changed: move them away and rerun `{command}`")
    print(f"note: {out} is damaged ({listed}); rebuilding it", file=sys.stderr)
    return True
