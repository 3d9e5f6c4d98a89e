"""Ratios a busy machine cannot flip: the two sides of a comparison run in turn (A B A B ... after warm-up),
and each ratio is the median of the per-pair ratios, reported with their spread.

A busy spell on a shared machine then slows the steps of both sides that fall inside it, instead of all of
one side; one pair that still catches it alone moves the spread, not the median.

* :func:`paired_ratio`: median and ``[min, max]`` of ``numerators[i] / denominators[i]``;
  :func:`add_ratio` writes them as ``result[key]`` and ``result[key + "_spread"]``; :func:`noisy_ratios`
  names the ratios whose spread is wide (more than :data:`NOISY_WIDTH` of the median).
* :class:`Turnstile`: several ``Trainer.train()`` calls, each in its own thread, take their optimizer steps in
  turn, one thread running at a time, each with its own random state, so each trains exactly as it would alone.
"""

from __future__ import annotations

import random
import statistics
import threading

import torch

# A ratio is flagged noisy when its pairs spread wider than this fraction of its median: (max - min) / median.
# Steps of one side vary by a few per cent on a quiet machine, so a quiet run's pairs stay well inside it.
NOISY_WIDTH = 0.25


def paired_ratio(numerators, denominators) -> tuple[float, list[float]]:
    """(median, [min, max]) of the per-pair ratios ``numerators[i] / denominators[i]`` (pairs run in turn)."""
    numerators, denominators = list(numerators), list(denominators)
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need pairs: {len(numerators)} numerators, {len(denominators)} denominators")
    ratios = [n / d for n, d in zip(numerators, denominators)]
    return statistics.median(ratios), [min(ratios), max(ratios)]


def add_ratio(result: dict, key: str, numerators, denominators) -> float:
    """``result[key]`` = the median per-pair ratio, ``result[key + "_spread"]`` = ``[min, max]``; returns it."""
    result[key], result[f"{key}_spread"] = paired_ratio(numerators, denominators)
    return result[key]


def is_noisy(value: float, spread) -> bool:
    """Whether the pairs of a ratio spread wider than :data:`NOISY_WIDTH` of its median."""
    low, high = spread
    return high - low > NOISY_WIDTH * abs(value)


def noisy_ratios(result: dict, prefix: str = "") -> list[str]:
    """The keys of ``result`` (``prefix`` + key) whose ``<key>_spread`` is wide, in order."""
    return [prefix + key[: -len("_spread")] for key, spread in result.items()
            if key.endswith("_spread") and is_noisy(result[key[: -len("_spread")]], spread)]


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        import numpy

        numpy_state = numpy.random.get_state()
    except ImportError:
        numpy_state = None
    return torch.get_rng_state(), cuda, random.getstate(), numpy_state


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, python, numpy_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    if numpy_state is not None:
        import numpy

        numpy.random.set_state(numpy_state)


class Turnstile:
    """Runs jobs (``name -> callable``), each in its own thread, one at a time, passing the turn in order.

    A job holds the turn from :meth:`wait` until :meth:`pass_on`; call both from inside the job (a Trainer
    callback at the end of each optimizer step: ``pass_on(name)`` then ``wait(name)``), and the jobs' steps
    run A B C A B C ... Everything a job does runs inside its turn, so the jobs never run at once. Each job keeps
    its own random state (torch, CUDA, Python, NumPy) across turns, starting from the state :meth:`run` was called
    in: the global generators are swapped at every handover, so a job draws exactly what it would draw running
    alone."""

    def __init__(self, names):
        self.order = list(names)
        self.turn = self.order[0] if self.order else None
        self.handovers = 0
        self._finished: set[str] = set()
        self._rng: dict[str, tuple] = {}
        self._cond = threading.Condition()

    def wait(self, name: str) -> None:
        """Block until it is ``name``'s turn, then restore its random state."""
        with self._cond:
            self._cond.wait_for(lambda: self.turn == name)
        if name in self._rng:
            _set_rng_state(self._rng.pop(name))

    def pass_on(self, name: str, *, finished: bool = False) -> None:
        """Save ``name``'s random state and hand the turn to the next job that has not finished."""
        if not finished:
            self._rng[name] = _rng_state()
        with self._cond:
            if finished:
                self._finished.add(name)
            i = self.order.index(name)
            after = self.order[i + 1:] + self.order[: i + 1]
            self.turn = next((n for n in after if n not in self._finished), None)
            self.handovers += 1
            self._cond.notify_all()

    def run(self, jobs: dict) -> None:
        """Run every job in its own thread (the first in ``order`` first), each starting from the random state
        of this call (as if it ran first); re-raise the first failure."""
        errors: dict[str, BaseException] = {}
        start = _rng_state()
        self._rng = {name: start for name in self.order}

        def target(name, job):
            self.wait(name)
            try:
                job()
            except BaseException as error:  # handed to the caller below, after the others finish
                errors[name] = error
            finally:
                self.pass_on(name, finished=True)

        threads = [threading.Thread(target=target, args=(name, jobs[name]), name=f"turnstile-{name}", daemon=True)
                   for name in self.order]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name in self.order:
            if name in errors:
                raise errors[name]
