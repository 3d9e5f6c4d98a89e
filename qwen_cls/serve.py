"""``qwen-cls serve``: a trained run (or an exported model) as an HTTP JSON API, a page to try it, on 127.0.0.1.

``POST /v1/classify`` takes one row ``{"text": ..., "candidates": [...]}`` or a list of rows and answers, per
row, ``prediction``, ``scores``, ``probabilities`` and ``confidence`` (the top probability), plus ``abstain``
when the row's ``min_confidence`` or ``--min-confidence`` gives a threshold: the numbers ``qwen-cls predict``
gives for the same rows, because both load the model the same way (:func:`~qwen_cls.predict.load_run`,
:func:`~qwen_cls.predict.load_exported`) and score with :func:`~qwen_cls.predict.predict_rows`.
``GET /health`` says whether it is up; ``/docs`` is FastAPI's OpenAPI page (Swagger UI), its scripts, CSS and
icon served by this server from the PyPI package ``fastapi-offline`` (so it works without internet), and
``/openapi.json`` the schema it shows; ``/`` is a page to try it.

How it serves:

- **One worker thread owns the model.** Requests queue up; the worker takes the first and every request that
  arrives within ``--max-wait-ms`` (up to ``--batch-size`` rows), so concurrent requests share one forward pass
  (micro-batching). The queue holds at most ``--queue-size`` requests; one more is answered 503 with
  ``Retry-After``.
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
import hmac
import ipaddress
import json
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
from .hub import TINY
from .predict import (
    add_model_source,
    check_causal_lm,
    check_device,
    check_min_confidence,
    check_run_files,
    load_exported,
    load_run,
    predict_rows,
)
from .recipe import MAX_LENGTH
from .run_record import check_run_finished

HOST = "127.0.0.1"
DEFAULT_PORT = 8092
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
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

    FLAGS = {"max_body_bytes": "--max-body-bytes", "max_rows": "--max-rows", "max_text_chars": "--max-text-chars",
             "max_candidates": "--max-candidates", "queue_size": "--queue-size", "batch_size": "--batch-size",
             "max_wait_ms": "--max-wait-ms"}

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


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


# ---------------------------------------------------------------- the worker


class QueueFull(Exception):
    """More requests are waiting than ``--queue-size``."""


@dataclass
class _Job:
    rows: list
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


_STOP = object()


class Batcher:
    """One thread owning the model: takes queued requests, joins those that arrive within ``max_wait_ms`` (up to
    ``batch_size`` rows) and scores them in one :func:`~qwen_cls.predict.predict_rows` call."""

    def __init__(self, model, tokenizer, *, max_length: int, limits: Limits):
        self.model, self.tokenizer, self.max_length, self.limits = model, tokenizer, max_length, limits
        self.jobs: queue.Queue = queue.Queue(maxsize=limits.queue_size)
        self.thread = threading.Thread(target=self._run, name="qwen-cls-serve-model", daemon=True)
        self.stats = {"accepted": 0, "answered": 0, "failed": 0, "batches": 0, "rows": 0}

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Let the worker finish what is queued, then end it."""
        if self.thread.is_alive():
            self.jobs.put(_STOP)
            self.thread.join(timeout)

    def submit(self, rows: list) -> concurrent.futures.Future:
        """Queue ``rows``; their results arrive on the returned future. :class:`QueueFull` when the queue is."""
        job = _Job(rows)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        self.stats["accepted"] += 1
        return job.future

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is _STOP:
                return
            batch, n, stop = [job], len(job.rows), False
            deadline = time.monotonic() + self.limits.max_wait_ms / 1000
            while n < self.limits.batch_size:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                try:
                    nxt = self.jobs.get(timeout=wait)
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
                n += len(nxt.rows)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list[_Job]) -> None:
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # drop cancelled requests
        rows = [row for job in batch for row in job.rows]
        if not rows:
            return
        try:
            results = predict_rows(self.model, self.tokenizer, rows, max_length=self.max_length,
                                   batch_size=self.limits.batch_size)
        except Exception as exc:  # the model failed (out of memory, ...): these requests get a 500, others go on
            self.stats["failed"] += len(batch)
            for job in batch:
                job.future.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        start = 0
        for job in batch:
            job.future.set_result(results[start:start + len(job.rows)])
            start += len(job.rows)
            self.stats["answered"] += 1


# ---------------------------------------------------------------- the guard


