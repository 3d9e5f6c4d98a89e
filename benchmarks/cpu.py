"""CPU benchmark: the seed recipe vs the project's path, same rows, same tiny model, one process.

    python benchmarks/cpu.py --out runs/bench        # what `make bench` runs

Each comparison runs its sides in turn (seed, project, seed, project ... after one warm-up round each) and
keeps every repeat; each ratio is the median of the per-pair ratios, written with their spread
(``<ratio>_spread``: ``[min, max]``); a run whose spread is wide is flagged (``noisy``) and warned about
(``benchmarks/paired.py``). Writes ``OUT/bench.json`` (ratios + raw figures) and prints a table.
The tiny model has random weights: it learns nothing, so only speed and memory mean anything here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.paired import NOISY_WIDTH, add_ratio, noisy_ratios  # noqa: E402
from benchmarks.rows import synth_rows  # noqa: E402
from benchmarks.shapes import run_shape, supervised_tokens  # noqa: E402
from qwen_cls.blog_recipe import (  # noqa: E402
    SlowQwen2Tokenizer,
    per_row_generate,  # noqa: E402
    seed_lora_model,
    seed_tokenize,
    seed_trainer,
)
from qwen_cls.measure import TensorMemory, stopwatch  # noqa: E402


def _dataset(rows):
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    return Dataset.from_list(rows)


def bench_tokenize(folder, rows, repeats, max_length):
    """rows/s of the recipe's per-row slow tokenizer vs the project's batched fast one (fresh tokenizers)."""
    from qwen_cls.model import load_tokenizer
    from qwen_cls.tokenization import tokenize_dataset

    times = {"seed": [], "project": []}
    outputs = {}
    for r in range(repeats + 1):
        for name in ("seed", "project"):
            ds = _dataset(rows)
            tok = SlowQwen2Tokenizer(folder) if name == "seed" else load_tokenizer(folder)
            with stopwatch() as t:
                out = seed_tokenize(ds, tok, max_length) if name == "seed" else tokenize_dataset(ds, tok, max_length)
            outputs[name] = out
            if r:
                times[name].append(t["s"])
    return {k: [len(rows) / s for s in v] for k, v in times.items()}, outputs


def _training_args(out_dir, steps, batch_size, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=1e-4, save_strategy="no", report_to="none", logging_steps=10_000,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, use_cpu=True, **extra)


def bench_train(folder, tokenized, steps, batch_size, repeats, workdir):
    """samples/s and peak memory of ``Trainer.train()`` for ``steps`` optimizer steps, seed vs project."""
    from transformers import AutoModelForCausalLM

    from qwen_cls.model import load_tokenizer
    from qwen_cls.train import (
        MODEL_INPUT_COLUMNS,
        AnswerOnlyTrainer,
        model_inputs,
        padding_collator,
        prepare_lora_model,
        recipe_lora_config,
        training_arguments,
    )

    tokenizer = load_tokenizer(folder)
    models = {}
    for name in ("seed", "fair_baseline", "project"):  # fair baseline: the recipe on the project's rows
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
        models[name] = (prepare_lora_model(base, recipe_lora_config(), gradient_checkpointing=True)
                        if name == "project" else seed_lora_model(base))

    def trainer_for(name, n_steps):
        if name != "project":  # the recipe: gradient checkpointing via TrainingArguments, full logits
            args = _training_args(workdir, n_steps, batch_size, gradient_checkpointing=True)
            rows = tokenized["seed" if name == "seed" else "project"]
            return seed_trainer(models[name], tokenizer, rows.select_columns(MODEL_INPUT_COLUMNS), args)
        args = training_arguments(workdir, per_device_train_batch_size=batch_size, max_steps=n_steps,
                                  learning_rate=1e-4, save_strategy="no", report_to="none",
                                  logging_steps=10_000, disable_tqdm=True, seed=0, use_cpu=True)
        return AnswerOnlyTrainer(model=models[name], args=args, train_dataset=model_inputs(tokenized["project"]),
                                 data_collator=padding_collator(tokenizer))

    figures = {name: {"samples_per_s": [], "peak_mem_mb": []} for name in models}
    for name in models:  # warm-up, which measures peak memory: tensor bytes (TensorMemory slows it; not timed)
        with TensorMemory() as mem:
            trainer_for(name, 2).train()
        figures[name]["peak_mem_mb"].append(mem.peak_bytes / 2**20)
    for _ in range(repeats):
        for name in models:
            trainer = trainer_for(name, steps)
            with stopwatch() as t:
                trainer.train()
            figures[name]["samples_per_s"].append(steps * batch_size / t["s"])
    return figures


def bench_eval(folder, rows, repeats, max_length, max_new_tokens):
    """rows/s: the recipe's per-row generate vs batched greedy generation vs batched candidate scoring."""
    from qwen_cls.evaluate import generate_answers, score_candidates
    from qwen_cls.model import load_model
    from qwen_cls.tokenization import fit_prompts

    model, tokenizer = load_model(folder, device="cpu")
    _, cut_texts, _ = fit_prompts(tokenizer, [r["text"] for r in rows], [r["category"] for r in rows], max_length)
    counts = []
    runs = {
        "seed_generate": lambda rs, texts: per_row_generate(model, tokenizer, texts, [r["category"] for r in rs],
                                                            max_new_tokens=max_new_tokens, generated_counts=counts),
        # Batched greedy generation, with the seed's budget (the random model writes all of it) and with a
        # tight 8 tokens (about what a trained model writes before <|im_end|>).
        "batched_generate_seed_budget": lambda rs, texts: generate_answers(model, tokenizer, rs, max_length=max_length,
                                                                           max_new_tokens=max_new_tokens),
        "batched_generate": lambda rs, texts: generate_answers(model, tokenizer, rs, max_length=max_length),
        "project_scoring": lambda rs, texts: score_candidates(model, tokenizer, rs, max_length=max_length),
    }
    for fn in runs.values():  # warm-up on one row
        fn(rows[:1], cut_texts[:1])
    figures = {name: [] for name in runs}
    generated_tokens = []
    for r in range(repeats):
        for name, fn in runs.items():
            if name == "seed_generate" and r:  # per-row 512-token generation is slow: one round
                continue
            with stopwatch() as t:
                fn(rows, cut_texts)
            figures[name].append(len(rows) / t["s"])
            if name == "seed_generate":
                generated_tokens = counts[-len(rows):]
    return figures, {"seed_mean_generated_tokens": statistics.mean(generated_tokens)}


