"""Seed recipe vs project at the real shapes: Qwen2-0.5B (random weights), Qwen2.5-Coder-0.5B (real weights of the
same Qwen2-0.5B architecture) and Gemma 3 270M (real weights).

Used by ``benchmarks/cpu.py`` (``make bench``). The tiny model's body is so small that its 151,936-way LM
head is nearly all of its compute, which flatters the answer-only head; these runs give the ratios at the
shapes a user will train. On 2 CPU cores a step of Qwen2-0.5B takes seconds, so the runs are short: rows
of ``max_length`` 128, batch 4, 5 optimizer steps per variant. The first 2 steps measure peak memory
(:class:`qwen_cls.measure.TensorMemory`: tensor bytes, as ``torch.cuda.max_memory_allocated`` counts on a
GPU; it slows them), the other steps are timed. The variants take their steps in turn (step 1 of each, then
step 2 of each, ...: :class:`benchmarks.paired.Turnstile`), and every ratio is the median of per-step-pair
ratios with its spread (:func:`shape_ratios`), so a busy spell on the machine cannot fall on one side only.

Training variants (each its own fresh LoRA copy of the same frozen base weights, float32, 4 rows per optimizer
step):

* ``seed``: the blog's recipe (per-row tail-cut rows, ``enable_input_require_grads`` + ``get_peft_model``,
  ``Trainer`` + ``DataCollatorForSeq2Seq``, gradient checkpointing, full logits, the model's own loss);
* ``fair_baseline``: the same recipe on the project's rows (truncation fixed: every row keeps its answer),
  still with full-vocabulary logits at every position;
* ``project``: :class:`qwen_cls.train.AnswerOnlyTrainer` (LM head at answer positions only),
  :func:`qwen_cls.train.training_arguments` (length-grouped batches). Gemma 3 270M and Qwen2.5-Coder-0.5B:
  their profile's layout (4 rows per forward, no checkpointing). Qwen2-0.5B: the project's CPU layout
  (README): the head frees the
  logits' memory, which pays for dropping the recompute; one row per forward, accumulated to the 4 rows
  (the same optimizer step: the loss is normalised over all answer tokens of the 4 rows), keeps the
  activations of the other rows out of memory;
* extras at the Qwen2-0.5B shape: ``project_recipe_layout`` (the recipe's 4 rows per forward with
  checkpointing: what the head alone gives) and ``project_no_ckpt`` (4 rows per forward, no checkpointing:
  faster still, but twice the seed's memory).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks.paired import add_ratio, noisy_ratios
from qwen_cls.blog_recipe import SlowQwen2Tokenizer, seed_lora_model, seed_trainer
from qwen_cls.hub import QWEN_CODER
from qwen_cls.measure import TensorMemory, stopwatch

IGNORE_INDEX = -100
QWEN2_05B_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1000000.0, bos_token_id=151643,
                       eos_token_id=151645, pad_token_id=151643)


def supervised_tokens(labels_rows) -> dict:
    """What a causal-LM loss trains on: ``tokens`` = label positions that are not ignored after the one-step
    shift (``labels[1:] != -100``: the first label is never a target), ``rows`` = rows with at least one."""
    per_row = [sum(1 for x in labels[1:] if x != IGNORE_INDEX) for labels in labels_rows]
    return {"tokens": sum(per_row), "rows": sum(1 for n in per_row if n), "of_rows": len(per_row)}


def family_process_func(tokenizer, max_length: int):
    """The recipe's per-row process function for any chat family: the blog writes Qwen's ChatML by hand; here
    the same system + user messages are rendered by the tokenizer's chat template (Gemma: its turns, BOS
    included), then, as in the recipe, the answer, ``pad_token_id`` and the tail cut ``[:max_length]``."""
    from qwen_cls.prompt import render_prompt

    def process_func(example):
        prompt = render_prompt(tokenizer, example["text"], example["category"])
        instruction = tokenizer(prompt, add_special_tokens=False)
        response = tokenizer(f"{example['output']}", add_special_tokens=False)
        input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
        attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
        labels = [IGNORE_INDEX] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
        return {"input_ids": input_ids[:max_length], "attention_mask": attention_mask[:max_length],
                "labels": labels[:max_length]}

    return process_func


def seed_tokenize_family(dataset, tokenizer, max_length: int, *, qwen: bool):
    """``dataset.map(process_func)`` per row: the blog's own function for Qwen (hand-written ChatML, which the
    tokenizer may be :class:`SlowQwen2Tokenizer`), :func:`family_process_func` for another family."""
    from qwen_cls.blog_recipe import seed_tokenize

    if qwen:
        return seed_tokenize(dataset, tokenizer, max_length)
    return dataset.map(family_process_func(tokenizer, max_length), remove_columns=dataset.column_names)


def step_timer(track_steps: int = 0, turnstile=None, name: str | None = None):
    """A Trainer callback whose ``seconds`` holds the wall time of each optimizer step (forward, backward,
    optimizer step); with ``track_steps``, the first that many steps run under :class:`TensorMemory`
    (``memory.peak_bytes``), which slows them: time only the steps after them. With a
    :class:`benchmarks.paired.Turnstile`, the trainer hands the turn to the next one (``name`` is this one's)
    at the end of each step, after the clock has stopped, and waits for its turn again before going on."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self._t, self.memory = [], 0.0, TensorMemory()

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0 and track_steps:
                self.memory.__enter__()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._t)
            if state.global_step == track_steps and track_steps:
                self.memory.__exit__(None, None, None)
            if turnstile is not None:
                turnstile.pass_on(name)
                turnstile.wait(name)

    return StepTimes()


