"""Experiment tracking with SwanLab: Trainer callbacks and evaluation logging (the dashboard:
:mod:`qwen_cls.serving.dashboard`).

``swanlab_mode`` says where a run's log goes; every mode but ``cloud`` needs no account and no network:

* ``local``: ``OUT/swanlog`` plus the database the dashboard reads (``qwen-cls dashboard OUT``);
  needs the dashboard package ``swanboard`` (``pip install 'swanlab[dashboard]'``). The default when present.
* ``offline``: ``OUT/swanlog`` only; upload it later with ``swanlab sync`` (no local dashboard).
* ``disabled``: nothing is logged.
* ``cloud``: swanlab.cn, needing an API key (``SWANLAB_API_KEY`` or ``swanlab login``) and network.

Taught in: 03, 04
"""

from __future__ import annotations

import enum
import importlib.metadata
import os
from pathlib import Path

from .hub import TINY

MODES = ("local", "offline", "disabled", "cloud")
SWANLAB_MODE = {"local": "local", "offline": "offline", "disabled": "disabled", "cloud": "online"}
MODE_ENV = "QWEN_CLS_SWANLAB_MODE"  # overrides the default mode, e.g. in CI
LOG_SUBDIR = "swanlog"
SWANLOG_ENV = "QWEN_CLS_SWANLOG_DIR"  # set by `qwen-cls sweep`: every point logs into the sweep's one swanlog/
EVAL_KEYS = ("accuracy", "macro_f1", "invalid_rate", "n_test")
TINY_WARNING = "tiny random Qwen2: it learns nothing; these numbers show the mechanics only, not results"
OFFLINE_CHOICES = (
    "swanlab_mode='local' (no account, no network; view it with `qwen-cls dashboard OUT`), "
    "'offline' (log files only; upload later with `swanlab sync`) or 'disabled'"
)


class TrackingError(ValueError):
    """A tracking mode that cannot work here; the message names what to do instead."""


def dashboard_available() -> bool:
    """True when the dashboard package (``swanboard``, the version swanlab asks for) is installed."""
    try:
        installed = importlib.metadata.version("swanboard")
    except importlib.metadata.PackageNotFoundError:
        return False
    wanted = [r for r in importlib.metadata.requires("swanlab") or [] if r.startswith("swanboard")]
    return not wanted or wanted[0].split(";")[0].strip() in (f"swanboard=={installed}", "swanboard")


def default_mode() -> str:
    """``$QWEN_CLS_SWANLAB_MODE`` when set, else ``local`` with the dashboard package, else ``offline``."""
    chosen = os.environ.get(MODE_ENV, "").strip()
    if chosen:
        return check_mode(chosen)
    return "local" if dashboard_available() else "offline"


def cloud_api_key() -> str | None:
    """The SwanLab API key swanlab would use (``SWANLAB_API_KEY``, ``.env`` or ``swanlab login``'s netrc)."""
    if os.environ.get("SWANLAB_API_KEY"):
        return os.environ["SWANLAB_API_KEY"]
    try:
        from swanlab.sdk.internal.settings import create_settings
    except ImportError:  # another swanlab layout: look for the saved login only
        saved = Path(os.environ.get("SWANLAB_ROOT") or Path.home() / ".swanlab") / ".netrc"
        return "saved login" if saved.is_file() else None
    return create_settings().api_key


