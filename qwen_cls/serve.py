"""``qwen-cls serve``: a trained run (or an exported model) as an HTTP JSON API, a page to try it, on 127.0.0.1.

``POST /v1/classify`` takes one row ``{"text": ..., "candidates": [...]}`` or a list of rows and answers, per
row, ``prediction``, ``scores``, ``probabilities`` and ``confidence`` (the top probability), plus ``abstain``
when the row's ``min_confidence`` or ``--min-confidence`` gives a threshold: the numbers ``qwen-cls predict``
gives for the same rows, because both load the model the same way (:func:`~qwen_cls.predict.load_run`,
:func:`~qwen_cls.predict.load_exported`) and score with :func:`~qwen_cls.predict.predict_rows`.
``GET /health`` says whether it is up and what it loaded: ``model``, ``adapter`` and their SHA-256
(``model_sha256``, ``adapter_sha256``: of ``sha256sum``'s listing of the files named in ``*_sha256_of``);
``/docs`` is FastAPI's OpenAPI page (Swagger UI), its scripts, CSS and icon served by this server from the PyPI
package ``fastapi-offline`` (so it works without internet), and ``/openapi.json`` the schema it shows; ``/`` is a
page to try it.

How it serves:

- **One worker thread owns the model.** Requests queue up; the worker takes the first and every request that
  arrives within ``--max-wait-ms`` (up to ``--batch-size`` rows), so concurrent requests share one forward pass
  (micro-batching). The queue holds at most ``--queue-size`` requests; one more is answered 503 with
  ``Retry-After``. A forward pass holds at most ``--batch-size`` rows and ``--pass-candidates`` candidates: a
  large request is scored in several passes, one row of each request in progress per round, so a request that
  arrives after it is answered between them. A pass that fails is scored again row by row: only the request
  whose row fails gets a 500.
- **One client cannot break another.** A row ``predict`` could not score (candidates so long that ``max_length``
  leaves no room for the text) is refused when the request arrives, 422 with ``predict``'s message, before it
  could share a forward pass.
- **What it answers from.** Before and after each pass it checks (``stat``: inode, mtime, size) that the adapter
  and ``run_config.json`` (``--model``: the config and weights) are the files it loaded; once they were replaced
  (``qwen-cls run --overwrite``) or removed, every request and ``/health`` get 503 naming the change: restart it.
- **Limits.** A body over ``--max-body-bytes``, more than ``--max-rows`` rows, a text over
  ``--max-text-chars`` characters or more than ``--max-candidates`` candidates: 413 naming the limit; a body
  that is not JSON: 400; a row that is wrong (no text, fewer than 2 candidates, ...): 422. The message says
  which row and what to fix; a bad request never stops the server.
- **Who may call it.** Only requests whose ``Host`` header names the bound address are answered (a web page
  using DNS rebinding cannot reach the API through a learner's browser), POSTs from another site's page
  (``Origin``, ``Sec-Fetch-Site``) are refused, as in ``qwen-cls dashboard``. A ``--host`` other than a
  loopback address is refused unless ``--api-key`` is given; with a key, ``/v1/*`` needs
  ``Authorization: Bearer KEY`` (compared in constant time).
- **Stopping.** SIGTERM or Ctrl+C: the listening socket closes, every accepted request is answered, the
  process exits 0.

Taught in: 07
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hashlib
import hmac
import json
import os
import queue
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .data import validate_row
from .files import file_sha256
from .hub import TINY
from .local_server import HOST, SAFE_METHODS, LocalGuard, is_loopback
from .manifests import MANIFEST
from .predict import (
    add_model_source,
    check_causal_lm,
    check_device,
    check_max_length,
    check_min_confidence,
    check_row_fits,
    check_run_files,
    load_exported,
    load_run,
    predict_rows,
)
from .recipe import MAX_LENGTH
from .run_record import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_CONFIG, check_run_finished, read_run_config

DEFAULT_PORT = 8092
STATIC = Path(__file__).with_name("serve_page.html")  # the page at /
DOCS_ASSETS = "/docs/assets/"  # Swagger UI's files, from the installed package `fastapi-offline`, served at /docs
DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


@dataclass(frozen=True)
class Limits:
    """What one request may hold; each is named (with its flag) in the 413 that enforces it."""

    max_body_bytes: int = 1 << 20
    max_rows: int = 64
    max_text_chars: int = 10_000
    max_candidates: int = 50
    queue_size: int = 64
    batch_size: int = 8
    max_wait_ms: float = 5.0
    pass_candidates: int = 400  # batch_size x max_candidates: a full pass as before, a large request split

    FLAGS = {"max_body_bytes": "--max-body-bytes", "max_rows": "--max-rows", "max_text_chars": "--max-text-chars",
             "max_candidates": "--max-candidates", "queue_size": "--queue-size", "batch_size": "--batch-size",
             "max_wait_ms": "--max-wait-ms", "pass_candidates": "--pass-candidates"}

    def check(self) -> None:
        """``ValueError`` naming the flag of a limit that is not a positive number (wait: >= 0)."""
        for name, flag in self.FLAGS.items():
            value = getattr(self, name)
            if name == "max_wait_ms":
                if not 0 <= value <= 1000:
                    raise ValueError(f"{flag} must be between 0 and 1000 milliseconds, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")


class RequestError(ValueError):
    """A request the server will not classify: ``status`` (400, 413, 422) and a message saying what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- requests


