"""A run folder of the default profile's shape (``gemma3-270m`` on THUCNews headlines) for the exercise checks,
made in about a minute without training: real rows split as 01 splits them, Gemma's tokenizer at the profile's
``max_length`` (02's files), a LoRA adapter of Gemma 3 270M as ``get_peft_model`` makes it before training (03's
shapes), seeded made-up scores for 04 and 05 (right about as often as the demo's), 05's BM25 retriever, 06's TF-IDF
accuracy and a ``seq_cls/`` adapter file with the head's shape. Every file a check reads, nothing else; the
numbers in it are of no model, so no test reads an accuracy off it as a result."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "gemma3-270m"
RAG_TEST_ROWS = 150


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")


def _scores(rng: random.Random, row: dict, right: bool, n_tokens) -> dict:
    """Log-probability-like scores (about -1 to -6 per token) whose top candidate is the answer iff ``right``."""
    scores = {c: -rng.uniform(0.5, 3.0) * (n_tokens(c) + 1) for c in row["category"]}
    others = [c for c in row["category"] if c != row["output"]]
    best_other = max(scores[c] for c in others)
    if right:
        scores[row["output"]] = best_other + rng.uniform(0.05, 3.0)
    elif scores[row["output"]] >= best_other:
        scores[row["output"]] = best_other - rng.uniform(0.05, 3.0)
    return scores


def make_default_run(out: Path) -> Path:
    """Write the default-shape run folder ``out`` (see the module's docstring) and return it."""
    import torch
    from datasets import Dataset
    from safetensors.torch import save_file

    from qwen_cls.approaches import word_vectorizer
    from qwen_cls.data import read_raw_rows, sample_rows, split_train_validation, to_instruction_row
    from qwen_cls.exercises_methods import tfidf_accuracy
    from qwen_cls.metrics import classification_metrics
    from qwen_cls.model import load_model, load_tokenizer, resolve_model
    from qwen_cls.profiles import PROFILES
    from qwen_cls.rag import Retriever, retrieval_vote
    from qwen_cls.tokenization import label_ids, tokenize_dataset, truncation_report
    from qwen_cls.train import prepare_lora_model, recipe_lora_config

    params = dict(PROFILES[PROFILE])
    for key in ("train_path", "test_path"):
        params[key] = str((ROOT / "notebooks" / params[key]).resolve())
    params["out_dir"] = str(out)
    out.mkdir(parents=True)
    _write_json(out / "params.json", params)

    # 01: the profile's split of the real headlines
    train_raw, validation_raw = split_train_validation(read_raw_rows(params["train_path"]),
                                                       params["max_train_samples"], params["validation_rows"],
                                                       params["seed"])
    test_raw = sample_rows(read_raw_rows(params["test_path"]), params["max_test_samples"], params["seed"])
    train, test = [to_instruction_row(r) for r in train_raw], [to_instruction_row(r) for r in test_raw]
    _write_jsonl(out / "data" / "train.jsonl", train)
    _write_jsonl(out / "data" / "validation.jsonl", [to_instruction_row(r) for r in validation_raw])
    _write_jsonl(out / "data" / "test.jsonl", test)

    # 02: Gemma's tokenizer at the profile's max_length
    tokenizer = load_tokenizer(resolve_model(params["base_model"]))
    tokenized = tokenize_dataset(Dataset.from_list(train), tokenizer, params["max_length"])
    tokenized.save_to_disk(str(out / "tokenized" / "train"))
    _write_json(out / "truncation_report.json", truncation_report(tokenized))

    # 03: the adapter get_peft_model makes (B = 0, untrained: the checks read its shapes) and the run record's keys
    model, _ = load_model(params["base_model"], dtype=torch.float32)
    lora_config = recipe_lora_config(model, r=params["lora_r"], lora_alpha=params["lora_alpha"],
                                     lora_dropout=params["lora_dropout"])
    model = prepare_lora_model(model, lora_config, gradient_checkpointing=False)
    model.save_pretrained(str(out / "adapter"))
    steps = math.ceil(len(train) / params["per_device_train_batch_size"]) * params["num_train_epochs"]
    _write_json(out / "run_config.json", {
        "profile": PROFILE, "base_model": params["base_model"], "max_length": params["max_length"],
        "lora": {"r": params["lora_r"], "lora_alpha": params["lora_alpha"], "lora_dropout": params["lora_dropout"],
                 "target_modules": sorted(lora_config.target_modules)},
        "training": {"learning_rate": params["learning_rate"], "global_step": steps}, "seed": params["seed"]})

    # 04: made-up scores, LoRA right on about 87 % of the rows, zero-shot on about 35 % (the demo's rates)
    rng = random.Random(params["seed"])
    n_tokens = lambda label: len(label_ids(tokenizer, label))  # noqa: E731
    predictions = []
    for row in test:
        scores = _scores(rng, row, rng.random() < 0.87, n_tokens)
        zero = _scores(rng, row, rng.random() < 0.35, n_tokens)
        top = max(scores.values())
        total = sum(math.exp(s - top) for s in scores.values())
        predictions.append({**row, "prediction": max(scores, key=scores.get), "scores": scores,
                            "probabilities": {c: math.exp(s - top) / total for c, s in scores.items()},
                            "zero_shot_scores": zero, "generated": None})
    _write_jsonl(out / "predictions.jsonl", predictions)

    # 05: the real retriever over the training rows; rag / lora_rag flip a made-up share of the model's answers
    retriever = Retriever.build(train)
    retriever.save(out / "retriever")
    compared = predictions[:RAG_TEST_ROWS]
    found = retriever.retrieve_batch([r["text"] for r in compared], params["rag_k"])
    rag_rows = []
    for row, neighbours in zip(compared, found):
        zero = max(row["zero_shot_scores"], key=row["zero_shot_scores"].get)
        flip = lambda label: rng.choice(row["category"]) if rng.random() < 0.15 else label  # noqa: E731
        rag_rows.append({key: row[key] for key in ("text", "category", "output")} | {"predictions": {
            "retrieval_vote": retrieval_vote(neighbours, row["category"], prior=retriever.label_counts),
            "zero_shot": zero, "rag": flip(zero), "lora": row["prediction"], "lora_rag": flip(row["prediction"])}})
    _write_jsonl(out / "rag_predictions.jsonl", rag_rows)
    y_true = [r["output"] for r in rag_rows]
    _write_json(out / "rag_metrics.json", {
        method: {**{k: classification_metrics(y_true, [r["predictions"][method] for r in rag_rows])[k]
                    for k in ("accuracy", "macro_f1")}, "n_test": len(rag_rows)}
        for method in ("retrieval_vote", "zero_shot", "rag", "lora", "lora_rag")})
    _write_json(out / "rag_timing.json", {"n_test": len(rag_rows)})

    # 06: TF-IDF as 06 trains it; seq_cls/ holds the head (labels x hidden_size, float32) beside 03's LoRA shapes
    _write_json(out / "approaches.json", {"tfidf_logreg": {
        "accuracy": tfidf_accuracy(train, test[:RAG_TEST_ROWS], word_vectorizer((1, 2))),
        "n_test": RAG_TEST_ROWS}})
    labels = sorted({r["output"] for r in train})
    seq_cls = out / "seq_cls"
    seq_cls.mkdir()
    tensors = {name: torch.zeros(p.shape) for name, p in model.named_parameters() if "lora_" in name}
    tensors = {name.replace(".default", ""): t for name, t in tensors.items()}
    tensors["base_model.model.score.weight"] = torch.zeros(len(labels), model.config.hidden_size)
    save_file(tensors, str(seq_cls / "adapter_model.safetensors"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    _write_json(seq_cls / "adapter_config.json", {**config, "task_type": "SEQ_CLS",
                                                   "modules_to_save": ["classifier", "score"]})
    return out
