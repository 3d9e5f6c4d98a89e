"""qwen-cls: the helper library behind the notebooks (LoRA fine-tuning of Qwen2 as a text classifier)."""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("QWEN_CLS_HEADLESS"):  # a kernel of `qwen-cls run`: nobody watches a live widget
    # Progress bars as text, which a saved notebook shows finished, instead of widgets that it shows frozen
    # at 0%. Set before datasets/transformers import ``tqdm.auto`` (the notebooks import qwen_cls first).
    import tqdm.auto as _auto
    import tqdm.std as _std

    _auto.tqdm, _auto.trange = _std.tqdm, _std.trange