def parse_rows(body: bytes, limits: Limits) -> tuple[list, list, bool]:
    """(rows, thresholds, single) from a request body: one row object or a list of them.

    ``rows`` are validated like ``qwen-cls predict``'s input (:func:`~qwen_cls.data.validate_row`, so candidates
    are stripped the same way); ``thresholds`` is each row's ``min_confidence`` (or None); ``single`` is True
    when the body was one object (the answer is then one object too)."""
    try:
        obj = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8 text; send JSON encoded as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"the body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); send "
                                '{"text": ..., "candidates": [...]} or a list of such rows') from None
    except RecursionError:  # e.g. 100,000 nested brackets: the parser's depth, not the server, is the limit
        raise RequestError(400, "the body nests JSON arrays or objects too deeply; send "
                                '{"text": ..., "candidates": [...]} or a flat list of such rows') from None
    single = isinstance(obj, dict)
    items = [obj] if single else obj
    if not isinstance(items, list):
        raise RequestError(422, f'expected a row {{"text": ..., "candidates": [...]}} or a list of rows, got '
                                f"{type(obj).__name__}")
    if not items:
        raise RequestError(422, "the list of rows is empty; send at least one row")
    if len(items) > limits.max_rows:
        raise RequestError(413, f"{len(items)} rows in one request; this server's limit is {limits.max_rows} "
                                "(--max-rows): split them into several requests")
    rows, thresholds = [], []
    for i, item in enumerate(items):
        where = "the row" if single else f"row {i}"
        if not isinstance(item, dict):
            raise RequestError(422, f'{where}: expected an object {{"text": ..., "candidates": [...]}}, got '
                                    f"{type(item).__name__}")
        missing = [key for key in ("text", "candidates") if key not in item]
        if missing:
            raise RequestError(422, f"{where}: missing {' and '.join(missing)}; each row needs text and "
                                    "candidates (a list of at least 2 labels)")
        text, candidates = item["text"], item["candidates"]
        if isinstance(text, str) and len(text) > limits.max_text_chars:
            raise RequestError(413, f"{where}: text has {len(text)} characters; this server's limit is "
                                    f"{limits.max_text_chars} (--max-text-chars)")
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise RequestError(422, f'{where}: candidates must be a list of label strings, e.g. ["Sports", "Art"]')
        if len(candidates) > limits.max_candidates:
            raise RequestError(413, f"{where}: {len(candidates)} candidates; this server's limit is "
                                    f"{limits.max_candidates} (--max-candidates)")
        try:
            row = validate_row({"text": text, "category": candidates}, require_output=False)
            threshold = item.get("min_confidence")
            check_min_confidence(threshold)
        except ValueError as exc:  # the shared checks name predict's field and flag; name this API's
            message = str(exc).replace("--min-confidence", "min_confidence").replace("category", "candidates")
            raise RequestError(422, f"{where}: {message}") from None
        rows.append(row)
        thresholds.append(threshold)
    return rows, thresholds, single


def answer(result: dict, threshold: float | None) -> dict:
    """One row's answer: predict's result plus ``confidence`` (the top probability) and, given a threshold,
    ``abstain`` (confidence below it), as ``qwen-cls predict --min-confidence`` marks it."""
    out = {**result, "confidence": result["probabilities"][result["prediction"]]}
    if threshold is not None:
        out["abstain"] = out["confidence"] < threshold
    return out


