"""One builder for every offline model folder (``tiny``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``).

A build fetches its source into a scratch folder, checks it, makes the model (random, or a GGUF made dense),
saves it with its tokenizer and files (model card, license) into a temp folder beside the target, writes the
manifest last and renames the folder into place. What differs between models is a :class:`ModelBuild` (names,
version, model card: :data:`qwen_cls.model_cache.OFFLINE_BUILDS`, what the loading side reads too) and its ``make``
function; the lifecycle is here, once:

- an existing build is checked against its manifest (sizes; SHA-256 with ``verify``) and used, rebuilt when
  damaged, or (without ``rebuild``) reported as :class:`~qwen_cls.manifests.DamagedModel` naming the command;
- a folder that is not this model's build is refused before anything is fetched or built;
- a build holds the target's lock (``.NAME.lock``: a second build of the same folder is refused, naming the
  first); temp folders left by a build that was killed are removed by the next one; nothing half-built
  ever sits at the target.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..chain.locks import hold_lock
from ..files import atomic_dir, check_folder_path, check_output_folder, save_tokenizer, save_weights
from ..hub import ModelNotFound
from ..model_cache import ModelBuild
from .folders import OWNER_FILE, mark_owner, note_earlier_builds, remove_stale_builds, settle, write_manifest


class ChecksumMismatch(ValueError):
    """A fetched file is not the one expected: corrupt, truncated or of another version."""


@dataclass(frozen=True)
class Made:
    """What a build's ``make`` step returns: the model and tokenizer to save, and extra files for the folder
    (name -> text to write, or a path to copy)."""

    model: object
    tokenizer: object
    files: dict


def build(spec: ModelBuild, make: Callable[[Path], Made], out_dir: str | os.PathLike | None = None, *,
          verify: bool = False, rebuild: bool = True) -> Path:
    """Build (once) ``spec``'s folder at ``out_dir`` (default: the cache) with ``make``; return the folder.

    ``make(scratch)`` fetches and checks its source inside ``scratch`` (a marked temp folder beside the target,
    removed afterwards) and returns the :class:`Made` model. See the module docstring for what happens to an
    existing folder."""
    out = Path(out_dir).expanduser() if out_dir else spec.default_dir()
    check_folder_path(out, "--out")
    state, problems = spec.state(out, hashes=verify)
    if not settle(out, state, problems, model=spec.model, version=spec.version, rebuild=rebuild,
                  command=spec.rebuild_command(out)):
        return out
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(out, spec.command):  # a second build of this folder is refused, naming this one
        if spec.state(out, hashes=verify)[0] == "built":  # another build finished it just before this took the lock
            return out
        for stale in remove_stale_builds(out):
            print(f"note: removed {stale}, left by a build that was killed", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf.", dir=out.parent) as scratch:
            mark_owner(Path(scratch))
            made = make(Path(scratch))
            with atomic_dir(out) as tmp:  # a half-built model never sits at ``out``
                mark_owner(tmp)
                save_weights(made.model, tmp, safe_serialization=True)  # safetensors files get the umask's mode
                save_tokenizer(made.tokenizer, tmp)
                for name, content in made.files.items():
                    if isinstance(content, Path):
                        shutil.copyfile(content, tmp / name)
                    else:
                        (tmp / name).write_text(content, encoding="utf-8")
                (tmp / OWNER_FILE).unlink()
                write_manifest(tmp, spec.model, spec.version)  # last: a folder with it is whole
    note_earlier_builds(out, spec.model, spec.version)
    return out


# --------------------------------------------------------------------------- GGUF sources


def join_chunks(chunks: list, target: Path) -> str:
    """Concatenate ``chunks`` (paths, or callables returning an open binary file) into ``target``; return the
    SHA-256 of what was written."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in chunks:
            with (chunk() if callable(chunk) else open(chunk, "rb")) as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()


def check_sha256(path: Path, actual: str, expected: str, what: str, fix: str) -> None:
    """Raise :class:`ChecksumMismatch` naming ``path`` (``what`` it was made from) unless the hashes agree."""
    if actual != expected:
        raise ChecksumMismatch(f"{path.name} joined from {what} has SHA-256 {actual}, expected {expected}; "
                               f"a chunk is corrupt or of another version: {fix}")


def load_gguf_dense(gguf: Path, *, chat_template: str, pad_token: str, install_hint: str):
    """(dense model in float32, tokenizer with ``chat_template``) from a GGUF file.

    transformers dequantizes the GGUF weights but marks the model as quantized, which it refuses to save; the
    same weights go into a plain model of the same class made from the config without ``quantization_config``.
    """
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFound(f"reading {gguf.name} needs the package gguf; {install_hint}")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = type(loaded).from_pretrained(None, config=config, state_dict=loaded.state_dict(), dtype=torch.float32)
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = pad_token
    return model.eval(), tokenizer