def tiny_ratios(train: dict, ev: dict, tok: dict) -> dict:
    """Every ratio of the tiny run as the median of its per-pair ratios, round ``r`` of both sides a pair (they
    ran in turn), with ``<ratio>_spread`` = the pairs' ``[min, max]`` (:mod:`benchmarks.paired`). Memory: the one
    exact warm-up figure per side (spread ``[r, r]``); ``eval_speedup``: the per-row 512-token generate's one
    round against scoring's round 0."""
    sps = {k: v["samples_per_s"] for k, v in train.items()}
    mem = {k: v["peak_mem_mb"] for k, v in train.items()}
    result = {}
    add_ratio(result, "train_speedup", sps["project"], sps["seed"])
    add_ratio(result, "train_peak_mem_ratio", mem["project"], mem["seed"])
    add_ratio(result, "eval_speedup", ev["project_scoring"][:len(ev["seed_generate"])], ev["seed_generate"])
    add_ratio(result, "eval_speedup_vs_batched_generate", ev["project_scoring"], ev["batched_generate"])
    add_ratio(result, "eval_speedup_vs_batched_generate_seed_budget", ev["project_scoring"],
              ev["batched_generate_seed_budget"])
    add_ratio(result, "tokenize_speedup", tok["project"], tok["seed"])
    add_ratio(result, "train_speedup_vs_fair_baseline", sps["project"], sps["fair_baseline"])
    add_ratio(result, "train_peak_mem_ratio_vs_fair_baseline", mem["project"], mem["fair_baseline"])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--tokenize-rows", type=int, default=96)
    parser.add_argument("--train-rows", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="qwen2-0.5b,qwen2.5-coder-0.5b,gemma3-270m",
                        help="real shapes to add after the tiny model, comma-separated ('' for none)")
    parser.add_argument("--shape-max-length", type=int, default=128)
    parser.add_argument("--shape-steps", type=int, default=5,
                        help="optimizer steps per variant (the first 2 measure memory, the rest are timed)")
    parser.add_argument("--shape-eval-rows", type=int, default=8)
    parser.add_argument("--shape-tokenize-rows", type=int, default=48)
    args = parser.parse_args(argv)

    from qwen_cls.model import resolve_model
    from qwen_cls.model_builds.offline import ensure_built
    from qwen_cls.tokenization import truncation_report

    started = time.perf_counter()
    ensure_built("tiny")  # into the cache, once
    folder = resolve_model("tiny")
    rows = synth_rows(max(args.tokenize_rows, args.train_rows, args.eval_rows))
    print(f"benchmark rows: {len(rows)}; tiny model {folder}", flush=True)

    tok, tokenized = bench_tokenize(folder, rows[:args.tokenize_rows], args.repeats, args.max_length)
    report = truncation_report(tokenized["project"])
    print("tokenize done", flush=True)
    train_sets = {"seed": tokenized["seed"].select(range(args.train_rows)),
                  "project": tokenized["project"].select(range(args.train_rows))}
    with tempfile.TemporaryDirectory() as workdir:
        train = bench_train(folder, train_sets, args.train_steps, args.batch_size, args.repeats, workdir)
    print("train done", flush=True)
    ev, ev_extra = bench_eval(folder, rows[:args.eval_rows], args.repeats, args.max_length, args.max_new_tokens)
    print("eval done", flush=True)

    result = tiny_ratios(train, ev, tok)
    result |= {
        "raw": {"train": train, "eval_rows_per_s": ev, "tokenize_rows_per_s": tok, **ev_extra,
                "token_lengths": {"mean_untruncated_prompt_tokens": _mean_full_tokens(folder, rows),
                                  "rows_at_cap": report["text_truncated"], "rows": report["rows"],
                                  "recipe_answer_gone": report["recipe_answer_gone"]}},
        "setup": {"model": "tiny random Qwen2 (2 layers, hidden 64, vocab 151,936), float32, CPU",
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
                  "max_length": args.max_length, "batch_size": args.batch_size, "train_steps": args.train_steps,
                  "train_rows": args.train_rows, "eval_rows": args.eval_rows, "tokenize_rows": args.tokenize_rows,
                  "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
                  "memory": "peak tensor bytes allocated during 2 warm-up steps (TensorMemory)",
                  "spread": f"[min, max] of the per-pair ratios; noisy when max - min > {NOISY_WIDTH} x the ratio",
                  "wall_s": time.perf_counter() - started},
    }
    supervised = {"seed": supervised_tokens(train_sets["seed"]["labels"]),
                  "fair_baseline": supervised_tokens(train_sets["project"]["labels"]),
                  "project": supervised_tokens(train_sets["project"]["labels"])}
    result["supervised_tokens"] = supervised
    result["shapes"] = {"tiny": {k: result[k] for key in SHAPE_KEYS for k in (key, f"{key}_spread")}}
    tiny_noisy = noisy_ratios(result["shapes"]["tiny"])
    result["shapes"]["tiny"] |= {"noisy": bool(tiny_noisy), "noisy_ratios": tiny_noisy}
    _flag_noise(result)
    result["shapes"]["tiny"]["supervised_tokens"] = supervised
    result["shapes"]["tiny"]["setup"] = {"model": result["setup"]["model"], "max_length": args.max_length,
                                         "batch_size": args.batch_size, "train_steps": args.train_steps}
    out = Path(args.out)
    _write(out, result)
    print(table(result), flush=True)
    for name in [s for s in args.shapes.split(",") if s]:
        print(f"shape {name} ({time.perf_counter() - started:.0f} s so far)", flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            result["shapes"][name] = run_shape(
                name, rows=rows, max_length=args.shape_max_length, batch_size=args.batch_size,
                steps=args.shape_steps, eval_rows=args.shape_eval_rows, tokenize_rows=args.shape_tokenize_rows,
                repeats=2, workdir=workdir, qwen_tokenize=tok)
        result["setup"]["wall_s"] = time.perf_counter() - started
        _flag_noise(result)
        _write(out, result)
    print(shapes_table(result))
    if result["noisy"]:
        print(f"WARNING: noisy run: the pairs of {', '.join(result['noisy_ratios'])} spread wider than "
              f"{NOISY_WIDTH:.0%} of the ratio (was the machine busy?); rerun on a quiet machine to trust them",
              flush=True)
    print(f"total {result['setup']['wall_s']:.0f} s; wrote {out / 'bench.json'}")
    return 0


SHAPE_KEYS = ("train_speedup", "train_peak_mem_ratio", "eval_speedup_vs_batched_generate", "tokenize_speedup",
              "train_speedup_vs_fair_baseline", "train_peak_mem_ratio_vs_fair_baseline")


def _flag_noise(result: dict) -> None:
    """``noisy`` / ``noisy_ratios`` at the top: the tiny run's wide ratios, then each real shape's."""
    names = noisy_ratios(result) + [f"shapes.{name}.{key}" for name, shape in result["shapes"].items()
                                    if name != "tiny" for key in shape["noisy_ratios"]]
    result["noisy"], result["noisy_ratios"] = bool(names), names


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".bench.json.tmp"
    tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    os.replace(tmp, out / "bench.json")


def shapes_table(result) -> str:
    """One line per shape: project / seed and project / fair baseline, and what each side trained on."""
    lines = [f"{'shape':<13}{'train x':>9}{'mem x':>8}{'vs fair x':>11}{'mem vs fair':>13}{'eval x':>9}"
             f"{'tok x':>8}   supervised tokens (rows) seed / project"]
    for name, s in result["shapes"].items():
        sup = s["supervised_tokens"]
        lines.append(f"{name:<13}{s['train_speedup']:>9.2f}{s['train_peak_mem_ratio']:>8.2f}"
                     f"{s['train_speedup_vs_fair_baseline']:>11.2f}{s['train_peak_mem_ratio_vs_fair_baseline']:>13.2f}"
                     f"{s['eval_speedup_vs_batched_generate']:>9.2f}{s['tokenize_speedup']:>8.1f}   "
                     f"{sup['seed']['tokens']} ({sup['seed']['rows']}/{sup['seed']['of_rows']}) / "
                     f"{sup['project']['tokens']} ({sup['project']['rows']}/{sup['project']['of_rows']})")
        lines.append("  pairs min-max: train x " + "-".join(f"{v:.2f}" for v in s["train_speedup_spread"])
                     + ", vs fair x " + "-".join(f"{v:.2f}" for v in s["train_speedup_vs_fair_baseline_spread"])
                     + ", eval x " + "-".join(f"{v:.2f}" for v in s["eval_speedup_vs_batched_generate_spread"])
                     + ", tok x " + "-".join(f"{v:.1f}" for v in s["tokenize_speedup_spread"])
                     + (f"; NOISY: {', '.join(s['noisy_ratios'])}" if s.get("noisy") else ""))
        if "project_layout" in s.get("setup", {}):
            lines.append(f"  project: {s['setup']['project_layout']}")
        for k, v in s.get("variants", {}).items():
            if k not in ("seed", "fair_baseline", "project"):
                low, high = v["speedup_vs_seed_spread"]
                lines.append(f"  {k}: {v['speedup_vs_seed']:.2f}x the seed's speed (pairs {low:.2f}-{high:.2f}), "
                             f"{v['peak_mem_ratio_vs_seed']:.2f}x its peak memory")
    lines.append("x = project / seed (vs fair: / the recipe with the truncation fixed, full LM head); eval: scoring "
                 "vs batched greedy generate(8); tokenize: batched fast vs per-row (Qwen: slow tokenizer)")
    lines.append("Each x is the median of per-pair ratios (the sides ran in turn: step i / pass i / round i of each "
                 "a pair); min-max: the pairs' spread")
    return "\n".join(lines)


def _mean_full_tokens(folder, rows):
    from qwen_cls.model import load_tokenizer

    tok = load_tokenizer(folder)
    return statistics.mean(len(ids) for ids in tok([r["text"] for r in rows], add_special_tokens=False)["input_ids"])


def _spread(result: dict, key: str) -> str:
    low, high = result[f"{key}_spread"]
    return f"{low:>9.2f}-{high:.2f}" + (" noisy" if key in result.get("noisy_ratios", []) else "")


def table(result) -> str:
    raw, med = result["raw"], statistics.median
    tr, ev, tk = raw["train"], raw["eval_rows_per_s"], raw["tokenize_rows_per_s"]
    s = result["setup"]
    lines = [
        f"{'measure':<38}{'seed recipe':>14}{'project':>14}{'project/seed':>14}{'pairs min-max':>16}",
        f"{'train samples/s':<38}{med(tr['seed']['samples_per_s']):>14.2f}"
        f"{med(tr['project']['samples_per_s']):>14.2f}"
        f"{result['train_speedup']:>13.1f}x{_spread(result, 'train_speedup')}",
        f"{'train peak memory (MiB)':<38}{med(tr['seed']['peak_mem_mb']):>14.0f}"
        f"{med(tr['project']['peak_mem_mb']):>14.0f}"
        f"{result['train_peak_mem_ratio']:>13.2f}x{_spread(result, 'train_peak_mem_ratio')}",
        f"{'eval rows/s (vs per-row generate)':<38}{med(ev['seed_generate']):>14.2f}{med(ev['project_scoring']):>14.2f}"
        f"{result['eval_speedup']:>13.1f}x{_spread(result, 'eval_speedup')}",
        f"{'eval rows/s (vs batched greedy, ' + str(s['max_new_tokens']) + ')':<38}"
        f"{med(ev['batched_generate_seed_budget']):>14.2f}{med(ev['project_scoring']):>14.2f}"
        f"{result['eval_speedup_vs_batched_generate_seed_budget']:>13.1f}x"
        f"{_spread(result, 'eval_speedup_vs_batched_generate_seed_budget')}",
        f"{'eval rows/s (vs batched greedy, 8)':<38}{med(ev['batched_generate']):>14.2f}"
        f"{med(ev['project_scoring']):>14.2f}"
        f"{result['eval_speedup_vs_batched_generate']:>13.1f}x{_spread(result, 'eval_speedup_vs_batched_generate')}",
        f"{'tokenize rows/s':<38}{med(tk['seed']):>14.1f}{med(tk['project']):>14.1f}"
        f"{result['tokenize_speedup']:>13.1f}x{_spread(result, 'tokenize_speedup')}",
        "",
        f"How: {s['model']}; {s['machine']}. One process, same rows and model, seed and project in turn after",
        f"one warm-up each; sides: median of {s['repeats']} repeats; ratio: median of the per-round ratios (pairs),",
        "min-max: their spread (the 512-token per-row generate: 1 round, 1 pair).",
        f"Rows: synthetic mix, mean {raw['token_lengths']['mean_untruncated_prompt_tokens']:.0f} text tokens; "
        f"{raw['token_lengths']['rows_at_cap']}/{raw['token_lengths']['rows']} reach the cap "
        f"(MAX_LENGTH {s['max_length']}).",
        f"Train: Trainer.train() for {s['train_steps']} steps of batch {s['batch_size']}, gradient checkpointing "
        "both; peak memory = tensor bytes alive at once in the 2-step warm-up (TensorMemory, as a GPU's",
        "max_memory_allocated counts).",
        f"Eval: {s['eval_rows']} rows, same shortened prompts for all; the random model never stops, so the seed "
        f"generates {raw['seed_mean_generated_tokens']:.0f} tokens/row (a trained one would stop after ~3).",
        "Batched greedy: 8 rows a batch, once with the seed's budget of new tokens, once with 8 (about what a",
        "trained model writes): scoring and short generation both pay one prompt pass, so they cost about the same.",
        "The tiny model has random weights and learns nothing: these are speed and memory figures only.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