def check_mode(mode: str | None) -> str:
    """Validate ``mode`` (``None`` means :func:`default_mode`); fail early where it cannot work."""
    if mode is None:
        return default_mode()
    if mode not in MODES:
        raise TrackingError(f"swanlab_mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "local" and not dashboard_available():
        raise TrackingError(
            "swanlab_mode='local' needs the dashboard package: pip install 'swanlab[dashboard]' "
            "(or `make setup`); or use swanlab_mode='offline' or 'disabled'"
        )
    if mode == "cloud" and not cloud_api_key():
        raise TrackingError(
            "swanlab_mode='cloud' needs a SwanLab account and network, but no API key was found "
            "(set SWANLAB_API_KEY or run `swanlab login`). Without an account use " + OFFLINE_CHOICES
        )
    return mode


def plain(value):
    """``value`` as YAML-safe builtins: dataclass-likes via ``to_dict``, sets sorted, enums by value."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def experiment_config(*, profile: str, base_model: str, lora, training, n_train: int, n_test: int | None = None,
                      **extra) -> dict:
    """The config a run records: profile, model, LoRA and training hyperparameters, data sizes.

    ``lora`` and ``training`` may be dicts, a ``LoraConfig`` or ``TrainingArguments`` (kept whole).
    """
    config = {"profile": profile, "base_model": str(base_model), "lora": plain(lora), "training": plain(training),
              "data": {"n_train": n_train, **({"n_test": n_test} if n_test is not None else {})}}
    config.update(plain(extra))
    return config


def description(config: dict | None) -> str | None:
    """The run's description: a warning when the numbers come from the tiny random model."""
    config = config or {}
    if TINY in (config.get("profile"), config.get("base_model"), config.get("model")):
        return TINY_WARNING
    return None


_hinted: set[str] = set()


def _dashboard_hint(ctx) -> None:
    """swanlab's local-mode tip, once per log folder and naming this project's safe dashboard command
    (upstream prints ``swanlab watch DIR`` at the start and again at the end of every run)."""
    log_dir = Path(str(ctx.config.settings.log_dir))
    if str(log_dir) in _hinted:
        return
    _hinted.add(str(log_dir))
    run_dir = log_dir.parent if log_dir.name == LOG_SUBDIR else log_dir
    print(f"SwanLab: view this run with `qwen-cls dashboard {run_dir}` (http://127.0.0.1, Ctrl+C stops it)",
          flush=True)


def _use_project_hint() -> None:
    try:
        from swanlab.sdk.internal.run import greeting
    except ImportError:  # another swanlab layout: its own tip stays
        return
    greeting._print_local_tip = _dashboard_hint


def log_dir_of(out_dir: str | os.PathLike) -> Path:
    """Where a run directory's SwanLab logs live: ``OUT/swanlog``."""
    return Path(out_dir) / LOG_SUBDIR


def run_log_dir(out_dir: str | os.PathLike) -> Path:
    """Where a run into ``out_dir`` logs: ``$QWEN_CLS_SWANLOG_DIR`` when set (``qwen-cls sweep`` sets it to
    ``SWEEP/swanlog``, so one dashboard shows every point), else ``OUT/swanlog``."""
    shared = os.environ.get(SWANLOG_ENV, "").strip()
    return Path(shared) if shared else log_dir_of(out_dir)


def swanlab_callbacks(mode: str | None, out_dir: str | os.PathLike, config: dict, *, project: str = "qwen-cls",
                      experiment_name: str | None = None) -> list:
    """Trainer callbacks that log to SwanLab under ``out_dir/swanlog`` (:func:`run_log_dir`); ``[]`` when disabled.

    ``config`` (see :func:`experiment_config`) is recorded with the run, beside the Trainer's own
    arguments. The run starts when training starts; ``experiment_name`` defaults to ``out_dir``'s name.
    """
    mode = check_mode(mode)
    if mode == "disabled":
        return []
    from swanlab.integration.transformers import SwanLabCallback

    finish()  # a run left open (e.g. a notebook cell run twice): a new training is a new run
    _use_project_hint()
    log_dir = run_log_dir(out_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    callback = SwanLabCallback(project=project, experiment_name=experiment_name or Path(out_dir).resolve().name,
                               log_dir=str(log_dir), mode=SWANLAB_MODE[mode], description=description(config))
    callback.update_config(plain(config))
    return [callback]


def sample_text(sample: dict, *, max_chars: int = 300) -> str:
    """One prediction as text: input (shortened), candidates, prediction, truth."""
    text = str(sample.get("text", sample.get("input", "")))
    if len(text) > max_chars:
        text = text[:max_chars] + "…"
    prediction, truth = sample.get("prediction"), sample.get("output")
    verdict = "right" if prediction == truth else "wrong"
    return (f"input: {text}\ncandidates: {', '.join(map(str, sample.get('category', [])))}\n"
            f"prediction: {prediction}\ntruth: {truth} ({verdict})")


def log_evaluation(metrics: dict, *, confusion_png: str | os.PathLike | None = None,
                   samples: list[dict] | None = None, out_dir: str | os.PathLike | None = None,
                   mode: str | None = None, config: dict | None = None, project: str = "qwen-cls",
                   experiment_name: str | None = None) -> bool:
    """Log accuracy, macro-F1 (and invalid rate, size), the confusion matrix image and sample predictions.

    They go to the active run. With none active (evaluation in a new process, e.g. notebook 04) and
    ``out_dir`` given, a run ``<name>-eval`` is started in ``out_dir/swanlog`` (``mode`` as in
    :func:`swanlab_callbacks`). Returns whether anything was logged.
    """
    import swanlab

    if not swanlab.has_run():
        if out_dir is None or (mode := check_mode(mode)) == "disabled":
            return False
        _use_project_hint()
        log_dir = run_log_dir(out_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        swanlab.init(project=project, name=experiment_name or f"{Path(out_dir).resolve().name}-eval",
                     log_dir=str(log_dir), mode=SWANLAB_MODE[mode], config=plain(config or {}),
                     description=description(config))
    swanlab.log({f"eval/{k}": float(metrics[k]) for k in EVAL_KEYS if metrics.get(k) is not None})
    if confusion_png is not None:
        swanlab.log({"eval/confusion_matrix": swanlab.Image(str(confusion_png),
                                                            caption="rows: truth, columns: prediction")})
    if samples:
        swanlab.log({"eval/samples": [swanlab.Text(sample_text(s)) for s in samples]})
    return True


def finish() -> None:
    """Close the active SwanLab run, if any."""
    import swanlab

    if swanlab.has_run():
        swanlab.finish()
