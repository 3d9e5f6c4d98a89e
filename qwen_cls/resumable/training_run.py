"""``qwen-cls train``: the one training entry point, for one process, a resumed run, or many processes.

The same command resumes an interrupted run (even one killed with ``kill -9``) from its last *complete and
loadable* checkpoint (a damaged newer one is moved to ``damaged-checkpoints/`` with a warning naming the
file), and runs unchanged under ``torchrun`` / ``accelerate launch`` (DDP; DeepSpeed ZeRO-2 with
``--deepspeed configs/deepspeed_zero2.json``).
Checkpoints are atomic and rotated (``qwen_cls.resumable.checkpointing``) and record the settings they were trained with
(the training file's SHA-256 among them): resuming with other data or hyperparameters is refused, naming what
differs, unless ``--resume-anyway``; ``--no-resume`` starts over. Options are checked before anything loads.

Run dir: ``checkpoints/checkpoint-N``, ``adapter/``, ``run_config.json``, ``train_log.json`` (written by
rank 0 only) and ``ranks/rank{N}.json`` (every rank: batches and rows it trained on). Rank 0 holds the run dir's
lock while it trains, so a second ``train`` (or ``run``) into the same ``--out`` exits 2 at once.

Launched processes run ``python -m qwen_cls train ...`` (``torchrun ... -m qwen_cls train``), the same entry
point as the console script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

from ..chain.locks import hold_lock
from ..hub import TINY
from ..recipe import RECIPE
from ..run_record import ADAPTER


def remove_checkpoints(run_dir: str | os.PathLike) -> int:
    """Delete every checkpoint of a run dir (``--no-resume``: an earlier run's checkpoints would otherwise mix
    with the new run's, in rotation and on the next resume); return how many there were."""
    from .checkpointing import CHECKPOINT_RE, CHECKPOINTS, STAGING

    folder = Path(run_dir) / CHECKPOINTS
    count = 0
    if folder.is_dir():
        for path in folder.iterdir():
            if CHECKPOINT_RE.match(path.name) or path.name == STAGING:
                shutil.rmtree(path, ignore_errors=True)
                count += path.name != STAGING
    return count


def tokenized_rows(rows, tokenizer, max_length: int):
    """Validated raw rows -> tokenized ``datasets.Dataset`` holding the model's columns only."""
    from datasets import Dataset

    from ..tokenization import tokenize_dataset
    from ..train import model_inputs

    raw = Dataset.from_list([{"text": r.text, "category": r.category, "output": r.output} for r in rows])
    return model_inputs(tokenize_dataset(raw, tokenizer, max_length))


def check_train_options(*, out, max_length: int, epochs: float, max_steps: int, batch_size: int, grad_accum: int,
                        learning_rate: float, seed: int, save_steps: int, save_total_limit: int,
                        logging_steps: int, limit: int, deepspeed: str | None = None,
                        step_sleep: float = 0.0) -> None:
    """``ValueError`` naming the option when a value is out of range (before anything loads or is created)."""
    from ..files import check_folder_path
    from ..profiles import MIN_MAX_LENGTH, Param

    rules = {
        "--max-length": (max_length, Param("int", low=MIN_MAX_LENGTH, note="tokens per row; the prompt alone "
                                                                          "takes about 50")),
        "--epochs": (epochs, Param("number", low=0, low_open=True)),
        "--batch-size": (batch_size, Param("int", low=1)),
        "--grad-accum": (grad_accum, Param("int", low=1)),
        "--lr": (learning_rate, Param("number", low=0, high=1, low_open=True)),
        "--seed": (seed, Param("int", low=0, high=2**32 - 1)),
        "--save-steps": (save_steps, Param("int", low=1, note="optimizer steps between checkpoints")),
        "--save-total-limit": (save_total_limit, Param("int", low=1, note="checkpoints kept")),
        "--logging-steps": (logging_steps, Param("int", low=1)),
        "--limit": (limit, Param("int", low=0, note="0: all rows")),
        "--step-sleep": (step_sleep, Param("number", low=0)),
    }
    for option, (value, rule) in rules.items():
        if not rule.accepts(value):
            raise ValueError(f"{option} must be {rule.describe()}, got {value!r}")
    if max_steps != -1 and not Param("int", low=1).accepts(max_steps):
        raise ValueError(f"--max-steps must be an integer >= 1, or -1 to train --epochs epochs; got {max_steps!r}")
    if deepspeed is not None and not Path(deepspeed).is_file():
        raise FileNotFoundError(f"--deepspeed {deepspeed}: no such file (e.g. configs/deepspeed_zero2.json)")
    check_folder_path(Path(out), "--out")




class ResumeMismatch(ValueError):
    """The checkpoint to resume was trained with other data or hyperparameters (exit 2)."""


# Where checkpoints that could not be loaded are kept (a disk error may pass); listed in run_record.RUN_LAYOUT.
DAMAGED = "damaged-checkpoints"


def move_aside(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder`` under a free name; return where it went."""
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        n += 1
        target = folder / f"{path.name}-{n}"
    os.replace(path, target)
    return target


def check_resume_settings(checkpoint: Path, settings: dict, *, resume_anyway: bool = False) -> list[str]:
    """Compare ``settings`` with what ``checkpoint`` recorded; :class:`ResumeMismatch` naming the keys that
    differ, unless ``resume_anyway`` (then the differences are returned for a warning)."""
    from .checkpointing import read_train_config, settings_differences

    recorded = read_train_config(checkpoint)
    if recorded is None:
        return []
    recorded, current = dict(recorded), dict(settings)
    if recorded.get("max_steps", -1) > 0 and current["max_steps"] > 0:
        recorded.pop("epochs", None), current.pop("epochs", None)  # --max-steps decides; --epochs is unused
    for key in ("train_sha256",):  # 64 hex digits say no more than their first 12 here
        for side in (recorded, current):
            if isinstance(side.get(key), str):
                side[key] = side[key][:12]
    differences = settings_differences(recorded, current)
    if differences and not resume_anyway:
        raise ResumeMismatch(
            f"cannot resume from {checkpoint}: it was trained with other settings: {'; '.join(differences)}. "
            "Rerun with the checkpoint's settings, start over with --no-resume, or continue with the new "
            "settings with --resume-anyway"
        )
    return differences


def train_run(train: str | os.PathLike, out: str | os.PathLike, *, model: str = TINY,
              max_length: int = RECIPE["max_length"], epochs: float = RECIPE["num_train_epochs"], max_steps: int = -1,
              batch_size: int = RECIPE["per_device_train_batch_size"],
              grad_accum: int = RECIPE["gradient_accumulation_steps"], learning_rate: float = RECIPE["learning_rate"],
              seed: int = RECIPE["seed"], save_steps: int = 50, save_total_limit: int = 2,
              logging_steps: int = RECIPE["logging_steps"], gradient_checkpointing: bool = True, limit: int = 0,
              deepspeed: str | None = None, swanlab_mode: str = "disabled", resume: bool = True,
              step_sleep: float = 0.0, resume_anyway: bool = False) -> dict:
    """Train a LoRA adapter into the run dir ``out``, resuming from its last complete, loadable checkpoint
    (refused when it was trained with other settings, unless ``resume_anyway``).

    Works as one process or as every rank of ``torchrun`` / ``accelerate launch``; returns this rank's
    summary (also written to ``ranks/rank{N}.json``). Rank 0 holds the run dir's lock (``.OUT.lock`` beside it)
    throughout: a second ``train`` (or ``run``, ``sweep``) into ``out`` is refused at once, naming its PID.
    """
    from ..data import read_raw_rows

    check_train_options(out=out, max_length=max_length, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                        grad_accum=grad_accum, learning_rate=learning_rate, seed=seed, save_steps=save_steps,
                        save_total_limit=save_total_limit, logging_steps=logging_steps, limit=limit,
                        deepspeed=deepspeed, step_sleep=step_sleep)
    rows = read_raw_rows(train, limit=limit)  # path:line errors before anything heavy loads
    rank = int(os.environ.get("RANK", "0"))
    # One writer per run dir, as for `qwen-cls run` and `sweep`: the rank that writes it (0) holds the lock. Under
    # torchrun a refused rank 0 exits with status 2 and the launcher stops the other ranks, which write nothing
    # before the end; they never take the lock, so no rank waits on another's.
    with hold_lock(out, "qwen-cls train") if rank == 0 else contextlib.nullcontext():
        return _train(
            rows, train, Path(out), rank=rank, model=model, max_length=max_length, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, grad_accum=grad_accum, learning_rate=learning_rate, seed=seed,
            save_steps=save_steps, save_total_limit=save_total_limit, logging_steps=logging_steps,
            gradient_checkpointing=gradient_checkpointing, limit=limit, deepspeed=deepspeed,
            swanlab_mode=swanlab_mode, resume=resume, step_sleep=step_sleep, resume_anyway=resume_anyway)


def _train(rows, train, out: Path, *, rank: int, model: str, max_length: int, epochs: float, max_steps: int,
           batch_size: int, grad_accum: int, learning_rate: float, seed: int, save_steps: int,
           save_total_limit: int, logging_steps: int, gradient_checkpointing: bool, limit: int,
           deepspeed: str | None, swanlab_mode: str, resume: bool, step_sleep: float, resume_anyway: bool) -> dict:
    """:func:`train_run` after its checks, with the run dir's lock held by rank 0."""
    import torch
    from transformers import set_seed

    from ..files import file_sha256, write_json_atomic
    from ..model import load_model, pick_device, pick_dtype
    from ..model_builds.offline import ensure_built
    from ..run_record import run_config, save_training
    from ..train import padding_collator, prepare_lora_model, recipe_lora_config, training_arguments
    from .checkpointing import (
        CHECKPOINTS,
        ResumableTrainer,
        SleepAfterStep,
        remove_incomplete_checkpoints,
        resume_checkpoint,
    )

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    lora = recipe_lora_config()  # the recipe's seven projections (Qwen2, Gemma 3); from the model once loaded
    model_path = Path(model).expanduser()
    settings = {  # what decides the adapter: recorded in every checkpoint, compared on resume
        "train": str(Path(train).resolve()), "train_sha256": file_sha256(train), "limit": limit,
        "model": str(model_path.resolve()) if model != TINY and model_path.exists() else str(model),
        "max_length": max_length, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
        "grad_accum": grad_accum, "lr": learning_rate, "seed": seed, "world_size": world_size,
        "deepspeed": str(Path(deepspeed).resolve()) if deepspeed else None,
        "lora": {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                 "target_modules": sorted(lora.target_modules)},
    }
    checkpoint, damaged = resume_checkpoint(out) if resume else (None, [])
    if checkpoint is not None:  # before the model loads: a refused resume costs seconds
        changed = check_resume_settings(checkpoint, settings, resume_anyway=resume_anyway)
        if changed and rank == 0:
            print(f"warning: resuming from {checkpoint.name} with other settings (--resume-anyway): "
                  f"{'; '.join(changed)}", file=sys.stderr)
    args = training_arguments(  # length-grouped batches, as in the notebooks
        out / CHECKPOINTS,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps,
        logging_steps=logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=pick_dtype(pick_device()) == torch.bfloat16,
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        deepspeed=deepspeed,
        dataloader_num_workers=0,
    )
    with args.main_process_first(desc="build the base model"):  # one rank builds, the others then find it
        ensure_built(model)  # an offline model (``tiny`` by default): built when missing, before the seed is set
    # Everything random below (LoRA init, dropout, data order) follows the seed, so a resumed run
    # reaches the same adapter as an uninterrupted one.
    set_seed(seed)
    base, tokenizer = load_model(model, device="cpu")  # Trainer (or DeepSpeed) places it on the device
    lora = recipe_lora_config(base)  # the recipe's r/alpha/dropout on this architecture's projections
    settings["lora"]["target_modules"] = sorted(lora.target_modules)
    dataset = tokenized_rows(rows, tokenizer, max_length)
    peft_model = prepare_lora_model(base.train(), lora, gradient_checkpointing=gradient_checkpointing)

    callbacks = []
    tracked = swanlab_mode != "disabled" and rank == 0
    if tracked:
        from ..tracking import experiment_config, swanlab_callbacks

        config = experiment_config(profile="cli", base_model=model, lora=lora, training=args, n_train=len(dataset),
                                   max_length=max_length, seed=seed)
        callbacks += swanlab_callbacks(swanlab_mode, out, config)
    if step_sleep:
        callbacks.append(SleepAfterStep(step_sleep))
    trainer = ResumableTrainer(model=peft_model, args=args, train_dataset=dataset,
                               data_collator=padding_collator(tokenizer), callbacks=callbacks,
                               train_config=settings)

    if trainer.is_world_process_zero():
        if resume:
            for path in remove_incomplete_checkpoints(out):
                print(f"removed incomplete checkpoint {path}", file=sys.stderr)
            for path, problem in damaged:  # newer than the one resumed: the run saves those steps again
                kept = move_aside(path, out / DAMAGED)  # out of the rotation's way, but never deleted
                print(f"warning: skipped damaged checkpoint {path.name} ({problem}); moved to {kept}",
                      file=sys.stderr)
            if damaged and checkpoint is None:
                print("warning: no loadable checkpoint left; training starts from step 0", file=sys.stderr)
        else:
            old = remove_checkpoints(out)
            if old:
                print(f"--no-resume: removed {old} checkpoint(s) of the earlier run from {out / CHECKPOINTS}",
                      file=sys.stderr)
    trainer.accelerator.wait_for_everyone()
    if checkpoint is not None and rank == 0:
        print(f"resuming from {checkpoint}", file=sys.stderr)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    wrote = []
    if trainer.is_world_process_zero():
        config = run_config(profile=None, base_model=model, max_length=max_length, lora_config=lora, args=args,
                            seed=seed, gradient_checkpointing=gradient_checkpointing, train_rows=len(dataset),
                            train_file=train, world_size=trainer.accelerator.num_processes,
                            global_step=trainer.state.global_step, train_seconds=result.metrics.get("train_runtime"),
                            resumed_from=checkpoint.name if checkpoint else None)
        wrote = save_training(out, trainer.model, tokenizer, config, trainer.state.log_history)
    summary = {"rank": rank, "world_size": trainer.accelerator.num_processes, "batches": trainer.batches_seen,
               "rows": trainer.rows_seen, "global_step": trainer.state.global_step,
               "resumed_from": checkpoint.name if checkpoint else None,
               "train_loss": result.training_loss, "wrote": wrote}
    write_json_atomic(summary, out / "ranks" / f"rank{rank}.json")
    if tracked:
        from ..tracking import finish

        finish()
    trainer.accelerator.wait_for_everyone()
    return summary


def cmd_train(args) -> int:
    summary = train_run(
        args.train, args.out, model=args.model, max_length=args.max_length, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        learning_rate=args.lr, seed=args.seed, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, logging_steps=args.logging_steps,
        gradient_checkpointing=args.gradient_checkpointing, limit=args.limit, deepspeed=args.deepspeed,
        swanlab_mode=args.swanlab_mode, resume=not args.no_resume, step_sleep=args.step_sleep,
        resume_anyway=args.resume_anyway,
    )
    if summary["rank"] == 0:
        print(f"adapter: {Path(args.out) / ADAPTER}  ({summary['global_step']} optimizer steps, "
              f"{summary['world_size']} process(es))")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="training rows: raw JSONL {text, category, output}")
    p.add_argument("--out", required=True, help="run dir (checkpoints/, adapter/, run_config.json)")
    p.add_argument("--model", default=TINY, help="'tiny', a model folder, or a ModelScope id (default: tiny)")
    p.add_argument("--max-length", type=int, default=RECIPE["max_length"])
    p.add_argument("--epochs", type=float, default=RECIPE["num_train_epochs"])
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=RECIPE["per_device_train_batch_size"],
                   help="rows per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=RECIPE["gradient_accumulation_steps"])
    p.add_argument("--lr", type=float, default=RECIPE["learning_rate"])
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (oldest rotated away)")
    p.add_argument("--logging-steps", type=int, default=RECIPE["logging_steps"])
    p.add_argument("--limit", type=int, default=0, help="train on the first N rows only (0 = all)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config, e.g. configs/deepspeed_zero2.json")
    p.add_argument("--swanlab-mode", default="disabled", choices=("local", "offline", "disabled", "cloud"))
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--no-resume", action="store_true",
                        help="start over: remove the run dir's checkpoints instead of resuming from them")
    resume.add_argument("--resume-anyway", action="store_true",
                        help="resume even when the checkpoint was trained with other data or hyperparameters")
    p.add_argument("--step-sleep", type=float, default=0.0, help=argparse.SUPPRESS)  # tests stage a kill


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a LoRA adapter into a run dir (resumes; torchrun-ready)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
