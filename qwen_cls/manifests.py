"""Built model folders verify themselves (the reading side): the manifest a build writes last (:data:`MANIFEST`:
every file's size and SHA-256), what differs from it, and the state of a would-be build's folder
(``absent``/``empty``/``built``/``damaged``/``legacy``/``foreign``, :func:`build_state`). Writing manifests and
deciding what a build does with a folder is the builders' side (:mod:`qwen_cls.model_builds.folders`).

A folder built by this package (``tiny``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``) gets :data:`MANIFEST` as its
last file: the model it holds, the build's version, and every file's size and SHA-256. Before a folder is used
its sizes are compared (cheap), its hashes too when asked (``--verify``). A folder without the manifest of the
expected model is not taken for a build: the user's folder (an export, another model) is never replaced. Folders
built before manifests existed (``legacy``) are recognised by their own model card and file names and checked
structurally (the safetensors header against the file size, JSON files parse).

Plumbing under: 00, 02, 03, 04, 05, 06, 07
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .files import file_sha256

MANIFEST = "qwen_cls_manifest.json"


class DamagedModel(FileNotFoundError):
    """A built model folder whose files no longer match its manifest; the message names file and fix."""


def damaged_model(folder: Path, problems: list[str], command: str) -> DamagedModel:
    """The error for a damaged built ``folder``: each problem, and the ``command`` that rebuilds it."""
    return DamagedModel(f"{folder}: damaged model folder ({'; '.join(problems)}); rebuild it with `{command}`")


def not_a_build(folder: Path, model: str, problems: list[str]) -> FileExistsError:
    """The error for a ``folder`` that holds files but no build of ``model``: neither used nor replaced."""
    why = f" ({problems[0]})" if problems else f" (it has no {MANIFEST} of {model})"
    return FileExistsError(f"{folder}: holds files but is not a {model} build{why}, so it is neither used nor "
                           "replaced; nothing was changed: choose a new or empty folder for --out")


# --------------------------------------------------------------------------- the manifest


def read_manifest(folder: Path) -> dict | None:
    """The manifest a build wrote, or None when absent or not one of ours."""
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
