"""The benchmarks' pure helpers: what a row trains on, and the list-of-rows stand-in for ``datasets``."""

from __future__ import annotations

import pytest
import torch
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


# --- ratios a busy machine cannot flip: sides in turn, median of per-pair ratios, spread, noisy flag -----------

def test_paired_ratio_is_the_median_of_per_pair_ratios_with_min_and_max():
    from benchmarks.paired import add_ratio, is_noisy, noisy_ratios, paired_ratio

    # round 2 caught a busy spell on the project's side only: its pair moves the spread, not the median
    assert paired_ratio([3.0, 4.0, 1.0], [1.0, 2.0, 1.0]) == (2.0, [1.0, 3.0])
    result = {}
    assert add_ratio(result, "speedup", [6.0, 6.6], [3.0, 3.0]) == pytest.approx(2.1)
    assert result["speedup_spread"] == pytest.approx([2.0, 2.2])
    assert not is_noisy(2.1, [2.0, 2.2]) and is_noisy(2.0, [1.0, 3.0]) and not is_noisy(2.0, [1.8, 2.3])
    add_ratio(result, "wide", [3.0, 4.0, 1.0], [1.0, 2.0, 1.0])
    add_ratio(result, "memory", [53.0], [100.0])
    assert result["memory"] == 0.53 and result["memory_spread"] == [0.53, 0.53]
    assert noisy_ratios(result) == ["wide"] and noisy_ratios(result, "shapes.x.") == ["shapes.x.wide"]
    with pytest.raises(ValueError, match="need pairs: 2 numerators, 1 denominators"):
        paired_ratio([1.0, 2.0], [1.0])


def test_shape_ratios_from_known_step_times():
    """Step seconds as a step timer records them (the first 2 steps measure memory): per-pair medians by hand."""
    from benchmarks.shapes import shape_ratios

    train = {"seed": {"step_s": [50, 50, 10, 12, 30], "peak_mem_mb": 100.0},
             "fair_baseline": {"step_s": [60, 60, 8, 9.6, 16], "peak_mem_mb": 90.0},
             "project": {"step_s": [40, 40, 5, 6, 10], "peak_mem_mb": 53.0}}
    ev = {"project_scoring": [8.0, 6.0], "batched_generate": [4.0, 4.0]}
    tok = {"project": [300.0, 330.0], "seed": [10.0, 11.0]}
    r = shape_ratios(train, ev, tok, batch_size=4, track_steps=2)
    # speedup pairs = seed step / project step: 10/5, 12/6, 30/10
    assert r["train_speedup"] == pytest.approx(2.0) and r["train_speedup_spread"] == pytest.approx([2.0, 3.0])
    assert r["train_speedup_vs_fair_baseline"] == pytest.approx(1.6)  # 8/5, 9.6/6, 16/10
    assert r["train_speedup_vs_fair_baseline_spread"] == pytest.approx([1.6, 1.6])
    assert r["train_peak_mem_ratio"] == pytest.approx(0.53) and r["train_peak_mem_ratio_spread"] == pytest.approx(
        [0.53, 0.53])
    assert r["train_peak_mem_ratio_vs_fair_baseline"] == pytest.approx(53 / 90)
    assert r["eval_speedup_vs_batched_generate"] == pytest.approx(1.75)  # 8/4, 6/4
    assert r["eval_speedup_vs_batched_generate_spread"] == pytest.approx([1.5, 2.0])
    assert r["tokenize_speedup"] == pytest.approx(30.0) and r["tokenize_speedup_spread"] == pytest.approx([30, 30])
    ratio_keys = [k for k in r if k.endswith(("_speedup", "_ratio", "_baseline", "_generate"))]
    assert len(ratio_keys) == 6 and all(f"{k}_spread" in r for k in ratio_keys)  # every ratio has its spread
    assert r["variants"]["fair_baseline"]["speedup_vs_seed"] == pytest.approx(1.25)  # 10/8, 12/9.6, 30/16
    assert r["variants"]["fair_baseline"]["speedup_vs_seed_spread"] == pytest.approx([1.25, 1.875])
    assert r["variants"]["seed"]["speedup_vs_seed_spread"] == [1.0, 1.0]
    # wide: (3 - 2) > 0.25 x 2; (2 - 1.5) > 0.25 x 1.75; (1.875 - 1.25) > 0.25 x 1.25
    assert r["noisy"] is True
    assert r["noisy_ratios"] == ["train_speedup", "eval_speedup_vs_batched_generate",
                                 "variants.fair_baseline.speedup_vs_seed", "variants.project.speedup_vs_seed"]