async def _error(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ServeGuard:
    """ASGI wrapper: own ``Host`` only, no changes from another site's page, the API key, the body limit.

    Like :class:`qwen_cls.dashboard.Guard` (the project's rule for local servers), but the allowed hosts follow
    ``--host`` and the body is read here, at most ``max_body_bytes`` of it, before the app sees it."""

    def __init__(self, app, host: str, port: int, *, api_key: str | None, max_body_bytes: int):
        self.app, self.port, self.api_key, self.max_body_bytes = app, port, api_key, max_body_bytes
        self.check_host = is_loopback(host)  # bound elsewhere (with a key), the machine's every name may be used
        names = {host, HOST, "localhost"} if is_loopback(host) else {host}
        names = {f"[{n}]" if ":" in n else n for n in names}  # IPv6 literals appear bracketed in Host
        self.hosts = {f"{n}:{port}".lower() for n in names}
        self.origins = {f"http://{h}" for h in self.hosts}
        self.base = f"http://{sorted(names)[0]}:{port}"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.check_host and headers.get("host", "").lower() not in self.hosts:
            return await _error(send, 403, f"this server answers only requests to {self.base}")
        method = scope.get("method", "GET")
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and origin.lower() not in self.origins:
            return await _error(send, 403, "requests from another site's page are refused")
        if headers.get("sec-fetch-site") == "cross-site":
            return await _error(send, 403, "requests from another site's page are refused")
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""  # the scheme's case does not matter (RFC 7235)
            if not hmac.compare_digest(token.encode("latin-1", "replace"), self.api_key.encode("latin-1")):
                return await _error(send, 401, "missing or wrong API key: send Authorization: Bearer KEY",
                                    [(b"www-authenticate", b"Bearer")])
        if method in SAFE_METHODS:
            return await self.app(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _error(send, 413, f"the body has {declared} bytes; this server's limit is "
                                           f"{self.max_body_bytes} (--max-body-bytes)")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _error(send, 413, f"the body has more than {self.max_body_bytes} bytes; this "
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

    @app.get("/health")
    async def health():
        """Up and answering: the queue, the counters, the batching settings."""
        return {"status": "stopping" if state["stopping"] else "ok", "queued": batcher.jobs.qsize(),
                **batcher.stats, "batch_size": batcher.limits.batch_size,
                "max_wait_ms": batcher.limits.max_wait_ms, **(describe or {})}

    async def classify(request: Request):
        """Classify one row or a list of rows."""
        try:
            rows, thresholds, single = parse_rows(await request.body(), batcher.limits)
        except RequestError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        try:
            future = batcher.submit(rows)
        except QueueFull:
            return JSONResponse({"detail": f"busy: {batcher.limits.queue_size} requests are waiting "
                                           "(--queue-size); retry shortly"},
                                status_code=503, headers={"Retry-After": "1"})
        try:
            results = await asyncio.wrap_future(future)
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
                      "503": {"description": "the queue is full: retry after Retry-After seconds"}}})(classify)

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
                        api_key: str | None = None, min_confidence=None, device=None, limits: Limits) -> None:
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


@contextmanager
def serve_in_background(model, tokenizer, *, max_length: int, limits: Limits | None = None,
                        tiny_model: bool = False) -> Iterator[str]:
    """The same server as ``qwen-cls serve`` (guard, batcher, page), on a free port of 127.0.0.1, in a thread of
    this process, around a model already loaded (notebook 07 serves the run it is part of, which ``--run``
    would refuse while ``qwen-cls run`` still writes it). Yields its URL; leaving the block stops it, answering
    what was accepted."""
    import uvicorn

    limits = limits or Limits()
    sock = bind(HOST, 0)
    batcher = Batcher(model, tokenizer, max_length=max_length, limits=limits)
    port = sock.getsockname()[1]
    app = guarded_app(batcher, host=HOST, port=port, describe={"max_length": max_length, "tiny_model": tiny_model})
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
                    max_wait_ms=args.max_wait_ms)
    check_serve_options(run=args.run, model=args.model, host=args.host, port=args.port, api_key=args.api_key,
                        min_confidence=args.min_confidence, device=args.device, limits=limits)
    sock = bind(args.host, args.port)  # before the model loads: a taken port fails at once
    try:
        model, tokenizer, config = (load_run(args.run, device=args.device) if args.run is not None
                                    else load_exported(args.model, device=args.device))
        model.eval()
        max_length = args.max_length or config.get("max_length", MAX_LENGTH)
        batcher = Batcher(model, tokenizer, max_length=max_length, limits=limits)
        describe = {"max_length": max_length, "tiny_model": config.get("base_model") == TINY}
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
    p.set_defaults(func=cmd_serve)
