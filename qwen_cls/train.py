"""LoRA training with a loss that applies the LM head only where the answer is.

The recipe lets the model compute 151,936-way logits at every position of a 384-token row although
only the 2–5 answer tokens carry loss. :class:`AnswerOnlyTrainer` passes a boolean ``logits_to_keep``
mask to the model, so the LM head runs only at the positions that predict a supervised token.
:class:`ClassificationEvalCallback` classifies held rows after each epoch and logs accuracy and macro-F1.

Taught in: 03, 06
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback

from .evaluate import attention_window, score_candidates
from .metrics import classification_metrics
from .recipe import LORA_TARGET_MODULES, MAX_LENGTH, RECIPE
from .tokenization import IGNORE_INDEX

MODEL_INPUT_COLUMNS = ["input_ids", "attention_mask", "labels"]


def lora_target_modules(model) -> list[str]:
    """Names of the model's ``nn.Linear`` layers except the LM head: its attention and MLP projections.

    For Qwen2 and Gemma 3 these are the recipe's seven, returned in :data:`LORA_TARGET_MODULES`' order.
    """
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings()}
    return [n for n in LORA_TARGET_MODULES if n in names] + sorted(names - set(LORA_TARGET_MODULES))


def recipe_lora_config(model=None, **overrides):
    """The recipe's LoRA: r=8, alpha=32, dropout 0.1 on all attention and MLP projections (those of
    ``model`` when given, see :func:`lora_target_modules`; else :data:`LORA_TARGET_MODULES`)."""
    from peft import LoraConfig, TaskType

    targets = lora_target_modules(model) if model is not None else LORA_TARGET_MODULES
    settings = dict(task_type=TaskType.CAUSAL_LM, target_modules=targets, inference_mode=False,
                    r=RECIPE["lora_r"], lora_alpha=RECIPE["lora_alpha"], lora_dropout=RECIPE["lora_dropout"])
    settings.update(overrides)
    return LoraConfig(**settings)


def prepare_lora_model(model, lora_config, *, gradient_checkpointing: bool = True):
    """Wrap ``model`` with LoRA (its dropout: :func:`use_fast_dropout`); with gradient (activation)
    checkpointing, make the frozen embeddings' output require grad so gradients reach the LoRA weights of the
    first layer."""
    from peft import get_peft_model

    if gradient_checkpointing:
        # transformers >= 5.24 calls gradient checkpointing "activation checkpointing".
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
    return use_fast_dropout(get_peft_model(model, lora_config))


class FastDropout(torch.nn.Dropout):
    """``nn.Dropout`` (the same ``p``, the same scaling by ``1 / (1 - p)``) whose mask on a CPU comes from 64-bit
    random integers cut in four: torch's CPU generator makes one number per call, and ``F.dropout`` draws one per
    element (with LoRA dropout on the seven projections of every layer, about a fifth of a Gemma 3 270M training
    step on 2 cores). An element is kept when its 16-bit number is at least ``round(p * 2**16)`` above the
    smallest, so ``p`` is rounded to a multiple of 2**-16 (0.1 becomes 0.100006). Seeded like everything else
    (``torch.manual_seed``). On other devices, and in eval mode, it is ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1:
            return torch.zeros_like(x)
        n = x.numel()
        words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = words.view(torch.int16)[:n].view(x.shape) >= round(self.p * 2**16) - 2**15
        return x * keep * (1.0 / (1.0 - self.p))


def use_fast_dropout(model):
    """Give every LoRA layer of a PEFT ``model`` a :class:`FastDropout` with its own ``p`` in place of its
    ``nn.Dropout`` (its dropout stays what the LoraConfig says; only the random numbers come faster on a CPU).
    Returns ``model``."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if type(dropout) is torch.nn.Dropout:
                    dropouts[name] = FastDropout(dropout.p)
    return model


def padding_collator(tokenizer):
    """Right-pad each batch to its longest row; labels are padded with -100."""
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def model_inputs(tokenized):
    """Only the columns the model consumes (drops ``length`` and the truncation flags)."""
    return tokenized.select_columns(MODEL_INPUT_COLUMNS)


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): positions whose logits predict a supervised next token, and those tokens."""
    shifted = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = shifted != IGNORE_INDEX
    return mask, shifted[shifted != IGNORE_INDEX]


