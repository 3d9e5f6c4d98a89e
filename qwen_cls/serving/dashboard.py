"""``qwen-cls dashboard``: a run folder's SwanLab logs, served on 127.0.0.1 and nothing else.

It runs swanboard's own web app (what ``swanlab watch`` runs) inside :class:`Guard`, because upstream
(swanboard 0.1.10b2) trusts every request: its media route joins the URL path onto the media folder, so
``/api/v1/media/%2Fetc%2Fpasswd?...`` or ``..%2F`` paths return any file the user can read; a missing file
gives a 500 that names the full path; and any ``Host`` header is accepted, so a web page using DNS
rebinding could read files through a learner's open dashboard. The guard answers media requests itself,
confined to regular files inside the run's ``swanlog/``; refuses requests whose ``Host`` is not the bound
address, changes (PATCH, DELETE, ...) from another ``Origin`` and API calls a browser marks as
cross-site (``Sec-Fetch-Site``: swanboard's ``GET .../stop`` changes state); and never echoes paths or exceptions.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import parse_qs

from ..local_server import HOST, LocalGuard
from ..tracking import LOG_SUBDIR, TrackingError, dashboard_available, log_dir_of

DEFAULT_PORT = 5092  # swanlab watch's default
DATABASE = "runs.swanlab"  # the database swanboard keeps beside the run folders
MEDIA_PREFIX = "/api/v1/media/"


def find_log_dir(path: str | os.PathLike) -> Path:
    """The folder holding the dashboard database: ``DIR/swanlog`` or ``DIR`` itself."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: not a folder; give the run folder (holding {LOG_SUBDIR}/) or its "
                                 f"{LOG_SUBDIR} folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    for candidate in (log_dir_of(path), path):
        if (candidate / DATABASE).is_file():
            return candidate.resolve()
    if any(log_dir_of(path).glob("run-*")) or any(path.glob("run-*")):
        raise TrackingError(f"{path}: its SwanLab logs were written in offline mode, which the dashboard "
                            "cannot show; train again with swanlab_mode='local'")
    raise FileNotFoundError(f"{path}: no SwanLab logs ({LOG_SUBDIR}/{DATABASE}); train with "
                            "swanlab_mode='local' into this folder first (e.g. `make demo` for runs/demo)")


# ---------------------------------------------------------------- the port


def _binds(port: int, *, reuse: bool) -> bool:
    for host in ("0.0.0.0", HOST):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if reuse:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                return False
    return True


def port_is_free(port: int) -> bool:
    """True when ``port`` can be bound without ``SO_REUSEADDR``."""
    return _binds(port, reuse=False)


def wait_for_port(port: int, timeout: float = 75.0) -> bool:
    """True once ``port`` is free. A port that only lingers after a closed server (TCP TIME_WAIT, up to a
    minute on Linux) is waited for; one a live server holds is reported at once (False)."""
    deadline = time.monotonic() + timeout
    announced = False
    while not port_is_free(port):
        if not _binds(port, reuse=True) or time.monotonic() > deadline:
            return False  # a server listens there (or the port never came free)
        if not announced:
            print(f"port {port} was closed moments ago; waiting for the system to release it ...", flush=True)
            announced = True
        time.sleep(0.5)
    return True


# ---------------------------------------------------------------- the guard


def url(port: int) -> str:
    """The dashboard's address as a browser writes it (no ``:80`` for port 80)."""
    return f"http://{HOST}/" if port == 80 else f"http://{HOST}:{port}"