def _dataset(rows):
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    return Dataset.from_list(rows)


def lora_copy_base(base):
    """A copy of ``base`` whose modules are its own (LoRA wraps them) but whose weights are ``base``'s own
    tensors: every variant freezes them, so several variants can be alive at once for the memory of one."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def make_trainer(variant: dict, base, tokenizer, train_sets: dict, steps: int, batch_size: int, workdir: str):
    """A ``Trainer`` for one variant on a fresh LoRA copy of ``base`` (which is left untouched; its frozen
    weights are shared, not copied: :func:`lora_copy_base`)."""
    from transformers import TrainingArguments

    from qwen_cls.train import (
        AnswerOnlyTrainer,
        model_inputs,
        padding_collator,
        prepare_lora_model,
        recipe_lora_config,
        training_arguments,
    )

    micro = variant.get("micro_batch", batch_size)  # rows per forward; accumulated up to batch_size per step
    common = dict(per_device_train_batch_size=micro, gradient_accumulation_steps=batch_size // micro,
                  max_steps=steps, learning_rate=1e-4, save_strategy="no",
                  report_to="none", logging_steps=10_000, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                  use_cpu=not torch.cuda.is_available())
    model = lora_copy_base(base)
    if variant["kind"] == "seed":  # the recipe: checkpointing through TrainingArguments, full logits, own loss
        model = seed_lora_model(model)
        args = TrainingArguments(output_dir=workdir, gradient_checkpointing=True, **common)
        return seed_trainer(model, tokenizer, model_inputs(train_sets[variant["rows"]]), args)
    model = prepare_lora_model(model, recipe_lora_config(), gradient_checkpointing=variant["ckpt"])
    args = training_arguments(workdir, **common)
    return AnswerOnlyTrainer(model=model, args=args, train_dataset=model_inputs(train_sets[variant["rows"]]),
                             data_collator=padding_collator(tokenizer))


def bench_train_variants(variants: dict, base, tokenizer, train_sets: dict, steps: int, batch_size: int,
                         workdir: str, track_steps: int = 2) -> dict:
    """Per variant: one ``train()`` of ``steps`` optimizer steps of ``batch_size`` rows, the variants taking
    their steps in turn (A B C A B C ...: :class:`benchmarks.paired.Turnstile`, each ``train()`` in its own
    thread, one running at a time), so step ``i`` of every variant falls in the same minute. Peak memory: the
    tensor bytes allocated and alive at once during the first ``track_steps`` steps (:class:`TensorMemory`, the
    CPU counterpart of ``torch.cuda.max_memory_allocated``); ``step_s``: every step's seconds, of which the
    ones after ``track_steps`` are timed; samples/s from their median."""
    from benchmarks.paired import Turnstile

    trainers = {name: make_trainer(variant, base, tokenizer, train_sets, steps, batch_size, workdir)
                for name, variant in variants.items()}
    turnstile = Turnstile(variants)
    timers = {}
    for name, trainer in trainers.items():
        timers[name] = step_timer(track_steps, turnstile, name)
        trainer.add_callback(timers[name])
    turnstile.run({name: trainer.train for name, trainer in trainers.items()})
    figures = {}
    for name, variant in variants.items():
        timer = timers[name]
        timed = timer.seconds[track_steps:] or timer.seconds
        figures[name] = {"samples_per_s": batch_size / statistics.median(timed), "step_s": timer.seconds,
                         "timed_steps": len(timed), "peak_mem_mb": timer.memory.peak_bytes / 2**20,
                         **{k: v for k, v in variant.items() if k != "rows"}, "rows": variant["rows"]}
        print(f"  train {name}: {figures[name]['samples_per_s']:.3f} samples/s, "
              f"{figures[name]['peak_mem_mb']:.0f} MiB", flush=True)
    del trainers
    return figures


def timed_steps(figures: dict, track_steps: int) -> list[float]:
    """A variant's timed step seconds (those after the memory-measuring steps; all when there are no others)."""
    return figures["step_s"][track_steps:] or figures["step_s"]


