"""The Simplified-Chinese font of the figures and the book: Noto Sans SC from the PyPI package
``pylopdf-fonts-zh-cn`` (SIL OFL 1.1), found through the package's resources (:func:`cjk_font_path`) and
registered with matplotlib (:func:`use_cjk_font`, which :mod:`qwen_cls.plots` calls on import) so that Chinese
titles and token text render instead of empty boxes. ``qwen-cls book`` cuts the same file down to the book's
characters.

Plumbing under: 01, 02, 03, 04, 06
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

CJK_FONT_PACKAGE = "pylopdf_fonts_zh_cn"  # PyPI: pylopdf-fonts-zh-cn (Noto Sans SC, SIL OFL 1.1)
CJK_FONT_FILE = "NotoSansSC-Regular.otf"


def cjk_font_path() -> Path | None:
    """The installed Noto Sans SC file, found through the package's resources; ``None`` if not installed."""
    try:
        resource = importlib.resources.files(CJK_FONT_PACKAGE) / CJK_FONT_FILE
    except ModuleNotFoundError:
        return None
    with importlib.resources.as_file(resource) as path:  # a wheel installs plain files: no copy is made
        return Path(path) if Path(path).is_file() else None


def use_cjk_font() -> str | None:
    """Register the CJK font with matplotlib and put its family first in ``font.sans-serif`` (DejaVu Sans
    right after it, for glyphs it lacks); returns the family name, or ``None`` when the font is missing."""
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    path = cjk_font_path()
    if path is None:
        return None
    font_manager.fontManager.addfont(str(path))
    family = font_manager.FontProperties(fname=str(path)).get_name()  # "Noto Sans SC"
    rest = [f for f in plt.rcParams["font.sans-serif"] if f not in (family, "DejaVu Sans")]
    plt.rcParams["font.sans-serif"] = [family, "DejaVu Sans", *rest]
    # Matplotlib falls back glyph by glyph along font.family (not along the sans-serif list): name both, so
    # a character the CJK font lacks (e.g. "↵") comes from DejaVu Sans and italic text keeps its Chinese.
    plt.rcParams["font.family"] = [family, "DejaVu Sans"]
    return family
