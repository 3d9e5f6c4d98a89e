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
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwen_cls.serve_client import classify, free_port, get_json, load_test, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TEST = ROOT / "data" / "sample" / "test.jsonl"
SAMPLE_TRAIN = ROOT / "data" / "sample" / "train.jsonl"


def tiny_run(folder: Path) -> Path:
    """A run of the tiny random model (a few LoRA steps on the sample): mechanics, not quality."""
    from qwen_cls.resumable.training_run import train_run

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


def start_server(run: Path, port: int, batch_size: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "qwen_cls", "serve", "--run", str(run), "--port", str(port),
                             "--batch-size", str(batch_size), "--queue-size", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, QWEN_CLS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    try:
        wait_until_up(f"http://127.0.0.1:{port}", alive=lambda: proc.poll() is None)
    except TimeoutError:
        proc.kill()
        raise SystemExit(f"serve did not start: {proc.stdout.read()}") from None
    return proc


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
            url = f"http://127.0.0.1:{port}"
            for row in rows[: args.batch_size]:  # warm-up, as predict had
                classify(url, row)
            before = get_json(url, "/health")
            result = load_test(url, rows, expected, clients=args.clients, seconds=args.seconds)
            after = get_json(url, "/health")
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
