"""What every exercise check of notebooks 01-06 is made of (:mod:`qwen_cls.exercises` runs them): :func:`exercise`
registers a check under its id in :data:`REGISTRY`; :class:`NotYet` is raised inside a check with the hint a wrong
answer gets; :func:`run_file` and its kin read the run's own files, a missing one named with the notebook that writes
it; :func:`as_number` and its kin read an answer, a malformed one named with the form it should have; and what
the checks of two chapters share (:func:`accuracy_of`, :func:`adapter_shapes`, the hint :func:`wrong_pair`).

Plumbing under: 01, 02, 03, 04, 05, 06
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Callable

from .files import read_jsonl

# Which notebook writes what a check reads: a missing file names the notebook to run first.
MAKERS = {"data": "01_data_conversion", "tokenized": "02_tokenization", "truncation_report.json": "02_tokenization",
          "adapter": "03_lora_training", "run_config.json": "03_lora_training", "train_log.json": "03_lora_training",
          "predictions.jsonl": "04_evaluation", "metrics.json": "04_evaluation", "retriever": "05_rag",
          "rag_metrics.json": "05_rag", "rag_timing.json": "05_rag", "seq_cls": "06_approaches",
          "approaches.json": "06_approaches"}


class NotYet(Exception):
    """Raised inside a check: the answer is wrong (or malformed); the message is the hint."""


REGISTRY: dict[str, Callable] = {}


def exercise(key: str):
    """Register the decorated check as exercise ``key`` (``"NN.K"``: notebook NN, exercise K)."""
    def register(function):
        REGISTRY[key] = function
        return function
    return register


def run_file(out_dir, *parts) -> Path:
    """``out_dir/parts``; a missing one is a hint naming the notebook that writes it."""
    path = Path(out_dir).joinpath(*parts)
    if not path.exists():
        maker = MAKERS.get(parts[0], "前面的 notebook")
        raise NotYet(f"还不能检查 (cannot check yet): {path} 不存在, 请先用同一个 out_dir 运行 {maker}.ipynb")
    return path


def run_json(out_dir, name: str):
    return json.loads(run_file(out_dir, name).read_text(encoding="utf-8"))


def run_rows(out_dir, split: str) -> list[dict]:
    return read_jsonl(run_file(out_dir, "data", f"{split}.jsonl"))


def compared_test_rows(out_dir) -> list[dict]:
    """The test rows 05 and 06 compare: the first ``n_test`` of ``data/test.jsonl`` (``rag_timing.json``)."""
    return run_rows(out_dir, "test")[:run_json(out_dir, "rag_timing.json")["n_test"]]


def as_number(answer, what: str) -> float:
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise NotYet(f"{what} 应该是一个数 (a number), 你给的是 {type(answer).__name__}: {answer!r}")
    if not math.isfinite(answer):
        raise NotYet(f"{what} 应该是一个有限的数 (a finite number), 你给的是 {answer!r}")
    return float(answer)


def as_integer(answer, what: str) -> int:
    value = as_number(answer, what)
    if value != int(value):
        raise NotYet(f"{what} 应该是一个整数 (an integer), 你给的是 {answer!r}")
    return int(value)


def as_pair(answer, what: str) -> tuple:
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise NotYet(f"{what} 应该是两个值 (a pair), 写成 (第一个, 第二个); 你给的是 {answer!r}")
    return tuple(answer)


def as_triple(answer, what: str) -> tuple:
    if not isinstance(answer, (tuple, list)) or len(answer) != 3:
        raise NotYet(f"{what} 应该是三个值, 写成 (最短, 中位数, 最长); 你给的是 {answer!r}")
    return tuple(answer)


def equal_to_3_places(a: float, b: float, tol: float = 5e-4) -> bool:
    """Equal up to rounding to 3 decimals (accuracies and their differences)."""
    return abs(a - b) <= tol


def accuracy_of(y_true, predictions) -> float:
    from .metrics import classification_metrics

    return classification_metrics(list(y_true), list(predictions))["accuracy"]


def adapter_shapes(folder: Path) -> dict[str, tuple]:
    """Tensor name -> shape in a saved adapter, read from the safetensors header (nothing loaded)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def wrong_pair(got: tuple[float, float], expected: tuple[float, float], names: tuple[str, str], how: str):
    """The hint for a pair of accuracies that is not ``expected``: the two swapped, or which one is off and ``how``
    to compute it."""
    if equal_to_3_places(got[0], expected[1]) and equal_to_3_places(got[1], expected[0]):
        return NotYet(f"顺序反了: ({names[0]} 的 accuracy, {names[1]} 的 accuracy)")
    which = names[0] if not equal_to_3_places(got[0], expected[0]) else names[1]
    return NotYet(f"{which} 的不对: {how}")
