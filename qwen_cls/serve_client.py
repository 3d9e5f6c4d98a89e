"""A client of ``qwen-cls serve`` for notebook 07 and ``make bench-serve``: JSON over HTTP on loopback, and a
bounded load test (N concurrent clients, one row per request) that counts latencies, errors and mismatches.

Taught in: 07
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from urllib.parse import urlsplit


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def get_json(url: str, path: str, timeout: float = 30) -> dict:
    """``GET url+path`` as JSON (``OSError`` while nothing listens)."""
    connection = _connection(url, timeout)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def classify(url: str, rows, timeout: float = 120):
    """``POST /v1/classify`` with one row ``{"text", "candidates"}`` or a list: (status, answer)."""
    connection = _connection(url, timeout)
    try:
        connection.request("POST", "/v1/classify", body=json.dumps(rows, ensure_ascii=False).encode("utf-8"),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def wait_until_up(url: str, seconds: float = 300, alive=lambda: True) -> dict:
    """Poll ``/health`` until the server answers (``TimeoutError`` after ``seconds``, or once ``alive()`` is false)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return get_json(url, "/health")
        except OSError:
            if not alive() or time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer /health") from None
            time.sleep(0.2)


def load_test(url: str, rows: list[dict], expected: list[str], *, clients: int, seconds: float) -> dict:
    """``clients`` threads, each with its own connection, send one row per request (round robin over ``rows``)
    until ``seconds`` have passed; each answer is checked against ``expected`` (the same rows' predictions).

    Returns ``requests``, ``wall_seconds``, ``serve_rows_per_second``, ``p50_ms``, ``p99_ms``, ``errors`` (count),
    ``error_kinds``, ``mismatches``."""
    latencies, errors, mismatches = [], [], [0]
    counter, lock = [0], threading.Lock()
    stop_at = time.monotonic() + seconds

    def client():
        connection = _connection(url, 120)
        while time.monotonic() < stop_at:
            with lock:
                i = counter[0] % len(rows)
                counter[0] += 1
            body = json.dumps(rows[i], ensure_ascii=False).encode("utf-8")
            start = time.perf_counter()
            try:
                connection.request("POST", "/v1/classify", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with lock:
                    errors.append(type(exc).__name__)
                connection.close()
                connection = _connection(url, 120)
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                if response.status != 200:
                    errors.append(response.status)
                elif answer["prediction"] != expected[i]:
                    mismatches[0] += 1
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"requests": len(latencies), "wall_seconds": wall, "serve_rows_per_second": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(ordered) if ordered else None,
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
            "errors": len(errors), "error_kinds": sorted({str(e) for e in errors}), "mismatches": mismatches[0]}
