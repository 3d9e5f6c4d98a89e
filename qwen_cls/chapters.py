"""The tutorial's chapters, in order: the notebooks ``qwen-cls run`` executes and notebook 00 lists.

Taught in: 00
"""

from __future__ import annotations

from pathlib import Path

NOTEBOOKS = (
    "00_check_environment.ipynb",
    "01_data_conversion.ipynb",
    "02_tokenization.ipynb",
    "03_lora_training.ipynb",
    "04_evaluation.ipynb",
    "05_rag.ipynb",
    "06_approaches.ipynb",
    "07_serve.ipynb",
)


def notebooks_dir() -> Path:
    """The ``notebooks/`` folder of the source tree (the notebooks' working directory)."""
    return Path(__file__).resolve().parent.parent / "notebooks"
