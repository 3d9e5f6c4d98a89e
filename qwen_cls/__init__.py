"""qwen-cls: the helper library behind the notebooks (LoRA fine-tuning of Qwen2 as a text classifier)."""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("QWEN_CLS_HEADLESS"):  # a kernel of `qwen-cls run`: nobody watches a live widget
    # Progress bars as text, which a saved notebook shows finished, instead of widgets that it shows frozen
    # at 0%; and each bar writes one line, its final state, instead of a refresh every 0.1 s (which the saved
    # notebook keeps as a wall of stderr lines). Set before datasets/transformers import ``tqdm.auto`` (the
    # notebooks import qwen_cls first). In JupyterLab (no QWEN_CLS_HEADLESS) the live bars stay.
    import tqdm.auto as _auto
    import tqdm.std as _std

    class _FinalLineTqdm(_std.tqdm):
        """A text bar that stays silent while it runs and writes its final line when it closes."""

        def display(self, msg=None, pos=None):
            # tqdm.close() sets ``disable`` before its last display: only that one (not a clearing one) prints
            if not self.disable or msg == "":
                return False
            return super().display(msg, pos)

    def _final_line_trange(*args, **kwargs):
        return _FinalLineTqdm(range(*args), **kwargs)

    _auto.tqdm, _auto.trange = _FinalLineTqdm, _final_line_trange