# ---------------------------------------------------------------- what is loaded


def files_sha256(folder: Path, names: list[str]) -> str:
    """SHA-256 of ``sha256sum``'s listing of ``names`` in ``folder`` (``<hex>  <name>`` lines, in that order): one
    digest for several files, which ``cd FOLDER && sha256sum NAMES... | sha256sum`` gives too."""
    listing = "".join(f"{file_sha256(Path(folder) / name)}  {name}\n" for name in names)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def model_files(folder: Path) -> list[str]:
    """The files that say which model a folder holds: its manifest when it has one (it lists every file's size and
    SHA-256), else ``config.json`` and the ``*.safetensors`` weights."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return [MANIFEST]
    return ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]


def loaded_identity(*, run=None, model=None) -> dict:
    """What ``/health`` says is loaded for ``--run RUN`` or ``--model FOLDER``: ``model`` (the base model as
    named: ``tiny``, a folder, a hub id), ``model_path`` (its folder), ``model_sha256`` over ``model_sha256_of``
    (:func:`files_sha256`: the folder's manifest, else its config and weights); for a run also ``run``,
    ``adapter`` (its folder) and ``adapter_sha256`` over ``adapter_config.json`` and ``adapter_model.safetensors``
    (``adapter_sha256_of``)."""
    from .model import resolve_model

    if run is not None:
        run = Path(run).resolve()
        base = read_run_config(run)["base_model"]
        folder = resolve_model(base)
        names = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        identity = {"run": str(run), "model": str(base), "model_path": str(folder), "adapter": str(run / ADAPTER),
                    "adapter_sha256": files_sha256(run / ADAPTER, names), "adapter_sha256_of": names}
    else:
        folder = Path(model).resolve()
        identity = {"run": None, "model": str(model), "model_path": str(folder), "adapter": None,
                    "adapter_sha256": None, "adapter_sha256_of": []}
    of = model_files(folder)
    return {**identity, "model_sha256": files_sha256(folder, of), "model_sha256_of": of}


def watched_files(*, run=None, model=None) -> list[Path]:
    """The files whose replacement :class:`FolderWatch` notices: a run's adapter and ``run_config.json``, or a
    ``--model`` folder's ``config.json`` and weights."""
    if run is not None:
        return [Path(run) / ADAPTER / ADAPTER_CONFIG, Path(run) / ADAPTER / ADAPTER_WEIGHTS, Path(run) / RUN_CONFIG]
    return [Path(model) / name for name in ["config.json", *sorted(p.name for p in Path(model).glob("*.safetensors"))]]


class RunChanged(Exception):
    """The files the model was loaded from were replaced or removed since: the server no longer answers."""


class FolderWatch:
    """Notices, with one ``stat`` per file, that the files a model was loaded from were replaced (inode, mtime or
    size changed, e.g. ``qwen-cls run --overwrite`` renamed a new run folder into place) or removed. Once it has
    noticed, it stays so: the loaded model is not the one on disk any more."""

    def __init__(self, files: list[Path], folder: Path, restart: str):
        self.files, self.folder, self.restart = [Path(f) for f in files], Path(folder), restart
        self.signature = self._stat()
        self.changed: str | None = None

    def _stat(self) -> list:
        out = []
        for path in self.files:
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return out

    def check(self) -> str | None:
        """None while the files are those loaded; else a message naming the file and the fix (kept)."""
        if self.changed is None:
            now = self._stat()
            if now != self.signature:
                path, seen = next((p, b) for p, a, b in zip(self.files, self.signature, now) if a != b)
                self.changed = (f"{self.folder} changed since this server loaded its model ({path} was "
                                f"{'removed' if seen is None else 'replaced'}, e.g. by `qwen-cls run --overwrite`); "
                                f"it does not answer from the old model: restart it ({self.restart}) to serve "
                                "the new one")
        return self.changed


# ---------------------------------------------------------------- the worker


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

    def __init__(self, model, tokenizer, *, max_length: int, limits: Limits, watch: FolderWatch | None = None):
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


# ---------------------------------------------------------------- the guard


class ServeGuard(LocalGuard):
    """The project's rule for local servers (:class:`qwen_cls.local_server.LocalGuard`: own ``Host`` only, no
    changes from another site's page), the hosts following ``--host``; then the API key, and the body read here,
    at most ``max_body_bytes`` of it, before the app sees it."""

    def __init__(self, app, host: str, port: int, *, api_key: str | None, max_body_bytes: int):
        names = {host, HOST, "localhost"} if is_loopback(host) else {host}
        names = {f"[{n}]" if ":" in n else n for n in names}  # IPv6 literals appear bracketed in Host
        # bound elsewhere (with a key), the machine's every name may be used: no Host check
        super().__init__(app, {f"{n}:{port}" for n in names}, base=f"http://{sorted(names)[0]}:{port}",
                         check_host=is_loopback(host))
        self.port, self.api_key, self.max_body_bytes = port, api_key, max_body_bytes

    async def inner(self, scope, receive, send, headers):
        method = scope.get("method", "GET")
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""  # the scheme's case does not matter (RFC 7235)
            if not hmac.compare_digest(token.encode("latin-1", "replace"), self.api_key.encode("latin-1")):
                return await self.refuse(send, 401, "missing or wrong API key: send Authorization: Bearer KEY",
                                         [(b"www-authenticate", b"Bearer")])
        if method in SAFE_METHODS:
            return await self.app(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self.refuse(send, 413, f"the body has {declared} bytes; this server's limit is "
                                                f"{self.max_body_bytes} (--max-body-bytes)")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self.refuse(send, 413, f"the body has more than {self.max_body_bytes} bytes; this "
                                                    f"server's limit is {self.max_body_bytes} (--max-body-bytes)")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ---------------------------------------------------------------- the app

ROW_SCHEMA = {
    "type": "object",
    "required": ["text", "candidates"],
    "properties": {
        "text": {"type": "string", "description": "the text to classify"},
        "candidates": {"type": "array", "items": {"type": "string"}, "minItems": 2,
                       "description": "the labels to choose from"},
        "min_confidence": {"type": "number", "minimum": 0, "maximum": 1,
                           "description": "optional: answer abstain=true when the top probability is below it"},
    },
    "example": {"text": "火箭发射成功，卫星进入预定轨道。", "candidates": ["Space", "Sports", "Economy"]},
}
RESULT_SCHEMA = {
    "type": "object",
    "properties": {
        "prediction": {"type": "string", "description": "the most likely candidate"},
        "scores": {"type": "object", "additionalProperties": {"type": "number"},
                   "description": "each candidate's total log-probability"},
        "probabilities": {"type": "object", "additionalProperties": {"type": "number"},
                          "description": "softmax of the scores over the row's candidates"},
        "confidence": {"type": "number", "description": "the prediction's probability"},
        "abstain": {"type": "boolean", "description": "confidence below the threshold (only when one is given)"},
    },
}


def create_app(batcher: Batcher, *, min_confidence: float | None = None, describe: dict | None = None,
               api_key_required: bool = False):
    """The FastAPI app over ``batcher`` (not yet guarded: :func:`guarded_app` wraps it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    state = {"stopping": False}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            state["stopping"] = True
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    app = FastAPI(title="qwen-cls serve", lifespan=lifespan, docs_url=None, redoc_url=None, description=(
        "Classify texts with a qwen-cls run: each row's candidates are scored by the model "
        "(the numbers of `qwen-cls predict`)."))
    add_docs(app)

    def changed() -> str | None:
        return batcher.watch.check() if batcher.watch is not None else None

    @app.get("/health")
    async def health():
        """Up and answering: what is loaded (model, adapter, their SHA-256), the queue, the counters, the limits.
        503 with ``status`` ``"run changed"`` once the files the model was loaded from were replaced."""
        problem = changed()
        limits = batcher.limits
        body = {"status": "run changed" if problem else "stopping" if state["stopping"] else "ok",
                "problem": problem, "queued": batcher.jobs.qsize(), **batcher.stats,
                "batch_size": limits.batch_size, "max_wait_ms": limits.max_wait_ms,
                "pass_candidates": limits.pass_candidates, "max_rows": limits.max_rows,
                "max_text_chars": limits.max_text_chars, "max_candidates": limits.max_candidates,
                "max_body_bytes": limits.max_body_bytes, **(describe or {})}
        return JSONResponse(body, status_code=503 if problem else 200)

    async def classify(request: Request):
        """Classify one row or a list of rows."""
        try:
            rows, thresholds, single = parse_rows(await request.body(), batcher.limits)
            await batcher.check(rows, single)  # a row predict could not score is refused alone, with its message
        except RequestError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        if (problem := changed()) is not None:
            return JSONResponse({"detail": problem}, status_code=503)
        try:
            future = batcher.submit(rows)
        except QueueFull:
            return JSONResponse({"detail": f"busy: {batcher.limits.queue_size} requests are waiting "
                                           "(--queue-size); retry shortly"},
                                status_code=503, headers={"Retry-After": "1"})
        try:
            results = await asyncio.wrap_future(future)
        except RunChanged as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)
        except Exception as exc:
            return JSONResponse({"detail": f"the model failed on this request ({type(exc).__name__})"},
                                status_code=500)
        answers = [answer(r, t if t is not None else min_confidence) for r, t in zip(results, thresholds)]
        return answers[0] if single else answers

    classify.__annotations__["request"] = Request  # a real class: this module's annotations are strings
    app.post("/v1/classify", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "oneOf": [ROW_SCHEMA, {"type": "array", "items": ROW_SCHEMA}]}}}},
        "responses": {"200": {"description": "one answer per row (an object for an object, a list for a list)",
                              "content": {"application/json": {"schema": {
                                  "oneOf": [RESULT_SCHEMA, {"type": "array", "items": RESULT_SCHEMA}]}}}},
                      "400": {"description": "not JSON"}, "413": {"description": "over a limit (named)"},
                      "422": {"description": "a row is wrong (which row, what to fix)"},
                      "503": {"description": "the queue is full (retry after Retry-After seconds), or the run "
                                             "folder was replaced since the server started (restart it)"}}})(classify)

    page = STATIC.read_text(encoding="utf-8").replace("__API_KEY_REQUIRED__", json.dumps(api_key_required))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; "
                                           "script-src 'unsafe-inline'; style-src 'unsafe-inline'",
                                           "X-Frame-Options": "DENY"})

    return app


def docs_assets() -> Path:
    """The folder of Swagger UI's files in the installed package ``fastapi-offline`` (read, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    folder = Path(spec.origin).parent / "static" if spec is not None and spec.origin else None
    if folder is None or not all((folder / name).is_file() for name in DOCS_FILES):
        raise FileNotFoundError("Swagger UI's files (the PyPI package fastapi-offline) are not installed: "
                                "run `make setup` (or pip install fastapi-offline)")
    return folder


def add_docs(app) -> None:
    """``/docs``: FastAPI's Swagger UI page (:func:`fastapi.openapi.docs.get_swagger_ui_html`, its documented
    self-hosting) with its script, CSS and icon from :func:`docs_assets`, served at :data:`DOCS_ASSETS` by this
    app, behind the same guard as every route; nothing is fetched from another machine."""
    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import FileResponse, JSONResponse

    folder = docs_assets()

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
                                   swagger_js_url=DOCS_ASSETS + "swagger-ui-bundle.js",
                                   swagger_css_url=DOCS_ASSETS + "swagger-ui.css",
                                   swagger_favicon_url=DOCS_ASSETS + "favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from swagger.io

    @app.get(app.swagger_ui_oauth2_redirect_url, include_in_schema=False)
    async def oauth2_redirect():
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(DOCS_ASSETS + "{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in DOCS_FILES:  # only the named files: never a path into the package folder
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(folder / name, media_type=DOCS_FILES[name],
                            headers={"Cache-Control": "public, max-age=86400"})


def guarded_app(batcher: Batcher, *, host: str = HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
                min_confidence: float | None = None, describe: dict | None = None):
    """The app inside :class:`ServeGuard`."""
    app = create_app(batcher, min_confidence=min_confidence, describe=describe,
                     api_key_required=api_key is not None)
    return ServeGuard(app, host, port, api_key=api_key, max_body_bytes=batcher.limits.max_body_bytes)


# ---------------------------------------------------------------- the command


def check_serve_options(*, run=None, model=None, host: str = HOST, port: int = DEFAULT_PORT,
                        api_key: str | None = None, min_confidence=None, max_length=None, device=None,
                        limits: Limits) -> None:
    """Every option checked before a model loads (exit 2, naming it)."""
    if (run is None) == (model is None):
        raise ValueError("give exactly one of --run RUN_DIR or --model MODEL_DIR")
    for option, folder in (("--run", run), ("--model", model)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{option} {folder}: no such folder")
    if run is not None:
        check_run_finished(run)  # marked incomplete, being written, or never evaluated: refused, as by predict
    if not is_loopback(host) and not api_key:
        raise ValueError(f"--host {host} would let other machines call this server; give --api-key KEY too (callers "
                         "then send Authorization: Bearer KEY), or keep the default --host 127.0.0.1")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable() and " " not in api_key):
        raise ValueError("--api-key must be printable ASCII without spaces (HTTP headers carry it as ASCII text; e.g. "
                         "`python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    if api_key is not None and len(api_key) < 16:
        raise ValueError("--api-key must be at least 16 characters (e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe())'`)")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: pick a port between 1 and 65535 (0: any free port, printed at start)")
    check_min_confidence(min_confidence)
    check_max_length(max_length)
    check_device(device)
    limits.check()
    if run is not None:
        check_run_files(run)  # its config or adapter damaged: named, as by predict
    if model is not None:
        check_causal_lm(model)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``ValueError`` naming ``--port`` when it is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another port "
                         "or stop what uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(app, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or Ctrl+C; accepted requests are answered before it returns."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # a graceful stop is the asked-for end: no re-raised signal, exit 0
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list) and sig in (signal.SIGTERM, signal.SIGINT) and not self.force_exit:
                captured.remove(sig)

    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=120)
    Server(config).run(sockets=[sock])


def servable_rows(rows: list[dict], tokenizer, *, max_length: int, limits: Limits) -> tuple[list[int], str | None]:
    """(indices of the request bodies in ``rows`` that a server with ``limits`` and ``max_length`` answers, a note
    on the others or None): each row is checked as one request, by the server's own checks (body size, then
    :func:`parse_rows`, then :meth:`Batcher.check_rows`' fit within ``max_length``). Notebook 07 sends only those
    rows in its load test, and prints the note (how many skipped, why) instead of counting errors. ``ValueError``
    (with the note) when no row is left."""
    keep, why = [], {}
    for i, row in enumerate(rows):
        body = json.dumps(row, ensure_ascii=False).encode("utf-8")  # as serve_client sends it
        try:
            if len(body) > limits.max_body_bytes:
                raise RequestError(413, f"the body has {len(body)} bytes; this server's limit is "
                                        f"{limits.max_body_bytes} (--max-body-bytes)")
            parsed, _, _ = parse_rows(body, limits)
            try:
                check_row_fits(tokenizer, parsed[0].text, list(parsed[0].category), max_length=max_length)
            except ValueError as exc:
                raise RequestError(422, f"the row: {exc}") from None
        except RequestError as exc:
            message = str(exc).removeprefix("the row: ")
            flag = next((f for f in Limits.FLAGS.values() if f"({f})" in message),
                        f"max_length={max_length}" if "leaves no room" in message else f"{exc.status}")
            why.setdefault(flag, []).append((i, message))
        else:
            keep.append(i)
    if not why:
        return keep, None
    shown = "; ".join(f"{len(found)} over {flag} (e.g. row {found[0][0]}: "
                      f"{found[0][1][:160]}{'...' if len(found[0][1]) > 160 else ''})" for flag, found in why.items())
    note = (f"skipped {len(rows) - len(keep)} of {len(rows)} rows that this server refuses (as it would any "
            f"client's): {shown}")
    if not keep:
        raise ValueError(f"{note}; no row is left to send")
    return keep, note


@contextmanager
def serve_in_background(model, tokenizer, *, max_length: int, limits: Limits | None = None,
                        tiny_model: bool = False, run_dir=None) -> Iterator[str]:
    """The same server as ``qwen-cls serve`` (guard, batcher, page), on a free port of 127.0.0.1, in a thread of
    this process, around a model already loaded (notebook 07 serves the run it is part of, which ``--run``
    would refuse while ``qwen-cls run`` still writes it). Yields its URL; leaving the block stops it, answering
    what was accepted. With ``run_dir`` (the run the model was loaded from), ``/health`` names it with its digests
    (:func:`loaded_identity`) and the server stops answering once its adapter is replaced (:class:`FolderWatch`)."""
    import uvicorn

    limits = limits or Limits()
    describe = {"max_length": max_length, "tiny_model": tiny_model}
    watch = None
    if run_dir is not None:
        watch = FolderWatch(watched_files(run=run_dir), Path(run_dir), "`serve_in_background`")
        describe.update(loaded_identity(run=run_dir))
    sock = bind(HOST, 0)
    batcher = Batcher(model, tokenizer, max_length=max_length, limits=limits, watch=watch)
    port = sock.getsockname()[1]
    app = guarded_app(batcher, host=HOST, port=port, describe=describe)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=60))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="qwen-cls-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(90)
        sock.close()