def test_tiny_ratios_pair_round_r_of_both_sides():
    from benchmarks.cpu import tiny_ratios

    train = {"seed": {"samples_per_s": [1.0, 2.0, 1.0], "peak_mem_mb": [200.0]},
             "fair_baseline": {"samples_per_s": [1.5, 2.0, 1.2], "peak_mem_mb": [150.0]},
             "project": {"samples_per_s": [3.0, 4.0, 2.0], "peak_mem_mb": [50.0]}}
    ev = {"seed_generate": [0.5], "project_scoring": [10.0, 12.0, 11.0], "batched_generate": [5.0, 5.0, 5.5],
          "batched_generate_seed_budget": [1.0, 2.0, 1.0]}
    tok = {"seed": [10.0, 10.0, 20.0], "project": [1000.0, 900.0, 1000.0]}
    r = tiny_ratios(train, ev, tok)
    # medians of the sides would give 3.0 / 1.0 = 3.0; the pairs 3, 2, 2 give 2
    assert (r["train_speedup"], r["train_speedup_spread"]) == (2.0, [2.0, 3.0])
    assert (r["train_peak_mem_ratio"], r["train_peak_mem_ratio_spread"]) == (0.25, [0.25, 0.25])
    assert (r["eval_speedup"], r["eval_speedup_spread"]) == (20.0, [20.0, 20.0])  # one round: 10 / 0.5
    assert (r["eval_speedup_vs_batched_generate"], r["eval_speedup_vs_batched_generate_spread"]) == (2.0, [2.0, 2.4])
    assert r["eval_speedup_vs_batched_generate_seed_budget"] == 10.0  # 10, 6, 11
    assert r["eval_speedup_vs_batched_generate_seed_budget_spread"] == [6.0, 11.0]
    assert (r["tokenize_speedup"], r["tokenize_speedup_spread"]) == (90.0, [50.0, 100.0])
    assert r["train_speedup_vs_fair_baseline"] == 2.0 and r["train_speedup_vs_fair_baseline_spread"] == [
        pytest.approx(5 / 3), 2.0]
    assert r["train_peak_mem_ratio_vs_fair_baseline"] == pytest.approx(1 / 3)
    assert len(r) == 16  # 8 ratios, 8 spreads


@pytest.mark.slow
def test_turnstile_alternates_steps_and_each_trainer_trains_as_alone(tiny_dir, tmp_path):
    """Two trainers in turn (seed recipe, project CPU layout): steps A B A B ..., and the same LoRA weights,
    losses and peak memory as the same two trainers run one after the other."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from benchmarks.paired import Turnstile
    from benchmarks.shapes import make_trainer, step_timer

    tokenizer = load_tokenizer(tiny_dir)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    rows = tokenize_dataset(Dataset.from_list(ROWS * 4), tokenizer, 64)
    seed_rows = seed_tokenize_family(Dataset.from_list(ROWS * 4), tokenizer, 64, qwen=True)
    variants = {"seed": {"kind": "seed", "rows": "seed"},
                "project": {"kind": "project", "rows": "project", "ckpt": False, "micro_batch": 1}}
    sets = {"seed": seed_rows, "project": rows}

    def build(name):
        torch.manual_seed(0)  # the same LoRA initialisation in both runs
        return make_trainer(variants[name], base, tokenizer, sets, 3, 4, str(tmp_path / name))

    order = []

    class Record(TrainerCallback):
        def __init__(self, name):
            self.name = name

        def on_step_begin(self, args, state, control, **kwargs):
            order.append((self.name, state.global_step))

    turnstile = Turnstile(variants)
    alternated, timers = {}, {}
    for name in variants:
        alternated[name] = build(name)
        timers[name] = step_timer(2, turnstile, name)
        alternated[name].add_callback(timers[name])
        alternated[name].add_callback(Record(name))
    turnstile.run({name: trainer.train for name, trainer in alternated.items()})
    assert order == [("seed", 0), ("project", 0), ("seed", 1), ("project", 1), ("seed", 2), ("project", 2)]
    assert turnstile.turn is None and all(len(t.seconds) == 3 for t in timers.values())

    for name in variants:
        alone = build(name)
        timer = step_timer(2)
        alone.add_callback(timer)
        alone.train()
        ours = {k: v for k, v in alternated[name].model.named_parameters() if "lora" in k}
        theirs = {k: v for k, v in alone.model.named_parameters() if "lora" in k}
        assert ours.keys() == theirs.keys() and len(ours) > 0, name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        losses = [[e["train_loss"] for e in t.state.log_history if "train_loss" in e]
                  for t in (alternated[name], alone)]
        assert losses[0] == losses[1] and len(losses[0]) == 1, name
        assert timers[name].memory.peak_bytes == timer.memory.peak_bytes > 0, name
    assert not hasattr(base, "peft_config")  # every variant trained a copy


def test_turnstile_hands_on_after_a_failure_and_reraises_it():
    from benchmarks.paired import Turnstile

    turnstile, ran = Turnstile(["a", "b", "c"]), []

    def job(name, fail=False):
        def run():
            for step in range(2):
                ran.append((name, step))
                if fail:
                    raise RuntimeError(f"{name} failed")
                turnstile.pass_on(name)
                turnstile.wait(name)
        return run

    with pytest.raises(RuntimeError, match="b failed"):
        turnstile.run({"a": job("a"), "b": job("b", fail=True), "c": job("c")})
    assert ran == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1)]


def test_noisy_flag_names_the_tiny_runs_and_each_shapes_wide_ratios():
    from benchmarks.cpu import _flag_noise

    result = {"train_speedup": 2.0, "train_speedup_spread": [1.9, 2.1],  # quiet: 0.2 <= 0.25 x 2
              "tokenize_speedup": 90.0, "tokenize_speedup_spread": [50.0, 100.0],  # wide
              "shapes": {"tiny": {"noisy": True, "noisy_ratios": ["tokenize_speedup"]},  # counted at the top
                         "qwen2-0.5b": {"noisy": True, "noisy_ratios": ["train_speedup",
                                                                        "variants.project.speedup_vs_seed"]},
                         "gemma3-270m": {"noisy": False, "noisy_ratios": []}}}
    _flag_noise(result)
    assert result["noisy"] is True
    assert result["noisy_ratios"] == ["tokenize_speedup", "shapes.qwen2-0.5b.train_speedup",
                                      "shapes.qwen2-0.5b.variants.project.speedup_vs_seed"]
    quiet = {"train_speedup": 2.0, "train_speedup_spread": [1.9, 2.1], "shapes": {"tiny": {"noisy_ratios": []}}}
    _flag_noise(quiet)
    assert (quiet["noisy"], quiet["noisy_ratios"]) == (False, [])
