"""A notebook's ``parameters`` cell and what papermill injects into it: the profile's values, ``-p`` overrides
(checked against :data:`~qwen_cls.profiles.SCHEMA`), paths made absolute; prepared copies for JupyterLab and
nbval (``prepare_notebooks``)."""

from __future__ import annotations

import ast
import json
import os
import tempfile
from pathlib import Path

from ..chapters import NOTEBOOKS, notebooks_dir
from ..files import atomic_file, check_folder_path, file_sha256, write_json_atomic
from ..profiles import COMMITTED_PROFILE, PROFILES, ParameterError, check_parameter, is_path_key, profile_parameters


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, str]:
    """Name -> default (as source text) of a notebook's ``parameters`` cell."""
    import papermill

    return {name: info["default"] for name, info in papermill.inspect_notebook(str(notebook)).items()}


def notebook_defaults(notebook: str | os.PathLike) -> dict:
    """Name -> value of a notebook's ``parameters`` cell (plain literals, so ``ast.literal_eval`` reads them)."""
    return {name: ast.literal_eval(text) for name, text in notebook_parameters(notebook).items()}


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def edited_defaults(defaults: dict, profile: str = COMMITTED_PROFILE) -> list[str]:
    """The keys of ``defaults`` (a notebook's parameters) whose value is not ``profile``'s (a hand-edited cell)."""
    values = PROFILES[profile]
    return [key for key, value in defaults.items() if key in values and not _same(value, values[key])]


def injected_parameters(profile: str, params: dict, defaults: dict, overrides: dict | None = None) -> dict:
    """What papermill injects into a notebook whose ``parameters`` cell holds ``defaults``: the resolved
    ``params`` of the keys it declares.

    With :data:`~qwen_cls.profiles.COMMITTED_PROFILE`, whose values the committed notebooks hold, only
    ``out_dir``, the ``overrides`` and any default edited away from the profile: the notebook runs as a learner
    opens it (relative paths work, the chain runs in the notebooks folder).
    """
    keys = [key for key in defaults if key in params]
    if profile == COMMITTED_PROFILE:
        keep = {"out_dir", *(overrides or {}), *edited_defaults(defaults, profile)}
        keys = [key for key in keys if key in keep]
    return {key: params[key] for key in keys}


# --- prepared copies: the chain with a profile injected, for JupyterLab (`qwen-cls lab`) and nbval ------------

PREPARED = ".prepared.json"  # in a copies folder: name -> SHA-256 of each copy as prepare_notebooks wrote it
INJECTED = "injected-parameters"  # papermill's tag (and here the id) of the cell it adds after `parameters`


def prepare_notebooks(profile: str, folder: str | os.PathLike, overrides: dict | None = None, *,
                      notebooks: tuple[str, ...] = NOTEBOOKS) -> dict[str, str]:
    """Copies of ``notebooks`` in ``folder`` with ``profile``'s values (then ``overrides``) injected by
    papermill's prepare-only mode; return notebook name -> ``"written"`` or ``"kept"``.

    Every declared key is injected, paths made absolute, so a copy runs the same from its own folder
    (JupyterLab, nbval) as from anywhere. A copy differs from the committed notebook only by the injected cell
    (right after ``parameters``) and papermill's notebook metadata (the injected values). A copy that changed
    since it was written here (a learner's edits or outputs) is kept, never overwritten: delete it to get a
    fresh one. Unknown keys and bad values, and ``folder`` being the committed notebooks' own folder, raise
    :class:`ValueError` before anything is written.
    """
    import nbformat
    import papermill

    source, folder = notebooks_dir(), Path(folder).expanduser().resolve()
    declared = {name: notebook_parameters(source / name) for name in notebooks}
    params = resolve_parameters(profile, overrides, valid_keys=set().union(*declared.values()) | set(PROFILES[profile]))
    check_folder_path(folder, "--dir")
    if folder == source:  # resolved both: a symlink to it is it
        raise ValueError(f"--dir {folder} is the package's own notebooks folder, the committed notebooks: their "
                         "prepared copies cannot be written over them. Leave --dir out (the copies go to "
                         "runs/lab-<profile>/notebooks) or give another folder")
    manifest_path = folder / PREPARED
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    done = {}
    for name in notebooks:
        target = folder / name
        if target.exists() and manifest.get(name) != file_sha256(target):
            done[name] = "kept"
            continue
        committed = nbformat.read(source / name, as_version=4)
        with tempfile.TemporaryDirectory() as tmp:
            nb = papermill.execute_notebook(
                str(source / name), str(Path(tmp) / name), prepare_only=True, progress_bar=False, log_output=False,
                parameters={key: params[key] for key in declared[name] if key in params})
        originals = iter(committed.cells)
        for cell in nb.cells:
            if INJECTED in cell.metadata.get("tags", []):
                cell.id = INJECTED  # stable, so an unchanged notebook prepares to the same bytes
            else:  # papermill adds empty `papermill` and `tags` entries to every cell: the committed metadata
                cell.metadata = next(originals).metadata
        nb.metadata.papermill.update(input_path=str(source / name), output_path=str(target))
        with atomic_file(target) as handle:
            handle.write(nbformat.writes(nb))
        manifest[name] = file_sha256(target)
        write_json_atomic(manifest, manifest_path)
        done[name] = "written"
    return done


def parse_value(text: str):
    """A ``-p`` value as papermill's CLI reads it: True/False/None, int, float, else the string."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def resolve_parameters(profile: str, overrides: dict | None = None, out: str | os.PathLike | None = None, *,
                       valid_keys: set[str] | None = None) -> dict:
    """Profile values, then ``overrides``, then ``out``; paths made absolute; unknown keys and values of the
    wrong type or range (:data:`~qwen_cls.profiles.SCHEMA`) rejected with a :class:`ValueError` naming the key.

    Profile paths are relative to the notebooks folder, override paths to the current directory.
    """
    params = profile_parameters(profile)
    valid = set(valid_keys) if valid_keys is not None else set(params)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    if "profile" in overrides and overrides["profile"] != profile:
        raise ValueError("choose the profile with --profile, not -p profile")
    for key, value in params.items():  # a profile's own values (a new profile's typo shows up here)
        try:
            check_parameter(key, value)
        except ParameterError as exc:
            raise ParameterError(f"profile {profile}: {exc}") from None
    for key, value in overrides.items():
        try:
            check_parameter(key, value)
        except ParameterError as exc:
            raise ParameterError(f"-p {exc}") from None
    base = notebooks_dir()
    for key, value in params.items():
        if is_path_key(key) and isinstance(value, str) and value:
            params[key] = str((base / value).resolve())
    for key, value in overrides.items():
        if is_path_key(key) and isinstance(value, str) and value:
            value = str(Path(value).expanduser().resolve())
        elif key == "base_model" and isinstance(value, str) and Path(value).expanduser().exists():
            value = str(Path(value).expanduser().resolve())  # a local model folder, as seen from here
        params[key] = value
    if out is not None:
        params["out_dir"] = str(Path(out).expanduser().resolve())
    return params
