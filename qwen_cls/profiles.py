"""Parameter sets for the notebook chain: ``tiny`` (offline mechanics), ``gemma3-270m`` and ``qwen2.5-coder-0.5b``
(real pretrained models that learn on a CPU, offline after ``make setup``, ``make setup QWEN=1``) and
``qwen2-0.5b`` (the recipe).

Keys are the notebooks' ``parameters`` cells (every profile holds every key a notebook declares, so an injected
profile fixes every notebook value); each notebook receives the keys it declares. The committed notebooks hold
:data:`COMMITTED_PROFILE`'s values. Paths are
relative to the ``notebooks/`` folder (the notebooks' working directory); ``qwen-cls run`` makes them
absolute. :data:`SCHEMA` gives each key its type and range, shared by every profile; ``qwen-cls run`` checks
the resolved values against it before any notebook starts.

Taught in: 00
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .hub import DATASETS, GEMMA, QWEN2_MODEL_ID, QWEN_CODER, TINY
from .recipe import PRECISIONS, RECIPE
from .tracking import MODES

# The gemma3-270m profile's training: the most rows that fit make demo's time on 2 CPU cores (800), and the
# learning rate chosen on 300 validation rows (training rows 01 does not keep) by benchmarks/choose_settings.py:
# 5e-4 (validation 0.920) over the earlier 1e-3 (0.853); the figures are in benchmarks/settings_gemma3-270m.json.
GEMMA_TRAIN_ROWS = 800
GEMMA_LEARNING_RATE = 5e-4
# 06's sequence-classification head keeps the learning rate it was built with (not chosen on validation rows).
GEMMA_SEQ_CLS_LEARNING_RATE = 1e-3

# The qwen2.5-coder-0.5b profile's training, chosen on 300 validation rows (training rows 01 does not keep) by
# benchmarks/choose_settings.py; the figures that chose it are in benchmarks/settings_qwen2.5-coder-0.5b.json.
QWEN_CODER_TRAINING = {"max_train_samples": 800, "learning_rate": 5e-4, "num_train_epochs": 1,
                       "per_device_train_batch_size": 4}

PROFILES: dict[str, dict] = {
    # Offline: bundled sample, tiny random Qwen2, minutes on a 2-core CPU. Mechanics only, not results.
    TINY: {
        **RECIPE,
        "profile": TINY,
        "base_model": TINY,
        "train_path": "../data/sample/train.jsonl",
        "test_path": "../data/sample/test.jsonl",
        "dataset": "fudan-news",  # unused: the sample is bundled (download_data False)
        "download_data": False,
        "max_train_samples": 0,  # all the sample's training rows but the validation rows
        "max_test_samples": 0,
        "validation_rows": 8,  # the last 8 of the 80 shuffled sample rows: 03's learning curve, the sweep's ranking
        # A random tiny model needs big steps to move its answer loss visibly in a few dozen updates.
        "learning_rate": 5e-3,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,  # a tiny model needs no memory saving; skip the recompute on CPU
        "precision": "float32",  # the tests compare float32 sums; bfloat16 would only add rounding to the mechanics
        "logging_steps": 2,
        "swanlab_mode": None,  # tracking.default_mode(): local with the dashboard package, else offline
        "eval_rows": 0,  # validation rows 03 scores before training and after each epoch (0: all 8)
        "eval_batch_size": 8,
        "max_new_tokens": 6,
        "generate_rows": 0,  # 04's free generation on all 30 test rows
        "rag_k": 3,
        "rag_max_length": 0,  # 05's RAG prompts: the training max_length
        "rag_test_rows": 0,  # 05 compares on all 30 test rows
        "show_rows": 3,
        "speed_rows": 1,  # 04's per-row generate: the random model never stops, 512 tokens a row
        "sweep_dir": "",  # 03's last section shows this finished sweep's table ("": none)
        "seq_cls_epochs": 2,  # 06's sequence-classification head: as many epochs as 03, the same big steps
        "seq_cls_learning_rate": 5e-3,
        "seq_cls_max_length": 64,
        "serve_rows": 0,  # 07 sends all 30 test rows
        "serve_clients": 4,
        "serve_seconds": 3.0,
        "out_dir": "../runs/notebooks",
    },
    # Offline after `make setup`: Google's pretrained Gemma 3 270M (PyPI GGUF chunks) on THUCNews headlines,
    # sized to really learn on 2 CPU cores (make demo: 6 min 29 s on an AMD EPYC, bfloat16). Real numbers, a small
    # model.
    GEMMA: {
        **RECIPE,
        "profile": GEMMA,
        "base_model": GEMMA,
        "train_path": "../data/thucnews/train.jsonl",
        "test_path": "../data/thucnews/test.jsonl",
        "dataset": "thucnews",
        "download_data": True,  # `make setup` fetches it; else 01 does (through pip)
        "max_train_samples": GEMMA_TRAIN_ROWS,
        "max_test_samples": 500,
        # Training rows 01 does not keep (the shuffled file's last 300): 03's learning curve, the sweep's ranking
        # and every setting are chosen on them; the 500 test rows are scored once, in 04.
        "validation_rows": 300,
        "max_length": 128,  # headlines: prompt + answer take about 70-90 Gemma tokens
        "learning_rate": GEMMA_LEARNING_RATE,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,  # 128 tokens x 8 rows fit easily; recomputing would cost CPU time
        "precision": "auto",  # bfloat16 on a CPU with AMX / AVX-512 BF16: 1.5x the training, 2x the scoring speed
        "logging_steps": 5,
        "swanlab_mode": None,
        "eval_rows": 50,  # 03's learning curve on 50 of the 300 validation rows, before and after its one epoch
        "eval_batch_size": 16,
        "max_new_tokens": 5,
        "generate_rows": 100,  # 04's free generation (slower than scoring) on the first 100 of the 500 test rows
        "rag_k": 3,
        "rag_test_rows": 150,  # 05 compares its four model methods on the first 150 test rows (06 its six approaches)
        "rag_max_length": 256,  # room for k=3 retrieved headlines beside the query (128 would cut them)
        "show_rows": 3,
        "speed_rows": 1,  # 04's per-row generate(512) without the adapter never stops: ~35 s a row on CPU
        "sweep_dir": "",
        "seq_cls_epochs": 1,  # 06 trains the head on the same 800 rows as 03, briefly (45-55 s)
        "seq_cls_learning_rate": GEMMA_SEQ_CLS_LEARNING_RATE,
        "seq_cls_max_length": 64,  # the text alone, no prompt: a headline takes about 20-30 Gemma tokens
        "serve_rows": 32,  # 07: predict's baseline and the concurrent clients on the first 32 test rows
        "serve_clients": 8,
        "serve_seconds": 6.0,
        "out_dir": "../runs/gemma3-270m",
    },
    # The real model and dataset from ModelScope with the recipe's hyperparameters (a GPU is advisable).
    "qwen2-0.5b": {
        **RECIPE,
        "profile": "qwen2-0.5b",
        "base_model": QWEN2_MODEL_ID,
        "train_path": "../data/fudan-news/train.jsonl",
        "test_path": "../data/fudan-news/test.jsonl",
        "dataset": "fudan-news",
        "download_data": True,
        "max_train_samples": 0,  # all training rows but the validation rows
        "max_test_samples": 0,
        "validation_rows": 200,  # the shuffled training file's last 200 rows
        "swanlab_mode": None,  # as above
        "precision": "auto",  # bfloat16 on a GPU that has it (the blog loads bfloat16)
        "eval_rows": 0,  # 03 scores all 200 validation rows per epoch; 04 evaluates the whole test split once
        "eval_batch_size": 8,
        "max_new_tokens": 8,
        "generate_rows": 0,
        "rag_k": 3,
        "rag_max_length": 0,
        "rag_test_rows": 0,
        "show_rows": 3,
        "speed_rows": 3,
        "sweep_dir": "",
        "seq_cls_epochs": 2,  # 06: the recipe's epochs and learning rate for the head too
        "seq_cls_learning_rate": 1e-4,
        "seq_cls_max_length": 384,
        "serve_rows": 50,
        "serve_clients": 16,
        "serve_seconds": 30.0,
        "out_dir": "../runs/qwen2-0.5b",
    },
}

# Offline after `make setup QWEN=1` (or its first use): Qwen's own Qwen2.5-Coder-0.5B-Instruct, the Qwen2-0.5B
# architecture the recipe trains (24 layers, 151,936-word head, ChatML), on the same THUCNews rows as gemma3-270m.
# Its training settings were chosen on validation rows, never test rows (QWEN_CODER_TRAINING above).
PROFILES[QWEN_CODER] = {
    **PROFILES[GEMMA],
    "profile": QWEN_CODER,
    "base_model": QWEN_CODER,
    **QWEN_CODER_TRAINING,
    "seq_cls_learning_rate": QWEN_CODER_TRAINING["learning_rate"],
    "out_dir": f"../runs/{QWEN_CODER}",
}

DEFAULT_PROFILE = TINY  # `qwen-cls run`, `sweep`, `lab` without --profile

# The profile whose values the committed notebooks' `parameters` cells hold (a test keeps them equal): opened in
# JupyterLab and run as they are, the notebooks train the real model. `qwen-cls run` with this profile injects
# only the run folder (and -p overrides), so `make demo` runs exactly what a learner runs.
COMMITTED_PROFILE = GEMMA


def profile_parameters(name: str) -> dict:
    """A copy of the named profile's parameters; ``ValueError`` naming the profiles otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    params = dict(PROFILES[name])
    if params.get("swanlab_mode") is None:
        from .tracking import default_mode  # $QWEN_CLS_SWANLAB_MODE, else local/offline as installed

        params["swanlab_mode"] = default_mode()
    return params


