"""What a ``qwen-cls serve`` answers from: the files its model was loaded from, named with their SHA-256 in
``/health`` (:func:`loaded_identity`), and watched, so that once they are replaced it stops answering
(:class:`FolderWatch`).

``GET /health`` names ``model``, ``adapter`` and their SHA-256 (``model_sha256``, ``adapter_sha256``: of
``sha256sum``'s listing of the files named in ``*_sha256_of``, :func:`files_sha256`). Before and after each pass the
server checks (``stat``: inode, mtime, size) that the adapter and ``run_config.json`` (``--model``: the config and
weights, :func:`watched_files`) are the files it loaded; once they were replaced (``qwen-cls run --overwrite``) or
removed, every request and ``/health`` get 503 naming the change: restart it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..files import file_sha256
from ..manifests import MANIFEST
from ..run_record import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_CONFIG, read_run_config


def files_sha256(folder: Path, names: list[str]) -> str:
    """SHA-256 of ``sha256sum``'s listing of ``names`` in ``folder`` (``<hex>  <name>`` lines, in that order): one
    digest for several files, which ``cd FOLDER && sha256sum NAMES... | sha256sum`` gives too."""
    listing = "".join(f"{file_sha256(Path(folder) / name)}  {name}\n" for name in names)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def model_files(folder: Path) -> list[str]:
    """The files that say which model a folder holds: its manifest when it has one (it lists every file's size and
    SHA-256), else ``config.json`` and the ``*.safetensors`` weights."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return [MANIFEST]
    return ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]


def loaded_identity(*, run=None, model=None) -> dict:
    """What ``/health`` says is loaded for ``--run RUN`` or ``--model FOLDER``: ``model`` (the base model as
    named: ``tiny``, a folder, a hub id), ``model_path`` (its folder), ``model_sha256`` over ``model_sha256_of``
    (:func:`files_sha256`: the folder's manifest, else its config and weights); for a run also ``run``,
    ``adapter`` (its folder) and ``adapter_sha256`` over ``adapter_config.json`` and ``adapter_model.safetensors``
    (``adapter_sha256_of``)."""
    from ..model import resolve_model

    if run is not None:
        run = Path(run).resolve()
        base = read_run_config(run)["base_model"]
        folder = resolve_model(base)
        names = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        identity = {"run": str(run), "model": str(base), "model_path": str(folder), "adapter": str(run / ADAPTER),
                    "adapter_sha256": files_sha256(run / ADAPTER, names), "adapter_sha256_of": names}
    else:
        folder = Path(model).resolve()
        identity = {"run": None, "model": str(model), "model_path": str(folder), "adapter": None,
                    "adapter_sha256": None, "adapter_sha256_of": []}
    of = model_files(folder)
    return {**identity, "model_sha256": files_sha256(folder, of), "model_sha256_of": of}


def watched_files(*, run=None, model=None) -> list[Path]:
    """The files whose replacement :class:`FolderWatch` notices: a run's adapter and ``run_config.json``, or a
    ``--model`` folder's ``config.json`` and weights."""
    if run is not None:
        return [Path(run) / ADAPTER / ADAPTER_CONFIG, Path(run) / ADAPTER / ADAPTER_WEIGHTS, Path(run) / RUN_CONFIG]
    return [Path(model) / name for name in ["config.json", *sorted(p.name for p in Path(model).glob("*.safetensors"))]]


class FolderWatch:
    """Notices, with one ``stat`` per file, that the files a model was loaded from were replaced (inode, mtime or
    size changed, e.g. ``qwen-cls run --overwrite`` renamed a new run folder into place) or removed. Once it has
    noticed, it stays so: the loaded model is not the one on disk any more."""

    def __init__(self, files: list[Path], folder: Path, restart: str):
        self.files, self.folder, self.restart = [Path(f) for f in files], Path(folder), restart
        self.signature = self._stat()
        self.changed: str | None = None

    def _stat(self) -> list:
        out = []
        for path in self.files:
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return out

    def check(self) -> str | None:
        """None while the files are those loaded; else a message naming the file and the fix (kept)."""
        if self.changed is None:
            now = self._stat()
            if now != self.signature:
                path, seen = next((p, b) for p, a, b in zip(self.files, self.signature, now) if a != b)
                self.changed = (f"{self.folder} changed since this server loaded its model ({path} was "
                                f"{'removed' if seen is None else 'replaced'}, e.g. by `qwen-cls run --overwrite`); "
                                f"it does not answer from the old model: restart it ({self.restart}) to serve "
                                "the new one")
        return self.changed
