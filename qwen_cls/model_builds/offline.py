"""The offline models by name, for the commands: :func:`build_offline_model` (an offline model's builder, by
name) and :func:`ensure_built` (a command about to use a model builds it first when it is missing: ``qwen-cls
run``/``sweep`` before the notebooks, ``lab`` before JupyterLab, ``train``, and ``predict``, ``serve``, ``export``
when they meet :class:`~qwen_cls.model_cache.ModelNotBuilt`), as the core's ``resolve_model`` once did on first use.
"""

from __future__ import annotations

from pathlib import Path

from ..hub import GEMMA, QWEN_CODER, TINY
from .gemma import build_gemma_model
from .qwen_coder import build_qwen_model
from .tiny import build_tiny_model

BUILDERS = {TINY: build_tiny_model, GEMMA: build_gemma_model, QWEN_CODER: build_qwen_model}


def build_offline_model(name: str, **options) -> Path:
    """Build (once) the offline model ``name`` (a key of :data:`BUILDERS`) and return its folder; ``options`` go
    to its builder (``out_dir``, ``verify``, ``rebuild``, ...)."""
    return BUILDERS[name](**options)


def ensure_built(name: str, *, verify: bool = False) -> Path | None:
    """The cached folder of the offline model ``name``, built now when it is missing; a damaged one raises
    :class:`~qwen_cls.manifests.DamagedModel` naming the command that rebuilds it (never rebuilt silently), a
    folder that is not the build is refused. Any other name (a folder, a hub id): None, nothing done."""
    if str(name) not in BUILDERS:
        return None
    return build_offline_model(str(name), verify=verify, rebuild=False)
