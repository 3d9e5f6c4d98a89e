"""The benchmarks' pure helpers: what a row trains on, and the list-of-rows stand-in for ``datasets``."""

from __future__ import annotations

from datasets import Dataset

from benchmarks.listds import RowsDataset
from benchmarks.shapes import seed_tokenize_family, supervised_tokens
from qwen_cls.model import load_tokenizer
from qwen_cls.tokenization import label_ids, tokenize_dataset

LONG = "新华社北京电 国家体育总局今天宣布，全国运动会将于明年秋季在广东举行。" * 20  # far over 64 tokens
ROWS = [{"text": LONG, "category": ["Sports", "Art"], "output": "Sports"},
        {"text": "短文本。", "category": ["Law", "History"], "output": "History"}]


def test_supervised_tokens_counts_targets_after_the_shift():
    rows = [[-100, -100, 5, 6, 7],  # 3 targets
            [-100, -100, -100],  # none
            [9, -100, -100]]  # the first label is never a target: none
    assert supervised_tokens(rows) == {"tokens": 3, "rows": 1, "of_rows": 3}
    assert supervised_tokens([]) == {"tokens": 0, "rows": 0, "of_rows": 0}


def test_recipe_cut_leaves_long_rows_nothing_to_learn(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    seed = seed_tokenize_family(RowsDataset(ROWS), tokenizer, 64, qwen=True)
    project = tokenize_dataset(RowsDataset(ROWS), tokenizer, 64)
    # The recipe's long row is cut before its answer; its short row keeps answer + <|endoftext|>.
    short_answer = len(label_ids(tokenizer, "History")) + 1
    assert len(seed[0]["input_ids"]) == 64
    assert supervised_tokens(seed["labels"]) == {"tokens": short_answer, "rows": 1, "of_rows": 2}
    # The project keeps every answer (+ <|im_end|>) inside 64 tokens.
    both = len(label_ids(tokenizer, "Sports")) + 1 + short_answer
    assert supervised_tokens(project["labels"]) == {"tokens": both, "rows": 2, "of_rows": 2}
    assert max(len(r["input_ids"]) for r in project) <= 64


def test_rows_dataset_maps_like_datasets(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    ours = tokenize_dataset(RowsDataset(ROWS), tokenizer, 64)
    theirs = tokenize_dataset(Dataset.from_list(ROWS), tokenizer, 64)
    assert ours.column_names == theirs.column_names
    assert [ours[i] for i in range(len(ours))] == [theirs[i] for i in range(len(theirs))]
    seed_ours = seed_tokenize_family(RowsDataset(ROWS), tokenizer, 64, qwen=True)
    seed_theirs = seed_tokenize_family(Dataset.from_list(ROWS), tokenizer, 64, qwen=True)
    assert [seed_ours[i] for i in range(2)] == [seed_theirs[i] for i in range(2)]
    assert ours.select([1]).select_columns(["labels"])["labels"] == [theirs[1]["labels"]]


def test_project_cpu_layout_accumulates_one_row_per_forward_to_the_batch(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from benchmarks.shapes import make_trainer, step_timer

    tokenizer = load_tokenizer(tiny_dir)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    rows = tokenize_dataset(Dataset.from_list(ROWS * 4), tokenizer, 64)
    variant = {"kind": "project", "rows": "project", "ckpt": False, "micro_batch": 1}
    trainer = make_trainer(variant, base, tokenizer, {"project": rows}, 3, 4, str(tmp_path))
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (1, 4)
    timer = step_timer(track_steps=2)
    trainer.add_callback(timer)
    trainer.train()
    assert len(timer.seconds) == 3  # steps 1-2 watched for memory, step 3 timed alone
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # the watched steps allocate at least the float32 LoRA gradients and AdamW's two moments of them
    assert timer.memory.peak_bytes >= 3 * 4 * trainable and timer.memory.live_bytes >= 2 * 4 * trainable
    assert not hasattr(base, "peft_config")  # the variant trained a copy