def cmd_serve(args) -> int:
    limits = Limits(max_body_bytes=args.max_body_bytes, max_rows=args.max_rows, max_text_chars=args.max_text_chars,
                    max_candidates=args.max_candidates, queue_size=args.queue_size, batch_size=args.batch_size,
                    max_wait_ms=args.max_wait_ms, pass_candidates=args.pass_candidates)
    check_serve_options(run=args.run, model=args.model, host=args.host, port=args.port, api_key=args.api_key,
                        min_confidence=args.min_confidence, max_length=args.max_length, device=args.device,
                        limits=limits)
    sock = bind(args.host, args.port)  # before the model loads: a taken port fails at once
    try:
        source = ("--run", args.run) if args.run is not None else ("--model", args.model)
        watch = FolderWatch(watched_files(run=args.run, model=args.model), Path(source[1]),  # stat before loading
                            f"`qwen-cls serve {source[0]} {source[1]}`")
        model, tokenizer, config = (load_run(args.run, device=args.device) if args.run is not None
                                    else load_exported(args.model, device=args.device))
        model.eval()
        identity = loaded_identity(run=args.run, model=args.model)  # the digests of the files loaded ...
        if (problem := watch.check()) is not None:  # ... unless they were replaced while loading
            raise ValueError(problem)
        max_length = args.max_length or config.get("max_length", MAX_LENGTH)
        batcher = Batcher(model, tokenizer, max_length=max_length, limits=limits, watch=watch)
        describe = {"max_length": max_length, "tiny_model": config.get("base_model") == TINY, **identity}
        app = guarded_app(batcher, host=args.host, port=sock.getsockname()[1], api_key=args.api_key,
                          min_confidence=args.min_confidence, describe=describe)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"qwen-cls serve: http://{shown}:{sock.getsockname()[1]}  (POST /v1/classify, a page at /, "
              "API docs at /docs; Ctrl+C stops it)", flush=True)
        run_server(app, sock)
    finally:
        sock.close()
    stats = batcher.stats
    print(f"stopped: answered {stats['answered']} of {stats['accepted']} accepted requests "
          f"({stats['failed']} failed)", flush=True)
    return 0


