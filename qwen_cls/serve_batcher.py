"""The model thread of ``qwen-cls serve``: micro-batching requests into forward passes (:class:`Batcher`).

One worker thread owns the model. Requests queue up; the worker takes the first and every request that arrives
within ``--max-wait-ms`` (up to ``--batch-size`` rows), so concurrent requests share one forward pass. The queue
holds at most ``--queue-size`` requests; one more is refused (:class:`QueueFull`, answered 503 with
``Retry-After``). A forward pass holds at most ``--batch-size`` rows and ``--pass-candidates`` candidates: a large
request is scored in several passes, one row of each request in progress per round, so a request that arrives
after it is answered between them. A pass that fails is scored again row by row: only the request whose row fails
gets a 500. A row ``predict`` could not score (candidates so long that ``max_length`` leaves no room for the text)
is refused when the request arrives (:meth:`Batcher.check_rows`, 422 with ``predict``'s message), before it could
share a forward pass. Given a watch (``qwen-cls serve``'s :class:`~qwen_cls.serving.served_files.FolderWatch`),
a pass is refused (:class:`RunChanged`) once the files the model came from were replaced.

Taught in: 07
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from .predict import check_row_fits, predict_rows
from .serve_requests import Limits, RequestError


class Watch(Protocol):
    """What a :class:`Batcher` asks before and after each pass: ``check()`` is None while the model's files are
    those loaded, else a message saying what changed and what to do."""

    def check(self) -> str | None: ...


class RunChanged(Exception):
    """The files the model was loaded from were replaced or removed since: the server no longer answers."""


class QueueFull(Exception):
    """More requests are waiting than ``--queue-size``."""


@dataclass
class _Job:
    rows: list
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    results: list = field(default_factory=list)
    taken: int = 0  # rows put into a forward pass so far
    scored: int = 0
    failed: bool = False


_STOP = object()


class Batcher:
    """One thread owning the model. It scores in passes of at most ``batch_size`` rows and ``pass_candidates``
    candidates (one row at least), each one :func:`~qwen_cls.predict.predict_rows` call. A pass takes rows from the
    requests in progress in turn, one row each per round, and from new requests (the first one waits
    ``max_wait_ms`` for others), so concurrent requests share passes and a large request, split into many passes,
    lets the requests that arrive after it through between them. A pass that fails is scored again row by row:
    only the request whose row fails gets the error. With a ``watch``, a pass is refused (:class:`RunChanged`) once
    the files the model came from were replaced, checked before and after each pass."""

    def __init__(self, model, tokenizer, *, max_length: int, limits: Limits, watch: Watch | None = None):
        self.model, self.tokenizer, self.max_length, self.limits = model, tokenizer, max_length, limits
        self.watch = watch
        self.jobs: queue.Queue = queue.Queue(maxsize=limits.queue_size)
        self.thread = threading.Thread(target=self._run, name="qwen-cls-serve-model", daemon=True)
        self.stats = {"accepted": 0, "answered": 0, "failed": 0, "batches": 0, "rows": 0}
        self.pass_sizes: list[tuple[int, int]] = []  # (rows, candidates) of the latest passes, for the tests
        # Requests are checked (does each row fit max_length?) in their own thread with their own tokenizer: the
        # model thread's is busy scoring, and a fast tokenizer is not to be shared between threads.
        self._check_tokenizer = copy.deepcopy(tokenizer)
        self._checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qwen-cls-serve-check")

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Let the worker finish what is queued, then end it."""
        if self.thread.is_alive():
            self.jobs.put(_STOP)
            self.thread.join(timeout)
        self._checker.shutdown(wait=False)

    def check_rows(self, rows: list, single: bool) -> None:
        """:class:`RequestError` 422 naming the first row ``predict`` could not score within ``max_length``
        (:func:`~qwen_cls.predict.check_row_fits`, its message), before the row can share a forward pass."""
        for i, row in enumerate(rows):
            try:
                check_row_fits(self._check_tokenizer, row.text, list(row.category), max_length=self.max_length)
            except ValueError as exc:
                raise RequestError(422, f"{'the row' if single else f'row {i}'}: {exc}") from None

    async def check(self, rows: list, single: bool) -> None:
        """:meth:`check_rows` in the checking thread."""
        await asyncio.get_running_loop().run_in_executor(self._checker, self.check_rows, rows, single)

    def submit(self, rows: list) -> concurrent.futures.Future:
        """Queue ``rows``; their results arrive on the returned future. :class:`QueueFull` when the queue is."""
        job = _Job(rows, results=[None] * len(rows))
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        self.stats["accepted"] += 1
        return job.future

    def _take(self, active: list, wait: bool) -> bool:
        """Move queued requests into ``active`` while the next pass may take a row of each (``batch_size``
        requests at most; the others wait in the bounded queue). With ``wait`` (the first request of an idle
        worker) it waits up to ``max_wait_ms`` for others while fewer than ``batch_size`` rows are at hand. False
        once the stop mark was taken."""
        deadline = time.monotonic() + (self.limits.max_wait_ms / 1000 if wait else 0)
        while len(active) < self.limits.batch_size:
            short = sum(len(job.rows) - job.taken for job in active) < self.limits.batch_size
            left = deadline - time.monotonic()
            try:
                job = self.jobs.get(timeout=left) if short and left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                return True
            if job is _STOP:
                return False
            if job.future.set_running_or_notify_cancel():  # a cancelled request is dropped
                active.append(job)
        return True

    def _next_pass(self, active: list) -> list[tuple[_Job, int]]:
        """(request, row index) pairs for one pass: a row of each request in turn, within the pass's bounds."""
        picked, candidates = [], 0
        while len(picked) < self.limits.batch_size:
            added = False
            for job in active:
                if job.taken == len(job.rows) or len(picked) == self.limits.batch_size:
                    continue
                n = len(job.rows[job.taken].category)
                if picked and candidates + n > self.limits.pass_candidates:
                    continue
                picked.append((job, job.taken))
                job.taken += 1
                candidates += n
                added = True
            if not added:
                break
        return picked

    def _run(self) -> None:
        active: list[_Job] = []  # requests with rows not yet answered, oldest first
        running = True
        while True:
            if not active:
                if not running:
                    return
                job = self.jobs.get()
                if job is _STOP:
                    return
                if not job.future.set_running_or_notify_cancel():
                    continue
                active.append(job)
                running = self._take(active, wait=True)
            elif running:
                running = self._take(active, wait=False)
            self._score(self._next_pass(active))
            active = [job for job in active if not job.failed and job.scored < len(job.rows)]

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if not job.failed:
            job.failed = True
            self.stats["failed"] += 1
            job.future.set_exception(exc)

    def _score(self, picked: list[tuple[_Job, int]]) -> None:
        picked = [(job, i) for job, i in picked if not job.failed]
        if not picked:
            return
        changed = self.watch.check() if self.watch is not None else None
        if changed is None:
            try:
                results = predict_rows(self.model, self.tokenizer, [job.rows[i] for job, i in picked],
                                       max_length=self.max_length, batch_size=len(picked))
            except Exception as exc:  # the model failed (a row it cannot score, out of memory, ...)
                if len(picked) > 1:  # shared with other requests: each row again alone, so only its request fails
                    for one in picked:
                        self._score([one])
                    return
                self._fail(picked[0][0], exc)
                return
            changed = self.watch.check() if self.watch is not None else None  # replaced during the pass
        if changed is not None:
            for job, _ in picked:
                self._fail(job, RunChanged(changed))
            return
        self.stats["batches"] += 1
        self.stats["rows"] += len(picked)
        self.pass_sizes = [*self.pass_sizes[-99:], (len(picked), sum(len(job.rows[i].category) for job, i in picked))]
        for (job, i), result in zip(picked, results):
            job.results[i] = result
            job.scored += 1
            if job.scored == len(job.rows):
                job.future.set_result(job.results)
                self.stats["answered"] += 1
