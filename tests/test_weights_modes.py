"""Every weights file a command writes gets the mode the umask gives (0666 & ~umask), like the files beside it:
the safetensors writer alone makes its files 0600 (issue 33). Export's files: ``test_predict_export`` and
``test_seq_cls_export``; here the run's adapter, 06's ``seq_cls/`` and a built model folder."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

MASKS = [0o022, 0o002]


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> dict:
    """File name -> permission bits, for every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): oct(p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_lora():
    from peft import LoraConfig, get_peft_model

    from qwen_cls.model import load_model

    model, tokenizer = load_model("tiny", device="cpu")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])), tokenizer


@pytest.mark.parametrize("mask", MASKS, ids=["umask022", "umask002"])
def test_the_adapter_of_save_training_gets_the_umasks_mode(tiny_lora, tmp_path, mask):
    from qwen_cls.run_record import save_training

    model, tokenizer = tiny_lora
    with umask(mask):
        save_training(tmp_path, model, tokenizer, {"base_model": "tiny", "max_length": 64}, [])
    found = modes(tmp_path)
    assert "adapter/adapter_model.safetensors" in found
    assert set(found.values()) == {oct(0o666 & ~mask)}, found


@pytest.mark.parametrize("mask", MASKS, ids=["umask022", "umask002"])
def test_seq_cls_folder_gets_the_umasks_mode(tmp_path, mask):
    from peft import LoraConfig, TaskType, get_peft_model

    from qwen_cls.approaches import SEQ_CLS_HEAD, load_seq_cls_base, save_seq_cls

    labels = ["Art", "Sports"]
    model, tokenizer = load_seq_cls_base("tiny", labels, device="cpu")
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["q_proj"], r=4,
                                             modules_to_save=[SEQ_CLS_HEAD]))
    with umask(mask):
        folder = save_seq_cls(model, tokenizer, tmp_path / "seq_cls", base_model="tiny", labels=labels,
                              max_length=64)
    found = modes(folder)
    assert "adapter_model.safetensors" in found
    assert set(found.values()) == {oct(0o666 & ~mask)}, found


@pytest.mark.parametrize("mask", MASKS, ids=["umask022", "umask002"])
def test_a_built_model_folder_gets_the_umasks_mode(tmp_path, mask):
    from qwen_cls.model_builds.tiny import build_tiny_model

    with umask(mask):
        folder = build_tiny_model(tmp_path / "tiny")
    found = modes(folder)
    assert "model.safetensors" in found
    assert set(found.values()) == {oct(0o666 & ~mask)}, found