async def _send_error(send, status: int, message: str) -> None:
    """A JSON answer shaped like swanboard's own errors, naming no path."""
    body = json.dumps({"code": status, "message": message, "data": None}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def media_file(log_dir: Path, run_id: str, tag_folder: str, relative: str) -> Path | None:
    """The regular file ``relative`` of ``log_dir/run_id/media/tag_folder``, or None when it is not there or
    would lie outside the run's ``media/`` (absolute paths, ``..``, symlinks leading out; swanlab's own
    symlinks from a tag folder to ``media/image/`` stay inside)."""
    if not relative or "\x00" in relative or "\\" in relative or relative.startswith("/"):
        return None
    if any(part in ("", ".", "..") for part in relative.split("/")):
        return None
    root = log_dir.resolve()
    media = (root / str(run_id) / "media").resolve()
    target = (media / str(tag_folder) / relative).resolve()
    if not (media.is_relative_to(root) and target.is_relative_to(media)) or not target.is_file():
        return None
    return target


class Guard(LocalGuard):
    """swanboard's app behind the project's rule for local servers (:class:`qwen_cls.local_server.LocalGuard`: own
    ``Host`` only, changes only from its own page, its ``/api/`` not for another site's page); media confined to
    ``log_dir``, no echoes."""

    messages = {"host": "this dashboard answers only {base}",
                "origin": "changes are accepted only from the dashboard's own page",
                "cross-site": "the dashboard's API answers only its own page"}  # e.g. swanboard's GET .../stop

    def __init__(self, app, log_dir: str | os.PathLike, port: int):
        hosts = {f"{HOST}:{port}", f"localhost:{port}"}
        if port == 80:  # a browser leaves the default port out of Host (and Origin): http://127.0.0.1/
            hosts |= {HOST, "localhost"}
        super().__init__(app, hosts, base=url(port), cross_site_prefix="/api/")
        self.log_dir, self.port = Path(log_dir).resolve(), port

    async def inner(self, scope, receive, send, headers):
        if scope["type"] == "http" and scope["path"].startswith(MEDIA_PREFIX):
            return await self.media(scope, receive, send)
        return await self.app(scope, receive, send)

    async def refuse(self, send, status: int, message: str, headers: list | None = None) -> None:
        await _send_error(send, status, message)

    async def media(self, scope, receive, send):
        """swanboard's media route, confined: ``/api/v1/media/<file>?tag=...&experiment_id=...``."""
        from starlette.responses import FileResponse

        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        target = None
        try:
            from swanboard.db import Experiment, Tag

            experiment_id = int(query["experiment_id"][0])
            run_id = Experiment.get(Experiment.id == experiment_id).run_id
            tag = Tag.filter(Tag.name == query["tag"][0], Tag.experiment_id == experiment_id).first()
            target = media_file(self.log_dir, run_id, tag.folder, scope["path"][len(MEDIA_PREFIX):])
        except Exception:  # unknown experiment or tag, missing parameters: the same answer as a missing file
            target = None
        if target is None:
            return await _send_error(send, 404, "media not found")
        return await FileResponse(str(target))(scope, receive, send)


def _quiet_errors() -> None:
    """Make swanboard's error middleware answer 500s without the exception text (which names paths)."""
    import swanboard.app
    from swanboard.module.resp import UNEXPECTED_ERROR_500

    async def catch_error(request, call_next):
        try:
            return await call_next(request)
        except Exception:
            return UNEXPECTED_ERROR_500("internal error")

    swanboard.app.catch_error = catch_error  # the app's middleware looks this name up on each request


def guarded_app(log_dir: str | os.PathLike, port: int):
    """swanboard's app reading ``log_dir``, wrapped in :class:`Guard`."""
    os.environ["SWANLAB_LOG_DIR"] = str(log_dir)  # swanboard reads it when first imported
    from swanboard.db import connect

    connect(path=str(log_dir))
    import swanboard.app

    _quiet_errors()
    return Guard(swanboard.app.app, log_dir, port)


def serve(log_dir: str | os.PathLike, port: int) -> None:
    """Serve ``log_dir`` on http://127.0.0.1:``port`` until Ctrl+C or SIGTERM."""
    import uvicorn

    uvicorn.run(guarded_app(log_dir, port), host=HOST, port=port, log_level="warning")


def cmd_dashboard(args) -> int:
    log_dir = find_log_dir(args.dir)
    if not dashboard_available():
        raise TrackingError("the dashboard needs the swanboard package: pip install 'swanlab[dashboard]'")
    if not 1 <= args.port <= 65535:
        raise TrackingError(f"--port {args.port}: pick a port between 1 and 65535")
    if not wait_for_port(args.port):
        raise TrackingError(f"--port {args.port} is in use (another dashboard?); stop it or pick another port")
    print(f"SwanLab dashboard of {log_dir}: {url(args.port)}  (Ctrl+C stops it)", flush=True)
    serve(log_dir, args.port)
    return 0


def register(subparsers) -> None:
    """Add ``qwen-cls dashboard DIR [--port N]``."""
    p = subparsers.add_parser("dashboard", help="serve a run directory's SwanLab logs on 127.0.0.1")
    p.add_argument("dir", help="run directory (holding swanlog/) or a swanlog folder")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    p.set_defaults(func=cmd_dashboard)
