"""Training with the shared prompt opening run once per batch (``answer_only_loss(share_prefix=True)``,
``AnswerOnlyTrainer(share_prefix=True)``): the same loss and LoRA gradients as one forward over the whole
batch, for both chat families; the prefix pass really runs once, on one row."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _reference import assert_float32_close

from qwen_cls.files import read_jsonl
from qwen_cls.model import load_model
from qwen_cls.resumable.training_run import tokenized_rows
from qwen_cls.train import (
    AnswerOnlyTrainer,
    answer_only_loss,
    answer_positions,
    batch_shared_prefix,
    padding_collator,
    prepare_lora_model,
    recipe_lora_config,
    training_arguments,
)

pytestmark = pytest.mark.filterwarnings("ignore")

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "train.jsonl"
HEADLINES = [
    ("国足2比0战胜对手晋级世界杯决赛圈", ["Sports", "Finance"], "Sports"),
    ("央行宣布下调存款准备金率0.5个百分点", ["Finance", "Stocks", "Politics"], "Finance"),
    ("周杰伦新专辑首周销量破百万", ["Entertainment", "Game", "Sports"], "Entertainment"),
    ("北京二手房成交量连续三月下滑", ["Realty", "Finance"], "Realty"),
]


def _batch(tokenizer, rows):
    dataset = tokenized_rows([SimpleNamespace(text=t, category=c, output=o) for t, c, o in rows], tokenizer, 128)
    return padding_collator(tokenizer)([{k: dataset[i][k] for k in ("input_ids", "attention_mask", "labels")}
                                        for i in range(len(rows))])


def test_shared_prefix_by_hand():
    ids = torch.tensor([[1, 2, 3, 4, 9, 9], [1, 2, 3, 5, 9, 9]])
    no_answer = torch.zeros_like(ids, dtype=torch.bool)
    assert batch_shared_prefix({"input_ids": ids}, no_answer) == 3  # 1 2 3, then 4 != 5
    answer = no_answer.clone()
    answer[0, 1] = True  # position 1 predicts a supervised token: it must run with its row
    assert batch_shared_prefix({"input_ids": ids}, answer) == 1
    padded = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]])
    assert batch_shared_prefix({"input_ids": ids, "attention_mask": padded}, no_answer) == 2
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert batch_shared_prefix({"input_ids": same}, torch.zeros_like(same, dtype=torch.bool)) == 2  # one left
    assert batch_shared_prefix({"input_ids": ids[:1]}, no_answer[:1]) == 0  # one row: nothing to share


def _lora(model, seed=0):
    torch.manual_seed(seed)
    peft_model = prepare_lora_model(model, recipe_lora_config(model, lora_dropout=0.0), gradient_checkpointing=False)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # nonzero B: gradients reach every LoRA matrix and the prefix's keys matter
            torch.nn.init.normal_(p, std=0.02)
    return peft_model.train()


def _loss_and_grads(model, batch, share):
    model.zero_grad()
    loss = answer_only_loss(model, batch, share_prefix=share)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_shared_prefix_gives_the_same_loss_and_gradients(family, tiny_dir, gemma_dir):
    base, tokenizer = load_model(tiny_dir if family == "qwen2" else gemma_dir, device="cpu")
    model = _lora(base)
    batch = _batch(tokenizer, HEADLINES)
    mask, _ = answer_positions(batch["labels"])
    n = batch_shared_prefix(batch, mask, model)
    # independently: the longest run of equal leading ids across the rows
    rows = batch["input_ids"].tolist()
    expected = next(k for k in range(len(rows[0])) if len({r[k] for r in rows}) > 1)
    assert n == expected and n > 20  # the chat template's opening and the system message

    calls = []
    handle = model.get_decoder().register_forward_pre_hook(  # the layers: the prefix pass skips the LM head
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        shared_loss, shared_grads = _loss_and_grads(model, batch, share=True)
    finally:
        handle.remove()
    assert calls == [(1, n), (len(HEADLINES), batch["input_ids"].shape[1] - n)]  # the prefix once, on one row
    plain_loss, plain_grads = _loss_and_grads(model, batch, share=False)
    assert_float32_close(shared_loss, plain_loss, "loss")
    assert shared_grads.keys() == plain_grads.keys()
    assert_float32_close(torch.cat([g.flatten() for g in shared_grads.values()]),
                         torch.cat([g.flatten() for g in plain_grads.values()]), "LoRA gradients")


def test_no_sharing_under_gradient_checkpointing_or_a_window(tiny_dir):
    base, tokenizer = load_model(tiny_dir, device="cpu")
    batch = _batch(tokenizer, HEADLINES)
    mask, _ = answer_positions(batch["labels"])
    checkpointed = prepare_lora_model(copy.deepcopy(base), recipe_lora_config(base), gradient_checkpointing=True)
    assert batch_shared_prefix(batch, mask, checkpointed) == 0  # recomputed layers keep no cache
    windowed = copy.deepcopy(base)
    windowed.config.layer_types = ["sliding_attention"] * windowed.config.num_hidden_layers
    windowed.config.sliding_window = batch["input_ids"].shape[1]  # the padded batch reaches the window
    assert batch_shared_prefix(batch, mask, windowed) == 0


@pytest.mark.slow
def test_trainer_with_shared_prefix_reaches_the_same_adapter(tiny_dir, tmp_path):
    from datasets import Dataset

    base, tokenizer = load_model(tiny_dir, device="cpu")
    rows = [(r["text"][:60], r["category"], r["output"]) for r in read_jsonl(SAMPLE)[:8]]
    dataset = tokenized_rows([SimpleNamespace(text=t, category=c, output=o) for t, c, o in rows], tokenizer, 96)
    dataset = Dataset.from_dict({k: dataset[k] for k in ("input_ids", "attention_mask", "labels")})
    adapters = {}
    for share in (False, True):
        model = _lora(copy.deepcopy(base))
        args = training_arguments(tmp_path / f"share{share}", per_device_train_batch_size=4, learning_rate=1e-2,
                                  num_train_epochs=1, report_to="none", use_cpu=True, save_strategy="no",
                                  disable_tqdm=True, seed=3, data_seed=3)
        batches = []
        handle = model.get_decoder().register_forward_pre_hook(
            lambda _m, _a, kw: batches.append(kw["input_ids"].shape[0]), with_kwargs=True)
        AnswerOnlyTrainer(model=model, args=args, train_dataset=dataset, data_collator=padding_collator(tokenizer),
                          share_prefix=share).train()
        handle.remove()
        assert batches == ([1, 4, 1, 4] if share else [4, 4])  # two steps: a one-row prefix pass before each batch
        adapters[share] = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_" in n])
    start = torch.cat([p.detach().flatten() for n, p in _lora(copy.deepcopy(base)).named_parameters() if "lora_" in n])
    assert (adapters[False] - start).norm() > 1e-3  # two optimizer steps moved the adapter
    assert_float32_close(adapters[True] - start, adapters[False] - start, "adapter updates")
