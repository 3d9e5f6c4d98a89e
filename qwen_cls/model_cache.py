"""The offline models' folders in the cache, as the loading side knows them: each model's name, build version,
folder, model card line, file names and the command that builds it (:data:`OFFLINE_BUILDS`, one source of truth
that the builders in :mod:`qwen_cls.model_builds` build from), and the check a use makes
(:meth:`ModelBuild.ready`): a whole build is used, a damaged one named with the command that rebuilds it, a missing
one named with the command that builds it. Nothing here builds: the tools tier does (``qwen-cls run``, ``lab``,
``predict``, ... build a missing folder first).

Plumbing under: 00, 02, 03, 04, 05, 06, 07
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .files import check_folder_path
from .hub import GEMMA, QWEN_CODER, TINY, ModelNotFound, cache_dir
from .manifests import build_state, damaged_model, not_a_build

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
# What a build writes before its manifest, for every model (a model adds its own card and license files).
SAVED_NAMES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md"})


class ModelNotBuilt(ModelNotFound):
    """An offline model's folder is not built yet; ``model`` names it, the message the command that builds it."""

    def __init__(self, message: str, model: str):
        super().__init__(message)
        self.model = model


@dataclass(frozen=True)
class ModelBuild:
    """One offline model: its name, the build's version (bump it when the build changes, so caches rebuild),
    the cache folder's name, the model card's first line, the file names the build writes, the command that
    builds it, and what builds it ahead (``make setup``), if anything."""

    model: str
    version: str
    folder: str
    card: str
    names: frozenset
    command: str
    ahead: str = ""

    def default_dir(self) -> Path:
        """The cached folder the build writes by default."""
        return cache_dir() / self.folder

    def rebuild_command(self, out: Path) -> str:
        """The command that builds (or rebuilds) ``out``."""
        return self.command if Path(out) == self.default_dir() else f"{self.command} --out {out}"

    def state(self, out: Path, *, hashes: bool = False) -> tuple[str, list[str]]:
        """:func:`~qwen_cls.manifests.build_state` of this model's build at ``out``."""
        return build_state(out, self.model, self.version, card=self.card, names=self.names, required=REQUIRED,
                           hashes=hashes)

    def ready(self, *, verify: bool = False) -> Path:
        """The cached folder, checked for use (sizes; SHA-256 too with ``verify``); nothing is built or written.
        Raises :class:`ModelNotBuilt` when it is missing or empty, :class:`~qwen_cls.manifests.DamagedModel` when
        damaged, ``FileExistsError`` when it holds something else. A whole folder built before manifests is used
        as it is (the next build records its manifest)."""
        out = self.default_dir()
        check_folder_path(out, "the model cache folder")  # a file standing there: named, not an OS traceback
        state, problems = self.state(out, hashes=verify)
        if state in ("absent", "empty"):
            ahead = f", or `{self.ahead}` ahead" if self.ahead else ""
            raise ModelNotBuilt(f"{out}: the {self.model} model is not built yet; build it with `{self.command}`"
                                f"{ahead} (`qwen-cls run`, `lab`, `train`, `predict`, `serve` and `export` "
                                "build it first)", self.model)
        if state == "foreign":
            raise not_a_build(out, self.model, problems)
        if problems:  # damaged, or built before manifests and truncated
            raise damaged_model(out, problems, self.rebuild_command(out))
        return out


TINY_SEED = 0
TINY_VERSION = "2"  # bump when the build changes (its config, files written), so caches rebuild
TINY_CARD = "# tiny-qwen2 (random weights)"  # README.md's first line


def tiny_build(seed: int = TINY_SEED) -> ModelBuild:
    """The tiny model's build (one cache folder per seed)."""
    return ModelBuild(model=TINY, version=TINY_VERSION, folder=f"tiny-qwen2-v{TINY_VERSION}-seed{seed}",
                      card=TINY_CARD, names=SAVED_NAMES | {"vocab.json", "merges.txt", "added_tokens.json"},
                      command="qwen-cls tiny-model")


GEMMA_VERSION = "2"  # bump when the build changes, so caches rebuild
GEMMA_CARD = f"# {GEMMA}: Gemma 3 270M (pretrained base), dequantized from Q4_K_M"  # README.md's first line
GEMMA_BUILD = ModelBuild(model=GEMMA, version=GEMMA_VERSION, folder=f"gemma3-270m-q4km-dense-v{GEMMA_VERSION}",
                         card=GEMMA_CARD, names=SAVED_NAMES | {"tokenizer.model", "GEMMA_TERMS.html"},
                         command="qwen-cls gemma-model", ahead="make setup")

QWEN_VERSION = "2"  # bump when the build changes, so caches rebuild (2: the model card says the head is untied)
QWEN_CARD = f"# {QWEN_CODER}: Qwen2.5-Coder-0.5B-Instruct, dequantized from Q4_K_M"  # README.md's first line
QWEN_BUILD = ModelBuild(model=QWEN_CODER, version=QWEN_VERSION,
                        folder=f"qwen2.5-coder-0.5b-q4km-dense-v{QWEN_VERSION}", card=QWEN_CARD,
                        names=SAVED_NAMES | {"LICENSE"}, command="qwen-cls qwen-model", ahead="make setup QWEN=1")

OFFLINE_BUILDS = {TINY: tiny_build(), GEMMA: GEMMA_BUILD, QWEN_CODER: QWEN_BUILD}  # the offline models by name