def bench_tokenize_shape(folder_or_tok, rows, max_length, repeats: int, *, qwen: bool) -> dict:
    """rows/s, seed (per-row ``map``; Qwen: the slow tokenizer) vs project (batched fast tokenizer)."""
    from qwen_cls.model import load_tokenizer
    from qwen_cls.tokenization import tokenize_dataset

    times = {"seed": [], "project": []}
    for r in range(repeats + 1):
        for name in ("seed", "project"):
            ds = _dataset(rows)
            tok = SlowQwen2Tokenizer(folder_or_tok) if (name == "seed" and qwen) else load_tokenizer(folder_or_tok)
            if not qwen and tok.chat_template is None:
                from qwen_cls.prompt import chat_family

                tok.chat_template = chat_family(tok).chat_template
            with stopwatch() as t:
                if name == "seed":
                    seed_tokenize_family(ds, tok, max_length, qwen=qwen)
                else:
                    tokenize_dataset(ds, tok, max_length)
            if r:
                times[name].append(len(rows) / t["s"])
    return times


def bench_eval_shape(model, tokenizer, rows, max_length, batch_size: int = 8, repeats: int = 2) -> dict:
    """rows/s of batched greedy generation (8 new tokens: about what a trained model writes) vs the project's
    batched candidate scoring, same rows and model; one warm-up row each, then ``repeats`` timed passes of
    each, in turn (generate, score, generate, score ...): lists of rows/s, pass ``i`` of both a pair."""
    from qwen_cls.evaluate import generate_answers, score_candidates

    model.eval()
    runs = {"batched_generate": lambda rs: generate_answers(model, tokenizer, rs, max_length=max_length,
                                                            batch_size=batch_size),
            "project_scoring": lambda rs: score_candidates(model, tokenizer, rs, max_length=max_length,
                                                           batch_size=batch_size)}
    for fn in runs.values():
        fn(rows[:1])
    out = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            with stopwatch() as t:
                fn(rows)
            out[name].append(len(rows) / t["s"])
    return out


