"""The notebooks' own checks hold for every dtype: the checking cells of 03 (answer-only loss == the model's loss)
and 04 (``score_row`` == ``score_candidates``), taken from the committed notebooks and run as they are, on the
Qwen2 architecture in bfloat16 and float32, with a LoRA adapter that is not zero (a trained one's scores move).

A bfloat16 model sums in another order on each path (one forward per candidate vs a shared KV cache), and the
rounding grows with the depth and the rows' length: the checks compare in float32 (``model.float32_weights``),
so they hold for the real 24-layer Qwen2 as for the tiny one. 03's reload check needs no float32 copy: the trained
and the reloaded model hold the same weights in the same dtype and compute alike once accelerate's autocast is off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen_cls import model as M

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# Long rows (as a user's own news data): the bfloat16 paths drift further apart on long prompts.
ROWS = [
    {"text": "国家队在昨晚的比赛中以三比零战胜对手，" * 12, "category": ["Sports", "Finance", "Entertainment"],
     "output": "Sports"},
    {"text": "央行宣布下调存款准备金率，股市应声上涨。" * 12, "category": ["Finance", "Stocks"], "output": "Finance"},
    {"text": "新游戏发布会上公布了三款作品。" * 12, "category": ["Game", "Science", "Society", "Realty"],
     "output": "Game"},
]


def cell_with(name: str, needle: str) -> str:
    """The source of the committed notebook's one code cell holding ``needle``."""
    cells = [c for c in json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))["cells"]
             if c["cell_type"] == "code" and needle in "".join(c["source"])]
    assert len(cells) == 1, f"{name}: {len(cells)} code cells hold {needle!r}"
    return "".join(cells[0]["source"])