def batch_shared_prefix(inputs: dict, mask: torch.Tensor, model=None) -> int:
    """How many leading tokens every row of a (right-padded) batch shares and may run once: real tokens
    (no padding), none of them predicting an answer token, at least one token of its own left to each row;
    0 for a single row, and 0 when the padded batch reaches a sliding attention window (Gemma 3's local layers)
    or the model recomputes activations (gradient checkpointing keeps no cache)."""
    ids = inputs["input_ids"]
    if ids.shape[0] < 2:
        return 0
    if model is not None:
        window = attention_window(model)
        if (window is not None and ids.shape[1] >= window) or getattr(model, "is_gradient_checkpointing", False):
            return 0
    same = (ids == ids[:1]).all(dim=0)
    attention = inputs.get("attention_mask")
    if attention is not None:
        same &= attention.bool().all(dim=0)
    same &= ~mask.any(dim=0)
    differs = (~same).nonzero()
    n = int(differs[0]) if len(differs) else ids.shape[1]
    return min(n, ids.shape[1] - 1)


def _logits_with_shared_prefix(model, inputs: dict, mask: torch.Tensor, n: int) -> torch.Tensor:
    """The answer positions' logits, the first ``n`` tokens run once for the whole batch: their KV cache
    (with its autograd graph) is repeated for every row, which then runs only its own tokens at their own
    positions. The same numbers as one forward over the whole batch (gradients flow back through the cache
    into the one prefix pass), except that LoRA dropout draws one mask for the prefix, shared by the rows."""
    ids, attention = inputs["input_ids"], inputs.get("attention_mask")
    rows, width = ids.shape
    if attention is None:
        attention = torch.ones_like(ids)
    body = model.get_decoder()  # the layers without the LM head (the prefix predicts no answer token)
    cache = body(input_ids=ids[:1, :n], attention_mask=attention[:1, :n], use_cache=True).cache
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(n, width, device=ids.device).expand(rows, -1)
    return model(input_ids=ids[:, n:], attention_mask=attention, position_ids=positions, cache=cache,
                 use_cache=True, logits_to_keep=mask[:, n:]).logits


def answer_only_loss(model, inputs: dict, num_items_in_batch=None, *, share_prefix: bool = False) -> torch.Tensor:
    """Cross-entropy over answer tokens, computing logits only at the positions that predict them.

    Taught in notebook 03, section 5, which writes it out (without ``share_prefix``) and checks it equals this one;
    what this adds: ``share_prefix``, the tokens every row of the batch starts with (the chat template and system
    message) run once for the batch instead of once per row (:func:`batch_shared_prefix`, 03's next section)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    mask, targets = answer_positions(labels)
    n = batch_shared_prefix(inputs, mask, model) if share_prefix else 0
    if n:
        logits = _logits_with_shared_prefix(model, inputs, mask, n)
    else:
        logits = model(**inputs, logits_to_keep=mask, use_cache=False).logits  # (n_answer_tokens, vocab)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return loss / count


class AnswerOnlyTrainer(Trainer):
    """``Trainer`` whose loss is :func:`answer_only_loss`, normalised over the whole accumulated batch;
    ``share_prefix=True`` runs the prompt opening all rows of a batch share once per batch."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, share_prefix: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # have Trainer count answer tokens across grad-accum steps
        self.share_prefix = share_prefix

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = answer_only_loss(model, inputs, num_items_in_batch, share_prefix=self.share_prefix)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and model.training:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss


