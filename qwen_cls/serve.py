"""The server of ``qwen-cls serve``: a model behind an HTTP JSON API and a page, on 127.0.0.1 (FastAPI + uvicorn),
and the same server in a thread of this process (:func:`serve_in_background`, notebook 07).

``POST /v1/classify`` takes one row ``{"text": ..., "candidates": [...]}`` or a list of rows and answers, per
row, ``prediction``, ``scores``, ``probabilities`` and ``confidence`` (the top probability), plus ``abstain``
when the row's ``min_confidence`` or ``--min-confidence`` gives a threshold: the numbers ``qwen-cls predict``
gives for the same rows, because both score with :func:`~qwen_cls.predict.predict_rows`. What a request may hold
and the 400/413/422 answers are :mod:`qwen_cls.serve_requests`'; the model thread that micro-batches requests
into forward passes (and the 503 of a full queue) is :mod:`qwen_cls.serve_batcher`'s. ``GET /health`` says whether
it is up, its counters and limits, and what it loaded; ``/docs`` is FastAPI's OpenAPI page (Swagger UI), its
scripts, CSS and icon served by this server from the PyPI package ``fastapi-offline`` (so it works without
internet), and ``/openapi.json`` the schema it shows; ``/`` is a page to try it (``serve_page.html``).

**Who may call it** (:class:`ServeGuard`, the project's rule for local servers,
:class:`~qwen_cls.local_server.LocalGuard`). Only requests whose ``Host`` header names the bound address are
answered (a web page using DNS rebinding cannot reach the API through a learner's browser), POSTs from another
site's page (``Origin``, ``Sec-Fetch-Site``) are refused, as in ``qwen-cls dashboard``; with an API key, ``/v1/*``
needs ``Authorization: Bearer KEY`` (compared in constant time); a body over ``--max-body-bytes`` is refused (413)
before the app reads it. The command, its options and what it watches: :mod:`qwen_cls.serving.serve_command`.

Taught in: 07
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .local_server import HOST, SAFE_METHODS, LocalGuard, is_loopback
from .predict import check_row_fits
from .serve_batcher import Batcher, QueueFull, RunChanged
from .serve_requests import Limits, RequestError, answer, parse_rows

DEFAULT_PORT = 8092
STATIC = Path(__file__).with_name("serve_page.html")  # the page at /
DOCS_ASSETS = "/docs/assets/"  # Swagger UI's files, from the installed package `fastapi-offline`, served at /docs
DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


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


# ---------------------------------------------------------------- running it


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


def servable_rows(rows: list[dict], tokenizer, *, max_length: int, limits: Limits) -> tuple[list[int], str | None]:
    """(indices of the request bodies in ``rows`` that a server with ``limits`` and ``max_length`` answers, a note
    on the others or None): each row is checked as one request, by the server's own checks (body size, then
    :func:`~qwen_cls.serve_requests.parse_rows`, then :meth:`~qwen_cls.serve_batcher.Batcher.check_rows`' fit within
    ``max_length``). Notebook 07 sends only those
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
                        tiny_model: bool = False) -> Iterator[str]:
    """The same server as ``qwen-cls serve`` (guard, batcher, page), on a free port of 127.0.0.1, in a thread of
    this process, around a model already loaded (notebook 07 serves the run it is part of, which ``--run``
    would refuse while ``qwen-cls run`` still writes it). Yields its URL; leaving the block stops it, answering
    what was accepted."""
    import uvicorn

    limits = limits or Limits()
    describe = {"max_length": max_length, "tiny_model": tiny_model}
    sock = bind(HOST, 0)
    batcher = Batcher(model, tokenizer, max_length=max_length, limits=limits)
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