def shape_ratios(train: dict, ev: dict, tok: dict, batch_size: int, track_steps: int) -> dict:
    """Every ratio of a shape as the median of its per-pair ratios, with ``<ratio>_spread`` = their
    ``[min, max]`` (:mod:`benchmarks.paired`): training, timed step ``i`` of both variants (they ran in turn);
    memory, the one exact figure per variant (spread ``[r, r]``); eval and tokenize, pass ``i`` of both sides.
    Then ``noisy`` / ``noisy_ratios`` (the wide ones) and ``variants`` (each variant against the seed)."""
    step_rate = {k: [batch_size / s for s in timed_steps(v, track_steps)] for k, v in train.items()}
    mem = {k: [v["peak_mem_mb"]] for k, v in train.items()}
    result = {}
    add_ratio(result, "train_speedup", step_rate["project"], step_rate["seed"])
    add_ratio(result, "train_peak_mem_ratio", mem["project"], mem["seed"])
    add_ratio(result, "eval_speedup_vs_batched_generate", ev["project_scoring"], ev["batched_generate"])
    add_ratio(result, "tokenize_speedup", tok["project"], tok["seed"])
    add_ratio(result, "train_speedup_vs_fair_baseline", step_rate["project"], step_rate["fair_baseline"])
    add_ratio(result, "train_peak_mem_ratio_vs_fair_baseline", mem["project"], mem["fair_baseline"])
    variants = {}
    for k in train:
        variants[k] = {}
        add_ratio(variants[k], "speedup_vs_seed", step_rate[k], step_rate["seed"])
        add_ratio(variants[k], "peak_mem_ratio_vs_seed", mem[k], mem["seed"])
    noisy = noisy_ratios(result) + [n for k, v in variants.items() for n in noisy_ratios(v, f"variants.{k}.")]
    return result | {"noisy": bool(noisy), "noisy_ratios": noisy, "variants": variants}


