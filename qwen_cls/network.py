"""Fail fast, with a readable message, when a hub is unreachable (instead of hanging on retries)."""

from __future__ import annotations

import os
import socket


def is_online(host: str = "www.modelscope.cn", port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    if any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
           for name in ("QWEN_CLS_OFFLINE", "MODELSCOPE_OFFLINE")):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_host(host: str, *, timeout: float = 10.0, what: str = "this download") -> None:
    """Raise ``ConnectionError`` naming the offline alternatives when ``host`` cannot be reached."""
    if not is_online(host, timeout=timeout):
        raise ConnectionError(
            f"cannot reach {host} to download {what} (no network, or QWEN_CLS_OFFLINE is set). "
            "Work offline with the tiny profile (`make demo`, `qwen-cls run --profile tiny`), or copy the "
            "files to this machine and pass a local folder/file path instead of a hub id."
        )
