"""The options ``qwen-cls predict``, ``serve`` and ``export`` share, each checked before a model loads (exit 2,
naming the option): ``--run RUN`` or ``--model FOLDER`` (:func:`add_model_source`); a run that is not finished
(marked incomplete, its lock held by the ``qwen-cls run`` or ``train`` writing it, never evaluated:
:func:`check_run_finished`) or whose config or adapter is damaged (:func:`check_run_files`); ``--max-length``
(:func:`check_max_length`) and ``--device`` (:func:`check_device`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..chain.locks import lock_holder
from ..run_record import METRICS, PARAMS, RUN_INCOMPLETE, adapter_dir, read_run_config


def check_run_finished(run_dir: str | os.PathLike, option: str = "--run") -> None:
    """``ValueError`` naming ``option`` when ``run_dir`` is not a finished run: marked
    :data:`~qwen_cls.run_record.RUN_INCOMPLETE`, its lock held (a `qwen-cls run` or `train` is writing it now), or a
    `qwen-cls run` folder (``params.json``) without ``metrics.json``. A `qwen-cls train` run has no metrics; its
    adapter is checked when it loads.
    ``predict``, ``serve``, ``export`` and ``book`` call this, before a model loads or a file is written."""
    run_dir = Path(run_dir)
    if (run_dir / RUN_INCOMPLETE).is_file():
        raise ValueError(f"{option} {run_dir}: marked incomplete ({RUN_INCOMPLETE}): its `qwen-cls run` did not "
                         "finish, so its files are partial; rerun it first")
    holder = lock_holder(run_dir)
    if holder is not None:
        raise ValueError(f"{option} {run_dir}: is being written now by {holder}; its files are partial until it "
                         "finishes: wait for it, then rerun this command")
    if (run_dir / PARAMS).is_file() and (run_dir / "notebooks").is_dir() and not (run_dir / METRICS).is_file():
        raise ValueError(f"{option} {run_dir}: has no {METRICS}: its `qwen-cls run` did not get through notebook "
                         f"04 (evaluation); rerun `qwen-cls run --out {run_dir} --overwrite` first")


def check_run_files(run_dir: str | os.PathLike) -> None:
    """What ``predict``, ``serve`` and ``export`` check of a (finished) run's files before a model loads: a
    readable ``run_config.json`` and a whole adapter (:func:`~qwen_cls.run_record.adapter_dir`)."""
    read_run_config(run_dir)
    adapter_dir(run_dir)  # adapter_config.json and the safetensors header, named when damaged


def check_max_length(max_length) -> None:
    """``ValueError`` naming ``--max-length`` unless it is ``None`` (the run's) or an integer of at least
    :data:`~qwen_cls.profiles.MIN_MAX_LENGTH`: what ``predict`` and ``serve`` check before a model loads."""
    from ..profiles import MIN_MAX_LENGTH

    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < MIN_MAX_LENGTH):
        raise ValueError(f"--max-length must be an integer >= {MIN_MAX_LENGTH} (tokens per row; the prompt alone "
                         f"takes about 50), got {max_length!r}")


def check_device(device) -> None:
    """``ValueError`` naming ``--device`` when it is not a device this machine's torch can use."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch build has no CUDA support (torch {torch.__version__})" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"--device {device}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N or mps")


def add_model_source(parser) -> None:
    """``--run RUN_DIR`` or ``--model FOLDER`` (exactly one): the model ``predict`` and ``serve`` classify with."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run dir (adapter/ + run_config.json)")
    source.add_argument("--model", help="model folder, e.g. from `qwen-cls export`")
