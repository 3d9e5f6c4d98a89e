"""Choose a profile's training settings on validation rows, never on test rows.

Trains the notebooks' way (02's process function, 03's LoRA config and shared-prefix answer-only trainer, the
profile's dtype) once per setting and scores validation rows with 04's candidate scoring. The validation rows
are notebook 01's: ``data.split_train_validation`` shuffles the training file with the seed, 01 keeps the first
``max_train_samples`` for training, validation is the last ``--val-rows`` (the profile's ``validation_rows``
by default; disjoint for any row count the grid names). The test file is never read.

    .venv/bin/python benchmarks/choose_settings.py --profile qwen2.5-coder-0.5b \
        --grid learning_rate=1e-3,5e-4,2e-4 --out runs/choose/qwen.json

Each point prints validation accuracy and training seconds; the JSON holds them with the machine's CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = {"learning_rate": float, "max_train_samples": int, "num_train_epochs": float, "lora_r": int,
        "lora_alpha": float, "lora_dropout": float, "per_device_train_batch_size": int}


def split_rows(params: dict, val_rows: int):
    """(training rows as 01 keeps them, validation rows from the rest of the training file)."""
    from qwen_cls.data import read_raw_rows, split_train_validation, to_instruction_row

    train_path = (ROOT / "notebooks" / params["train_path"]).resolve()
    try:  # notebook 01's split, the same function
        train, val = split_train_validation(read_raw_rows(train_path), params["max_train_samples"], val_rows,
                                            params["seed"])
    except ValueError as exc:
        raise SystemExit(f"{train_path}: {exc}") from None
    return [to_instruction_row(r) for r in train], [to_instruction_row(r) for r in val]


def train_and_score(params: dict, val_rows: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, TrainingArguments, set_seed

    from qwen_cls.evaluate import score_candidates
    from qwen_cls.metrics import classification_metrics
    from qwen_cls.model import load_model, pick_device, pick_dtype
    from qwen_cls.model_builds.offline import ensure_built
    from qwen_cls.tokenization import tokenize_dataset
    from qwen_cls.train import AnswerOnlyTrainer, model_inputs, prepare_lora_model, recipe_lora_config, use_fast_dropout

    train_rows, val = split_rows(params, val_rows)
    device = pick_device()
    dtype = pick_dtype(device, params["precision"])
    ensure_built(params["base_model"])  # an offline model: into the cache, once
    model, tokenizer = load_model(params["base_model"], device=device, dtype=dtype)
    tokenized = tokenize_dataset(Dataset.from_list(train_rows), tokenizer, params["max_length"])
    set_seed(params["seed"])
    config = recipe_lora_config(model, r=params["lora_r"], lora_alpha=params["lora_alpha"],
                                lora_dropout=params["lora_dropout"])
    model = prepare_lora_model(model, config, gradient_checkpointing=params["gradient_checkpointing"])
    use_fast_dropout(model)
    tokenizer.padding_side = "right"
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=params["per_device_train_batch_size"],
        gradient_accumulation_steps=params["gradient_accumulation_steps"], learning_rate=params["learning_rate"],
        num_train_epochs=params["num_train_epochs"], train_sampling_strategy="group_by_length",
        logging_steps=10**6, bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(),
        save_strategy="no", report_to="none", disable_tqdm=True, seed=params["seed"], dataloader_num_workers=0)
    trainer = AnswerOnlyTrainer(model=model, args=args, train_dataset=model_inputs(tokenized),
                                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                                share_prefix=True)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    model.eval()
    scored = score_candidates(model, tokenizer, val, max_length=params["max_length"],
                              batch_size=params["eval_batch_size"])
    with model.disable_adapter():
        zero = score_candidates(model, tokenizer, val, max_length=params["max_length"],
                                batch_size=params["eval_batch_size"])
    truth = [row["output"] for row in val]
    return {"val_accuracy": classification_metrics(truth, [s.prediction for s in scored])["accuracy"],
            "val_zero_shot": classification_metrics(truth, [s.prediction for s in zero])["accuracy"],
            "train_rows": len(train_rows), "val_rows": len(val), "train_seconds": round(train_seconds, 1),
            "dtype": str(dtype).removeprefix("torch.")}


def main(argv=None) -> int:
    from qwen_cls.profiles import profile_parameters

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help=f"a setting and its values ({', '.join(KEYS)}); several --grid: every combination")
    parser.add_argument("--val-rows", type=int, default=None, help="default: the profile's validation_rows")
    parser.add_argument("--out", type=Path, required=True, help="JSON file: every point's figures")
    args = parser.parse_args(argv)
    base = profile_parameters(args.profile)
    axes = []
    for item in args.grid:
        key, _, values = item.partition("=")
        if key not in KEYS or not values:
            parser.error(f"--grid {item!r}: write KEY=V1,V2 with KEY one of {', '.join(KEYS)}")
        axes.append([(key, KEYS[key](v)) for v in values.split(",")])
    from qwen_cls.chain.machine import cpu_name

    results = json.loads(args.out.read_text()) if args.out.exists() else {"cpu": cpu_name(), "points": []}
    for point in itertools.product(*axes) if axes else [()]:
        params = {**base, **dict(point)}
        label = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point) or "profile"
        figures = train_and_score(params, args.val_rows or params["validation_rows"], args.out.parent / "work")
        entry = {"setting": dict(point), "training": {k: params[k] for k in KEYS}, **figures}
        results["points"].append(entry)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{label}: validation accuracy {figures['val_accuracy']:.3f} (zero-shot {figures['val_zero_shot']:.3f}) "
              f"on {figures['val_rows']} rows, training {figures['train_seconds']:.0f} s on {results['cpu']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
