"""Shared fixtures: the tiny offline model (built once per session into a temp cache), the Gemma 3 270M folder
(built once into the model cache), and their tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from qwen_cls.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from qwen_cls.model import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def gemma_dir():
    """The Gemma 3 270M dense folder in the model cache: built on first use (about a minute), then reused."""
    from qwen_cls.gemma import build_gemma_model

    return build_gemma_model()


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_dir):
    from qwen_cls.model import load_tokenizer

    return load_tokenizer(gemma_dir)


@pytest.fixture()
def write_lines(tmp_path):
    """Write raw bytes/str lines to a file and return its path."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
        return path

    return _write


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
