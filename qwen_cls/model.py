"""Resolve a model: a local folder, a ModelScope id, or an offline model built into the cache (``tiny``, the
random tiny Qwen2; ``gemma3-270m``, the pretrained Gemma 3 270M; ``qwen2.5-coder-0.5b``) by the tools tier
(:mod:`qwen_cls.model_builds`: ``qwen-cls tiny-model``, ``gemma-model``, ``qwen-model``; ``qwen-cls run`` and
``lab`` build a missing one first). Here a built folder is only found and checked (:mod:`qwen_cls.model_cache`),
never built. Then the dtype by device and precision, and loading (+ a LoRA adapter).

Taught in: 00, 02, 03, 04, 05, 06
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .hub import GEMMA, MODELSCOPE_HOST, QWEN2_MODEL_ID, QWEN_CODER, TINY, ModelNotFound, cache_dir, require_host
from .manifests import damaged_model, manifest_problems, read_manifest, safetensors_problem
from .model_cache import OFFLINE_BUILDS
from .prompt import chat_family
from .recipe import PRECISIONS

# peft 0.21 still calls transformers' deprecated ``is_gradient_checkpointing``: not the learner's concern.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def describe_model(name: str) -> str:
    """What made a run's numbers, for every place that shows them (a random model's numbers mean nothing)."""
    if name == TINY:
        return "tiny random Qwen2: it learns nothing; its numbers show the mechanics only, not results"
    if name == GEMMA:
        return "Gemma 3 270M, pretrained by Google (4-bit GGUF made dense): real numbers from a small model"
    if name == QWEN_CODER:
        return ("Qwen2.5-Coder-0.5B-Instruct, pretrained by Qwen (the Qwen2-0.5B architecture; 4-bit GGUF made "
                "dense): real numbers")
    return f"{name}: a pretrained model; real numbers"


def load_tokenizer(path: str | os.PathLike):
    """Fast tokenizer from a folder; pad token set; ``trust_remote_code`` stays off."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def download_model(model_id: str = QWEN2_MODEL_ID, *, timeout: float = 10.0) -> Path:
    """``modelscope.snapshot_download`` of a hub id (safetensors and tokenizer), failing fast offline."""
    require_host(MODELSCOPE_HOST, timeout=timeout, what=f"the model {model_id}")
    from modelscope import snapshot_download

    return Path(snapshot_download(model_id, cache_dir=str(cache_dir() / "modelscope")))


def resolve_model(name_or_path: str | os.PathLike, *, verify: bool = False) -> Path:
    """A folder holding config, weights and tokenizer: ``tiny``, ``gemma3-270m``, ``qwen2.5-coder-0.5b`` (their
    cached folders), a local folder, or a ModelScope id. A built folder is checked against its manifest (sizes;
    SHA-256 too with ``verify``): a damaged one raises :class:`~qwen_cls.manifests.DamagedModel` naming the file
    and the command that rebuilds it; an offline model not built yet raises
    :class:`~qwen_cls.model_cache.ModelNotBuilt` naming the command that builds it. Nothing is built here."""
    name = str(name_or_path)
    if name in OFFLINE_BUILDS:  # built into the cache by the tools tier (qwen-cls tiny-model, gemma-model, ...)
        return OFFLINE_BUILDS[name].ready(verify=verify)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return check_model_dir(path, verify=verify)
    if name.count("/") == 1:
        return check_model_dir(download_model(name), verify=verify)
    raise ModelNotFound(f"{name!r} is neither {', '.join(repr(m) for m in OFFLINE_BUILDS)}, an existing "
                        f"folder, nor a ModelScope id like {QWEN2_MODEL_ID}")