def run_shape(name: str, *, rows, max_length: int, batch_size: int, steps: int, eval_rows: int,
              tokenize_rows: int, repeats: int, workdir: str, qwen_tokenize: dict | None = None) -> dict:
    """All figures for one shape (``qwen2-0.5b``, ``qwen2.5-coder-0.5b`` or ``gemma3-270m``); see the module docstring.

    ``qwen_tokenize``: rows/s already measured with the Qwen tokenizer (the tiny run's: the same tokenizer,
    code and rows; tokenizing never touches the model), reused for ``qwen2-0.5b`` instead of measuring again."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from qwen_cls.model import load_tokenizer, resolve_model
    from qwen_cls.model_builds.offline import ensure_built
    from qwen_cls.model_builds.tiny import qwen_tokenizer_dir
    from qwen_cls.profiles import PROFILES
    from qwen_cls.prompt import QWEN2_CHAT_TEMPLATE, chat_family
    from qwen_cls.tokenization import tokenize_dataset, truncation_report

    started = time.perf_counter()
    qwen = name in ("qwen2-0.5b", QWEN_CODER)  # the Qwen2 family: ChatML, the blog's slow tokenizer as the seed's
    random_shape = name == "qwen2-0.5b"
    if random_shape:
        folder = qwen_tokenizer_dir()
        tokenizer = load_tokenizer(folder)
        tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
        torch.manual_seed(0)
        base = Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B_SHAPE)).to(torch.float32)
        model_note = "Qwen2-0.5B shape (Qwen2Config of Qwen2-0.5B), random weights, real tokenizer, float32"
    else:
        ensure_built(name)  # an offline model: into the cache, once
        folder = resolve_model(name)
        tokenizer = load_tokenizer(folder)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = chat_family(tokenizer).chat_template
        base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
        model_note = ("Qwen2.5-Coder-0.5B-Instruct (the Qwen2-0.5B architecture)" if qwen else "Gemma 3 270M") + \
            ", real weights (dequantized GGUF), real tokenizer, float32"
    ckpt = bool(PROFILES[name]["gradient_checkpointing"])

    if qwen and qwen_tokenize is not None:
        tok, tokenize_note = qwen_tokenize, "the tiny run's figures: same Qwen tokenizer, code and rows"
    else:
        tok = bench_tokenize_shape(folder, rows[:tokenize_rows], max_length, repeats, qwen=qwen)
        tokenize_note = f"{tokenize_rows} rows, MAX_LENGTH {max_length}, median of {repeats}"
        print(f"  tokenize done ({time.perf_counter() - started:.0f} s)", flush=True)
    ds = _dataset(rows)
    seed_rows = seed_tokenize_family(ds, tokenizer, max_length, qwen=qwen)
    project_rows = tokenize_dataset(ds, tokenizer, max_length)
    report = truncation_report(project_rows)
    n_train = steps * batch_size
    train_sets = {"seed": seed_rows.select(range(n_train)), "project": project_rows.select(range(n_train))}
    supervised = {"seed": supervised_tokens(train_sets["seed"]["labels"]),
                  "project": supervised_tokens(train_sets["project"]["labels"])}
    recipe_layout = {"kind": "project", "rows": "project", "ckpt": ckpt}  # the profile's checkpointing
    # Qwen2-0.5B: the project on a CPU (README): one row per forward, accumulated to the batch, no recompute
    cpu_layout = {"kind": "project", "rows": "project", "ckpt": False, "micro_batch": 1}
    variants = {"seed": {"kind": "seed", "rows": "seed"},
                "fair_baseline": {"kind": "seed", "rows": "project"},
                "project": cpu_layout if random_shape else recipe_layout}
    if random_shape:
        variants["project_recipe_layout"] = recipe_layout
        variants["project_no_ckpt"] = {"kind": "project", "rows": "project", "ckpt": False}
    track_steps = 2  # steps that measure memory (slowed by it); the rest are timed
    train = bench_train_variants(variants, base, tokenizer, train_sets, steps, batch_size, workdir, track_steps)
    micro = variants["project"].get("micro_batch", batch_size)
    print(f"  train done ({time.perf_counter() - started:.0f} s)", flush=True)
    attention = getattr(base.config, "_attn_implementation", None)
    ev = bench_eval_shape(base, tokenizer, rows[:eval_rows], max_length, repeats=repeats)
    print(f"  eval done ({time.perf_counter() - started:.0f} s)", flush=True)
    del base

    result = shape_ratios(train, ev, tok, batch_size, track_steps)
    result |= {
        "supervised_tokens": {"seed": supervised["seed"], "fair_baseline": supervised["project"],
                              "project": supervised["project"]},
        "raw": {"train": train, "eval_rows_per_s": ev, "tokenize_rows_per_s": tok, "truncation": report},
        "setup": {"model": model_note, "attention": attention, "max_length": max_length,
                  "batch_size": batch_size, "train_steps": steps, "timed_steps": train["project"]["timed_steps"],
                  "eval_rows": eval_rows, "eval_repeats": repeats, "tokenize": tokenize_note,
                  "project_layout": (f"{micro} row(s) per forward x {batch_size // micro} accumulated, "
                                     f"gradient checkpointing {variants['project']['ckpt']}"),
                  "memory": (f"peak tensor bytes allocated during the first {track_steps} optimizer steps "
                             "(TensorMemory)"),
                  "seed_tokenizer": ("SlowQwen2Tokenizer (pure-Python BPE), per row" if qwen else
                                     "fast tokenizer per row (no slow Gemma tokenizer in transformers 5): the "
                                     "ratio is the batching and clipping gain only"),
                  "seed_prompt": ("the blog's hand-written ChatML" if qwen else
                                  "the blog's system + user messages through Gemma's chat template, answer, "
                                  "pad_token_id, cut [:max_length]"),
                  "wall_s": time.perf_counter() - started},
    }
    return result