def is_path_key(key: str) -> bool:
    """Parameters holding a file or folder path (made absolute by ``qwen-cls run``)."""
    return key.endswith(("_path", "_dir"))


# --- what each parameter may hold --------------------------------------------------------------------------------
# Keyed by parameter name, not by profile: every profile (and every ``-p KEY VALUE`` of ``qwen-cls run``) is
# checked against the same rules, so a new profile needs no schema of its own, only new keys need an entry.

class ParameterError(ValueError):
    """A parameter value of the wrong type or out of range; the message names the parameter."""


@dataclass(frozen=True)
class Param:
    """The type and range of one notebook parameter.

    ``kind``: ``int`` (not bool, not float), ``number`` (int or float, finite), ``bool`` (``True``/``False``),
    ``text`` (non-empty string), ``path`` (non-empty string; a file or folder), ``optional_path`` (a path or
    ``""``: none) or ``choice`` (one of ``choices``).
    ``low``/``high`` bound numbers (``low_open``/``high_open``: the bound itself is excluded).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    note: str = ""

    def describe(self) -> str:
        """What a valid value looks like, e.g. ``an integer >= 0 (0: all rows)``."""
        if self.kind == "choice":
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            text = {"int": "an integer", "number": "a number", "bool": "True or False",
                    "text": "a non-empty text", "path": "a non-empty path",
                    "optional_path": "a path or an empty text"}[self.kind]
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
            if bounds:
                text += " " + " and ".join(bounds)
        return f"{text} ({self.note})" if self.note else text

    def accepts(self, value) -> bool:
        """True when ``value`` has this parameter's type and lies in its range."""
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind in ("text", "path"):
            return isinstance(value, str) and value.strip() != ""
        if self.kind == "optional_path":
            return isinstance(value, str) and (value == "" or value.strip() != "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# The ChatML template, system message, candidate list and answer alone take about 50 tokens.
MIN_MAX_LENGTH = 64

SCHEMA: dict[str, Param] = {
    "profile": Param("text"),
    "base_model": Param("text", note="'tiny', 'gemma3-270m', a model folder or a ModelScope id"),
    "train_path": Param("path", note="raw JSONL file"),
    "test_path": Param("path", note="raw JSONL file"),
    "out_dir": Param("path", note="the run folder"),
    "download_data": Param("bool"),
    "max_train_samples": Param("int", low=0, note="0: all rows"),
    "max_test_samples": Param("int", low=0, note="0: all rows"),
    "seed": Param("int", low=0, high=2**32 - 1),
    "max_length": Param("int", low=MIN_MAX_LENGTH, note="tokens per row; the prompt alone takes about 50"),
    "lora_r": Param("int", low=1),
    "lora_alpha": Param("number", low=0, low_open=True),
    "lora_dropout": Param("number", low=0, high=1, high_open=True),
    "learning_rate": Param("number", low=0, high=1, low_open=True),
    "num_train_epochs": Param("number", low=0, low_open=True),
    "per_device_train_batch_size": Param("int", low=1),
    "gradient_accumulation_steps": Param("int", low=1),
    "gradient_checkpointing": Param("bool"),
    "precision": Param("choice", choices=PRECISIONS,
                       note="auto: bfloat16 where the GPU or CPU computes it natively, else float32"),
    "logging_steps": Param("int", low=1),
    "swanlab_mode": Param("choice", choices=MODES),
    "validation_rows": Param("int", low=1, note="the shuffled training file's last rows, never trained on"),
    "eval_rows": Param("int", low=0, note="validation rows 03 scores; 0: all"),
    "eval_batch_size": Param("int", low=1),
    "max_new_tokens": Param("int", low=1),
    "dataset": Param("choice", choices=DATASETS),
    "rag_test_rows": Param("int", low=0, note="0: all test rows"),
    "generate_rows": Param("int", low=0, note="0: all test rows"),
    "speed_rows": Param("int", low=1, note="rows 04 times per-row generate on"),
    "rag_k": Param("int", low=1),
    "rag_max_length": Param("int", low=0, note=f"0: the training max_length; else >= {MIN_MAX_LENGTH}"),
    "show_rows": Param("int", low=0),
    "seq_cls_epochs": Param("number", low=0, low_open=True, note="06: epochs of the sequence-classification head"),
    "seq_cls_learning_rate": Param("number", low=0, high=1, low_open=True),
    "seq_cls_max_length": Param("int", low=8, note="06: tokens of text per row (no prompt)"),
    "serve_rows": Param("int", low=0, note="07: test rows sent to the server; 0: all"),
    "serve_clients": Param("int", low=1, note="07: concurrent clients"),
    "serve_seconds": Param("number", low=0, low_open=True, note="07: seconds of the concurrent load"),
    "sweep_dir": Param("optional_path", note="a finished `qwen-cls sweep` folder whose table 03 shows; '': none"),
}


def check_parameter(key: str, value) -> None:
    """Raise :class:`ParameterError` naming ``key`` when ``value`` breaks :data:`SCHEMA` (unknown keys pass)."""
    rule = SCHEMA.get(key)
    if rule is None:
        return
    ok = rule.accepts(value)
    if ok and key == "rag_max_length" and 0 < value < MIN_MAX_LENGTH:
        ok = False
    if not ok:
        hint = ""
        if rule.kind == "bool" and isinstance(value, (str, int)):
            hint = " (write True or False)"
        elif rule.kind == "int" and isinstance(value, float) and math.isfinite(value) and value == int(value):
            hint = f" (a float; write {int(value)})"
        raise ParameterError(f"{key} must be {rule.describe()}, got {value!r}{hint}")


def check_parameters(params: dict) -> None:
    """Check every value of ``params`` against :data:`SCHEMA` (see :func:`check_parameter`)."""
    for key, value in params.items():
        check_parameter(key, value)