def lora_model(folder, dtype, spread: float = 0.5):
    """The model at ``folder`` with a LoRA adapter whose B is not zero (drawn with std ``spread``, so the adapter
    changes the scores), in ``dtype`` as 04 loads a bfloat16 run (the adapter in the body's dtype)."""
    from peft import get_peft_model

    from qwen_cls.train import recipe_lora_config

    model, tokenizer = M.load_model(folder, device="cpu", dtype=dtype)
    torch.manual_seed(0)
    model = get_peft_model(model, recipe_lora_config(model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, spread)
    return model.to(dtype).eval(), tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_04_score_row_check_holds(tiny_dir, dtype, capsys):
    model, tokenizer = lora_model(tiny_dir, dtype)
    namespace = {"model": model, "tokenizer": tokenizer, "test_rows": ROWS, "max_length": 384}
    exec(cell_with("04_evaluation.ipynb", "def score_row("), namespace)  # asserts inside
    assert f"{len(ROWS)} 行: score_row 和 score_candidates 的预测相同" in capsys.readouterr().out
    assert next(model.parameters()).dtype == dtype  # the check hands the model back in its own dtype
    assert next(p for n, p in model.named_parameters() if "lora_B" in n).dtype == dtype


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_03_answer_only_loss_check_holds(tiny_dir, dtype, capsys):
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    from qwen_cls import train as library
    from qwen_cls.tokenization import tokenize_dataset

    model, tokenizer = lora_model(tiny_dir, dtype)
    tokenizer.padding_side = "right"
    tokenized = tokenize_dataset(Dataset.from_list(ROWS), tokenizer, 384)
    features = [library.model_inputs(tokenized)[k] for k in range(2)]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(features)
    namespace = {"model": model, "batch": batch, "dtype": dtype, "torch": torch}
    exec(cell_with("03_lora_training.ipynb", "def answer_only_loss("), namespace)  # asserts inside
    assert "== qwen_cls.train.answer_only_loss" in capsys.readouterr().out
    assert next(model.parameters()).dtype == dtype


def test_float32_weights_gives_the_model_back_bit_for_bit(tiny_dir):
    model, _ = lora_model(tiny_dir, torch.bfloat16)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with M.float32_weights(model) as inside:
        assert inside is model and {p.dtype for p in model.parameters()} == {torch.float32}
    after = model.state_dict()
    assert all(after[name].dtype == torch.bfloat16 and torch.equal(after[name], t) for name, t in before.items())


@pytest.mark.slow
def test_04_score_row_check_holds_for_the_real_qwen2_in_bfloat16(capsys):
    """The 24-layer Qwen2 (qwen2.5-coder-0.5b, built by `make setup QWEN=1`, as CI does) in bfloat16 with an
    adapter that moves its scores: the check that stopped its chain holds."""
    from qwen_cls.model_cache import QWEN_BUILD

    if QWEN_BUILD.state(QWEN_BUILD.default_dir())[0] != "built":
        pytest.skip("the qwen2.5-coder-0.5b folder is not built (make setup QWEN=1)")
    model, tokenizer = lora_model(QWEN_BUILD.default_dir(), torch.bfloat16, spread=0.02)
    rows = [dict(row, text=row["text"][: len(row["text"]) // 3]) for row in ROWS]
    namespace = {"model": model, "tokenizer": tokenizer, "test_rows": rows, "max_length": 384}
    exec(cell_with("04_evaluation.ipynb", "def score_row("), namespace)
    assert f"{len(rows)} 行: score_row 和 score_candidates 的预测相同" in capsys.readouterr().out
    assert next(model.parameters()).dtype == torch.bfloat16


def _tiny_training_batch(tokenizer):
    from datasets import Dataset

    from qwen_cls.tokenization import tokenize_dataset

    tokenizer.padding_side = "right"
    return tokenize_dataset(Dataset.from_list(ROWS), tokenizer, 384)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_03_shared_prefix_check_holds(tiny_dir, dtype, capsys):
    """03's shared-prefix cell, run as it is: it counts the prefix with the library's ``batch_shared_prefix`` and
    its loss with ``share_prefix=True`` equals the whole batch's, for a bfloat16 model too."""
    from qwen_cls import train as library

    model, tokenizer = lora_model(tiny_dir, dtype)
    model.train()
    tokenized = _tiny_training_batch(tokenizer)
    namespace = {"model": model, "tokenizer": tokenizer, "train_dataset": tokenized, "per_device_train_batch_size": 8,
                 "data_collator": library.padding_collator(tokenizer), "model_inputs": library.model_inputs,
                 "library": library, "float32_weights": M.float32_weights, "torch": torch}
    exec(cell_with("03_lora_training.ipynb", "batch_shared_prefix("), namespace)  # asserts inside
    out = capsys.readouterr().out
    prompts = [row for row in tokenized["input_ids"]]
    common = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
    assert 0 < namespace["n_shared"] <= common  # all rows share it, none of it is an answer token
    assert f"每行开头相同的 {namespace['n_shared']} 个 token 只算一次" in out and "整批一起算" in out and "✓" in out
    assert model.training and next(model.parameters()).dtype == dtype  # handed back as it was


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_03_reloaded_adapter_check_holds(tiny_dir, tmp_path, dtype, capsys):
    """03's reload cell, run as it is on an adapter saved by ``run_record.save_training``: the reloaded model's
    scores equal the trained one's; an adapter that is not the model's fails the check."""
    from types import MethodType, SimpleNamespace

    from accelerate.utils import convert_outputs_to_fp32, extract_model_from_parallel
    from peft import get_peft_model

    from qwen_cls import run_record
    from qwen_cls.train import recipe_lora_config

    model, tokenizer = M.load_model(tiny_dir, device="cpu", dtype=dtype)  # as 03 trains: the body in dtype,
    torch.manual_seed(0)
    model = get_peft_model(model, recipe_lora_config(model))  # LoRA's A and B in float32
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained adapter moves the scores
    run_record.save_training(tmp_path, model, tokenizer, {}, [])
    def wrap_autocast():  # what Trainer's accelerate leaves on a model trained in bfloat16: an autocast forward
        model._original_forward = model.forward
        model.forward = MethodType(convert_outputs_to_fp32(torch.autocast("cpu", dtype=dtype)(model.forward.__func__)),
                                   model)

    if dtype == torch.bfloat16:
        wrap_autocast()
    trainer = SimpleNamespace(accelerator=SimpleNamespace(
        unwrap_model=lambda m, keep_fp32_wrapper=True: extract_model_from_parallel(m, keep_fp32_wrapper)))
    namespace = {"model": model, "trainer": trainer, "tokenizer": tokenizer, "base_model": str(tiny_dir),
                 "dtype": dtype, "device": torch.device("cpu"), "adapter_dir": tmp_path / "adapter",
                 "monitor_rows": ROWS, "max_length": 384, "torch": torch, "float32_weights": M.float32_weights}
    cell = cell_with("03_lora_training.ipynb", "PeftModel.from_pretrained(")
    exec(cell, namespace)  # asserts inside
    assert "2 行的候选分数和训练好的模型相同" in capsys.readouterr().out
    assert namespace["gap"] == 0.0  # same weights, same dtype, same operations: bit for bit
    if dtype == torch.bfloat16:  # the autocast left on: the trained model computes otherwise, the check fails
        wrap_autocast()
        with pytest.raises(AssertionError):
            exec(cell.replace("model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)", ""),
                 dict(namespace, model=model))
        model.forward = model.__dict__.pop("_original_forward")
    with torch.no_grad():  # another adapter: the check must fail
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(AssertionError):
        exec(cell, dict(namespace))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_06_written_out_seq_cls_model_equals_the_library_loader(tiny_dir, tmp_path, dtype):
    """06's cell writes ``AutoModelForSequenceClassification.from_pretrained(...)`` out; predict and export load
    the head with ``approaches.load_seq_cls_base``. Run the cell as committed: same config (labels both ways, pad
    token), a float32 head of the same shape, the same body weights in the run's dtype; only the random head
    differs. (The notebook no longer loads a second base to check this: a 0.5B model's worth of memory.)"""
    from types import SimpleNamespace

    from qwen_cls.approaches import SEQ_CLS_HEAD, load_seq_cls_base
    from qwen_cls.data import training_labels
    from qwen_cls.train import recipe_lora_config

    record = {"dtype": dtype, "base_model": str(tiny_dir), "max_length": 64}
    (tmp_path / "run_config.json").write_text(json.dumps(record))
    train_rows = ROWS
    labels = training_labels(train_rows)
    config = recipe_lora_config(M.load_model(tiny_dir, device="cpu")[0])
    namespace = {"training_labels": training_labels, "train_rows": train_rows, "base_model": str(tiny_dir),
                 "tfidf_logreg": SimpleNamespace(classes_=labels), "seed": 0, "out_dir": tmp_path,
                 "run_config": {"lora": {"target_modules": sorted(config.target_modules), "r": config.r,
                                         "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout}}}
    exec(cell_with("06_approaches.ipynb", "AutoModelForSequenceClassification.from_pretrained("), namespace)
    mine = namespace["seq_model"].base_model.model  # under PEFT's wrapper
    body_dtype = M.trained_dtype({"dtype": dtype}, "cpu")  # what run_dtype gives the cell on this machine
    reference, _ = load_seq_cls_base(str(tiny_dir), labels, device="cpu", dtype=body_dtype)
    for key in ("num_labels", "id2label", "label2id", "pad_token_id"):
        assert getattr(mine.config, key) == getattr(reference.config, key), key
    assert mine.config.id2label == dict(enumerate(["Finance", "Game", "Sports"]))
    head = getattr(mine, SEQ_CLS_HEAD).modules_to_save["default"].weight
    assert head.shape == getattr(reference, SEQ_CLS_HEAD).weight.shape == (3, mine.config.hidden_size)
    assert head.dtype == getattr(reference, SEQ_CLS_HEAD).weight.dtype == torch.float32
    theirs = dict(reference.named_parameters())
    body = {name.replace(".base_layer", ""): p for name, p in mine.named_parameters()
            if "lora_" not in name and SEQ_CLS_HEAD not in name}
    assert set(body) == {n for n in theirs if SEQ_CLS_HEAD not in n}
    assert all(torch.equal(p, theirs[name]) and p.dtype == body_dtype for name, p in body.items())
