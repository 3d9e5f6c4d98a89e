"""Self-checking exercises of notebooks 01-06: ``check("NN.K", answer, **context)`` says right or wrong.

Each exercise at the end of a notebook has an answer cell (``answer_K = None``) and a check cell, e.g.
``check("01.3", answer_3, out_dir=out_dir)``. The check computes the expected value itself, from the run's own
files (``out_dir``) or the notebook's own objects passed as context (the tokenizer, the raw rows), never from a
typed-in number, so it holds for every profile and every run. It prints one line:

- ``✓ 正确 (right): ...`` with what the answer shows;
- ``✗ 还不对 (not yet): <hint>``: what to compute, and the likely slip when the answer matches one;
- ``… 还没有回答 (not answered yet)`` while the answer is ``None``: nothing is computed and nothing is
  raised, so ``qwen-cls run`` and nbval execute the notebooks with the answers left blank.

:func:`verdict` returns the same as a :class:`Verdict` (tests, scripts); :data:`CHECKS` maps each id to its check,
written in :mod:`~qwen_cls.exercises_data` (01, 02), :mod:`~qwen_cls.exercises_training` (03, 04) and
:mod:`~qwen_cls.exercises_methods` (05, 06), from what :mod:`~qwen_cls.exercises_base` provides.
Solutions, with the answer to put in each cell, are in ``notebooks/solutions/NN_*.md``.

Taught in: 01, 02, 03, 04, 05, 06
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import exercises_data, exercises_methods, exercises_training
from .exercises_base import REGISTRY, NotYet

RIGHT, WRONG, UNANSWERED = "right", "wrong", "unanswered"
MARKS = {RIGHT: "✓ 正确 (right)", WRONG: "✗ 还不对 (not yet)", UNANSWERED: "… 还没有回答 (not answered yet)"}


@dataclass(frozen=True)
class Verdict:
    """One check's outcome: ``status`` is ``right``, ``wrong`` or ``unanswered``; ``text`` the explanation or
    hint. ``str()`` is the line :func:`check` prints; truthy only when right."""

    exercise: str
    status: str
    text: str

    def __bool__(self) -> bool:
        return self.status == RIGHT

    def __str__(self) -> str:
        return f"{MARKS[self.status]} [{self.exercise}]: {self.text}"


# Every check, by id in order: the chapter modules register theirs on import.
CHECKS: dict[str, Callable] = dict(sorted(REGISTRY.items()))
CHAPTERS = (exercises_data, exercises_training, exercises_methods)  # where the checks are written


def answer_name(key: str) -> str:
    """The notebook variable an exercise's answer goes into: ``"01.3"`` -> ``answer_3``."""
    return f"answer_{key.split('.')[1]}"


def verdict(key: str, answer, **context) -> Verdict:
    """Check ``answer`` to exercise ``key`` (``"NN.K"``: notebook NN, exercise K) against the value computed
    from ``context`` (``out_dir=`` the run folder, and what the exercise needs: ``tokenizer=``, ``rows=``,
    ``max_length=``, ``k=``)."""
    if key not in CHECKS:
        raise KeyError(f"no exercise {key!r}; exercises: {', '.join(CHECKS)}")
    if answer is None:
        return Verdict(key, UNANSWERED, f"把答案写进 {answer_name(key)} (put your answer in {answer_name(key)}), "
                                        "再运行这一格 (then run this cell again)")
    try:
        return Verdict(key, RIGHT, CHECKS[key](answer, **context))
    except NotYet as hint:
        return Verdict(key, WRONG, str(hint))


def check(key: str, answer, **context) -> None:
    """Print :func:`verdict`'s line: the notebooks' check cells call this."""
    print(verdict(key, answer, **context))
