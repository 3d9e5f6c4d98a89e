"""Load benchmark of ``qwen-cls serve``: N concurrent clients on loopback for a bounded time, against ``predict``
on the same rows.

``predict``'s rate is :func:`qwen_cls.predict.predict_rows` (what ``qwen-cls predict`` runs) over the rows in this
process, after one warm-up pass, with the same ``--batch-size``: rows per second of model time. The server runs as
a subprocess (``qwen-cls serve --run RUN``) on a free port of 127.0.0.1; each client sends one row per request,
round robin over the rows, until ``--seconds`` have passed; answers are checked against ``predict``'s
predictions. The server is stopped with SIGTERM and must exit 0. Writes ``OUT/serve_bench.json``:
``predict_rows_per_second``, ``serve_rows_per_second``, ``ratio``, latency ``p50_ms`` / ``p99_ms``, ``errors``,
``mismatches``, the server's ``batches`` and mean rows per forward pass.

    python benchmarks/serve_load.py --run runs/demo --clients 16 --seconds 30 --out runs/bench
    python benchmarks/serve_load.py --clients 8 --seconds 10      # no --run: a tiny run is trained first
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TEST = ROOT / "data" / "sample" / "test.jsonl"
SAMPLE_TRAIN = ROOT / "data" / "sample" / "train.jsonl"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_run(folder: Path) -> Path:
    """A run of the tiny random model (a few LoRA steps on the sample): mechanics, not quality."""
    from qwen_cls.training_run import train_run

    out = folder / "run"
    train_run(SAMPLE_TRAIN, out, model="tiny", max_length=128, max_steps=3, batch_size=2, grad_accum=1,
              learning_rate=1e-2, save_steps=100, limit=8, seed=1)
    return out


def bench_rows(run: Path, n: int) -> list[dict]:
    """The run's first ``n`` test rows (``data/test.jsonl``), else the sample's."""
    from qwen_cls.data import read_raw_rows

    path = run / "data" / "test.jsonl"
    rows = read_raw_rows(path if path.is_file() else SAMPLE_TEST, require_output=False)
    return [{"text": r.text, "candidates": list(r.category)} for r in rows[:n]]


def predict_rate(run: Path, rows: list[dict], batch_size: int) -> tuple[float, list[str]]:
    """(rows per second, predictions) of ``predict_rows`` over ``rows``, after a warm-up pass."""
    from qwen_cls.predict import load_run, predict_rows
    from qwen_cls.recipe import MAX_LENGTH

    model, tokenizer, config = load_run(run)
    raw = [{"text": r["text"], "category": r["candidates"]} for r in rows]
    max_length = config.get("max_length", MAX_LENGTH)
    predict_rows(model, tokenizer, raw[:batch_size], max_length=max_length, batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    results = predict_rows(model, tokenizer, raw, max_length=max_length, batch_size=batch_size)
    seconds = time.perf_counter() - start
    del model
    return len(rows) / seconds, [r["prediction"] for r in results]


def get(port: int, path: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def start_server(run: Path, port: int, batch_size: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "qwen_cls", "serve", "--run", str(run), "--port", str(port),
                             "--batch-size", str(batch_size), "--queue-size", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, QWEN_CLS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + 300
    while True:
        try:
            get(port, "/health")
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"serve did not start: {proc.stdout.read()}") from None
            time.sleep(0.3)


def load(port: int, rows: list[dict], expected: list[str], clients: int, seconds: float) -> dict:
    """``clients`` threads, one row per request, round robin, for ``seconds``."""
    latencies, errors, mismatches = [], [], [0]
    counter, lock = [0], threading.Lock()
    stop_at = time.monotonic() + seconds

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop_at:
            with lock:
                i = counter[0] % len(rows)
                counter[0] += 1
            body = json.dumps(rows[i], ensure_ascii=False).encode()
            start = time.perf_counter()
            try:
                connection.request("POST", "/v1/classify", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError) as exc:
                errors.append(type(exc).__name__)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run dir (default: train a tiny run in a temp folder)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        run = Path(args.run) if args.run else tiny_run(Path(tmp))
        rows = bench_rows(run, args.rows)
        predict_rows_per_second, expected = predict_rate(run, rows, args.batch_size)
        port = free_port()
        proc = start_server(run, port, args.batch_size)
        try:
            for row in rows[: args.batch_size]:  # warm-up, as predict had
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                connection.request("POST", "/v1/classify", body=json.dumps(row).encode())
                connection.getresponse().read()
                connection.close()
            before = get(port, "/health")
            result = load(port, rows, expected, args.clients, args.seconds)
            after = get(port, "/health")
            os.killpg(proc.pid, signal.SIGTERM)
            exit_code = proc.wait(120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    batches, served = after["batches"] - before["batches"], after["rows"] - before["rows"]
    report = {"run": str(args.run or "tiny (trained for this benchmark)"), "clients": args.clients,
              "seconds": args.seconds, "rows": len(rows), "batch_size": args.batch_size,
              "predict_rows_per_second": predict_rows_per_second, **result,
              "ratio": result["serve_rows_per_second"] / predict_rows_per_second,
              "batches": batches, "mean_rows_per_batch": served / batches if batches else None,
              "server_exit_code": exit_code, "cpu_count": os.cpu_count()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from qwen_cls.files import write_json_atomic

    write_json_atomic(report, out / "serve_bench.json")
    print(json.dumps(report, indent=1))
    ok = report["errors"] == 0 and report["mismatches"] == 0 and exit_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