def register(subparsers) -> None:
    """Add ``qwen-cls serve (--run DIR | --model FOLDER) [--host H] [--port N] ...``."""
    p = subparsers.add_parser("serve", help="classify over HTTP: a JSON API and a page, on 127.0.0.1")
    add_model_source(p)
    p.add_argument("--host", default=HOST, help=f"address to listen on (default {HOST}; any other needs --api-key)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY on /v1/* (needed for a non-loopback --host)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="mark rows abstain when their top probability is below P (a row's min_confidence wins)")
    p.add_argument("--max-length", type=int, default=None, help=f"default: the run's max_length (else {MAX_LENGTH})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    defaults = Limits()
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows per forward pass "
                   f"(default {defaults.batch_size})")
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms, help="how long the first request waits "
                   f"for others to share its forward pass (default {defaults.max_wait_ms:g})")
    p.add_argument("--queue-size", type=int, default=defaults.queue_size, help="requests that may wait; more get 503 "
                   f"(default {defaults.queue_size})")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                   help=f"default {defaults.max_body_bytes}")
    p.add_argument("--max-rows", type=int, default=defaults.max_rows, help=f"rows per request (default "
                   f"{defaults.max_rows})")
    p.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars,
                   help=f"characters per text (default {defaults.max_text_chars})")
    p.add_argument("--max-candidates", type=int, default=defaults.max_candidates,
                   help=f"candidates per row (default {defaults.max_candidates})")
    p.add_argument("--pass-candidates", type=int, default=defaults.pass_candidates,
                   help="candidates scored in one forward pass, all its rows together (a larger request is split "
                   f"into several passes, others' rows between them; default {defaults.pass_candidates})")
    p.set_defaults(func=cmd_serve)