class ClassificationEvalCallback(TrainerCallback):
    """Before training and after each epoch, classify ``rows`` with the model being trained and log accuracy
    and macro-F1 (the learning curve; the first point is the untrained model).

    ``rows`` are raw rows (dicts with ``text``, ``category``, ``output``), scored with
    :func:`qwen_cls.evaluate.score_candidates` in eval mode (no grad, on the model's device), then put
    back in training mode. ``eval_accuracy`` and ``eval_macro_f1`` go through the trainer's own ``log()``,
    so ``trainer.state.log_history`` and every callback (SwanLab's: ``eval/accuracy``) receive them.
    Register it with :meth:`bind`, which also gives it the trainer whose ``log()`` it uses::

        ClassificationEvalCallback(rows, tokenizer).bind(trainer)
    """

    def __init__(self, rows, tokenizer, *, max_length: int = MAX_LENGTH, batch_size: int = 8, prefix: str = "eval",
                 before_training: bool = True):
        self.rows = list(rows)
        self.before_training = before_training  # also score once before the first step (epoch 0)
        if not self.rows:
            raise ValueError("ClassificationEvalCallback needs at least one evaluation row")
        self.tokenizer, self.max_length, self.batch_size, self.prefix = tokenizer, max_length, batch_size, prefix
        self.trainer = None
        self.history: list[dict] = []  # what was logged: {"step", "epoch", f"{prefix}_accuracy", ...}

    def bind(self, trainer) -> "ClassificationEvalCallback":
        """Use ``trainer.log()`` and join the trainer's callbacks (once); returns ``self``."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def evaluate(self, model) -> dict:
        """``classification_metrics`` of ``model``'s candidate-scoring predictions on the rows."""
        was_training = model.training
        model.eval()
        try:
            scored = score_candidates(model, self.tokenizer, self.rows, max_length=self.max_length,
                                      batch_size=self.batch_size)
        finally:
            model.train(was_training)
        return classification_metrics([row["output"] for row in self.rows], [s.prediction for s in scored])

    def _log(self, state) -> None:
        if self.trainer is None:
            raise RuntimeError("ClassificationEvalCallback has no trainer: register it with .bind(trainer)")
        metrics = self.evaluate(self.trainer.model)
        logs = {f"{self.prefix}_accuracy": metrics["accuracy"], f"{self.prefix}_macro_f1": metrics["macro_f1"]}
        self.history.append({"step": state.global_step, "epoch": state.epoch or 0.0, **logs})
        self.trainer.log(dict(logs))

    def on_train_begin(self, args, state, control, **kwargs):
        if self.before_training and state.global_step == 0:  # not when resuming from a checkpoint
            self._log(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._log(state)


class StepProgress(TrainerCallback):
    """A progress bar over the optimizer steps with the latest logged loss: a live bar in JupyterLab, one final
    line in a notebook run by ``qwen-cls run`` (``tqdm.auto``, see ``qwen_cls/__init__.py``). For a Trainer with
    ``disable_tqdm=True``, whose own bar would also print a table row (or a dict) at every log."""

    def __init__(self, desc: str = "train"):
        self.desc, self.bar = desc, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EpochLine(TrainerCallback):
    """Before training and after each epoch, one line: the latest loss and the logged ``eval_accuracy`` /
    ``eval_macro_f1`` (of :class:`ClassificationEvalCallback`) against ``chance``."""

    def __init__(self, chance: float | None = None):
        self.chance = chance

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "eval_accuracy" not in logs or not state.is_world_process_zero:
            return
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        loss = f"loss {losses[-1]:.3f}" if losses else "还没有 loss"
        when = ("训练前 (before training)" if state.global_step == 0
                else f"epoch {state.epoch:.0f}/{args.num_train_epochs:g}")
        chance = f" (chance {self.chance:.3f})" if self.chance is not None else ""
        print(f"{when}, step {state.global_step}/{state.max_steps}: {loss}, eval_accuracy "
              f"{logs['eval_accuracy']:.3f}{chance}, eval_macro_f1 {logs['eval_macro_f1']:.3f}")


def show_progress(trainer, *, chance: float | None = None):
    """What a notebook shows while ``trainer`` trains: a :class:`StepProgress` bar and an :class:`EpochLine`
    in place of the dict ``Trainer`` prints at every log when ``disable_tqdm=True``. Returns ``trainer``."""
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(EpochLine(chance))
    trainer.add_callback(StepProgress())
    return trainer


def training_arguments(output_dir, **overrides):
    """``TrainingArguments`` for the fast path: length-grouped batches (little padding to compute on).

    Rows of similar length share a batch (``train_sampling_strategy="group_by_length"``, lengths from
    the tokenized ``length`` column when present); gradient checkpointing is left to
    :func:`prepare_lora_model`. Everything else is ``TrainingArguments``' default unless overridden.
    """
    from transformers import TrainingArguments

    settings = dict(output_dir=str(output_dir), train_sampling_strategy="group_by_length",
                    activation_checkpointing=False, remove_unused_columns=True)
    settings.update(overrides)
    return TrainingArguments(**settings)
