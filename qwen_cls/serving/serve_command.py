"""``qwen-cls serve``: a trained run (or an exported model) as an HTTP JSON API and a page, on 127.0.0.1.

The server is the core's (:mod:`qwen_cls.serve`: the guarded app, :mod:`qwen_cls.serve_batcher`'s model thread,
:mod:`qwen_cls.serve_requests`' limits); this command checks every option before a model loads
(:func:`check_serve_options`, exit 2 naming it), binds the socket before the model loads (a taken port fails at
once), loads the run or export as ``qwen-cls predict`` does (:func:`~qwen_cls.predict.load_run`,
:func:`~qwen_cls.predict.load_exported`), so it answers predict's numbers, and names and watches what it loaded
(:mod:`~qwen_cls.serving.served_files`).

- **Who may call it.** A ``--host`` other than a loopback address is refused unless ``--api-key`` is given; with
  a key, ``/v1/*`` needs ``Authorization: Bearer KEY`` (compared in constant time).
- **What it answers from.** Once the adapter and ``run_config.json`` (``--model``: the config and weights) it
  loaded were replaced (``qwen-cls run --overwrite``) or removed, every request and ``/health`` get 503 naming the
  change: restart it.
- **Stopping.** SIGTERM or Ctrl+C: the listening socket closes, every accepted request is answered, the
  process exits 0 (:func:`run_server`).
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from ..hub import TINY
from ..local_server import HOST, is_loopback
from ..predict import check_causal_lm, check_min_confidence, load_exported, load_run
from ..recipe import MAX_LENGTH
from ..serve import DEFAULT_PORT, bind, guarded_app
from ..serve_batcher import Batcher
from ..serve_requests import Limits
from .load_options import add_model_source, check_device, check_max_length, check_run_files, check_run_finished
from .served_files import FolderWatch, loaded_identity, watched_files


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