def check_model_dir(path: Path, *, verify: bool = False) -> Path:
    """Raise :class:`ModelNotFound` unless ``path`` has a config, safetensors weights and a tokenizer, each
    whole: a folder built here is compared with its manifest (:class:`~qwen_cls.manifests.DamagedModel` names the
    file and the command that rebuilds it), every other folder's safetensors files with their own headers."""
    if not path.is_dir():
        raise ModelNotFound(f"{path}: no such model folder; pass {', '.join(repr(m) for m in OFFLINE_BUILDS)}, a "
                            "ModelScope id, or a folder")
    manifest = read_manifest(path)
    if manifest is not None:
        problems = manifest_problems(path, manifest, hashes=verify)
        if problems:
            spec = OFFLINE_BUILDS.get(manifest["model"])
            raise damaged_model(path, problems, spec.rebuild_command(path) if spec else "its build")
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json")
    if not any(path.glob("*.safetensors")):
        problems.append("*.safetensors weights")
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
        problems.append("tokenizer files")
    if problems:
        raise ModelNotFound(f"{path}: incomplete model folder, missing {', '.join(problems)}")
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ModelNotFound(f"{weights}: {problem}; copy or export the model folder again")
    return path


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags (Linux /proc/cpuinfo) of bfloat16 arithmetic


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when the CPU computes in bfloat16 natively (AMX or AVX-512 BF16), as Linux lists its flags;
    False where the flags cannot be read (another OS): bfloat16 would be emulated there, slower than float32."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def pick_dtype(device: torch.device | str, precision: str | None = None) -> torch.dtype:
    """The dtype to load and compute in on ``device``.

    ``precision``: ``None`` — bfloat16 on a CUDA card that supports it, float32 elsewhere; ``"auto"`` — the
    same, and bfloat16 on a CPU with native bfloat16 arithmetic too (:func:`cpu_has_native_bf16`: measured
    1.5x faster training and 2x faster scoring than float32 on such a CPU, ``benchmarks/RESULTS.md``);
    ``"float32"`` or ``"bfloat16"`` — that dtype.
    """
    if precision not in (None, *PRECISIONS):
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision in ("float32", "bfloat16"):
        return getattr(torch, precision)
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision == "auto" and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def trained_dtype(record: dict, device: torch.device | str | None = None) -> torch.dtype:
    """The dtype to load a trained model in on ``device`` (default :func:`pick_device`): the one ``record``
    (``run_config.json``, ``seq_cls.json``) says it was trained in where the device computes it natively, else
    float32 (:func:`~qwen_cls.run_record.run_precision`)."""
    from .run_record import run_precision

    return pick_dtype(device if device is not None else pick_device(), run_precision(record))


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16`` (the name ``run_config.json`` records)."""
    return str(dtype).removeprefix("torch.")


@contextmanager
def float32_weights(model):
    """The model's weights (and buffers) in float32 inside the block, then back in their own dtypes, bit for bit
    (a bfloat16 or float16 value is exact in float32). The notebooks' checks that two computations agree run
    inside it: they compare the computations, not the rounding of a 16-bit dtype, which two summation orders
    (one forward per candidate vs a shared KV cache) spread further apart the deeper the model and the longer the
    row (the real 24-layer Qwen2 in bfloat16: 0.1 on a score of -1.8)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    dtypes = [(tensor, tensor.dtype) for _, tensor in tensors]
    model.float()
    try:
        yield model
    finally:
        for tensor, dtype in dtypes:
            if tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)


def _contiguous_input(_module, args):
    """Forward pre-hook of the LM head: a contiguous input. ``logits_to_keep=1`` (as ``generate`` passes) hands the
    head a (rows, 1, hidden) view of the last position; behind a PEFT wrapper in bfloat16 on a CPU that view made
    each call copy the whole tied embedding once per row (Gemma 3: 17 s instead of 1 s for 16 rows)."""
    return (args[0].contiguous(), *args[1:])


def load_model(path: str | os.PathLike, *, device: torch.device | str | None = None, adapter: str | None = None,
               verify: bool = False, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a resolved folder (checked: :func:`resolve_model`, SHA-256 too with ``verify``), on
    ``device`` in ``dtype`` (default :func:`pick_dtype`), optionally with a LoRA adapter, loaded in that dtype too
    (PEFT's default keeps it float32, which training needs; for inference in bfloat16 that costs a float32 copy of
    every LoRA layer's input and output: candidate scoring took 1.34x the base model's time, 1.15x with the adapter
    in bfloat16, on a 2-core AMD EPYC); a tokenizer without a chat template gets its model family's."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model(path, verify=verify)
    device = torch.device(device) if device is not None else pick_device()
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype or pick_dtype(device), trust_remote_code=False, use_safetensors=True
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), autocast_adapter_dtype=False)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    tokenizer = load_tokenizer(folder)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = chat_family(model.config).chat_template
    return model.to(device).eval(), tokenizer
