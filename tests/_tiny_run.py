"""Helpers for the tests that train the tiny model: training rows, fast settings, subprocess commands, and the
raw rows of the shared tiny chain run (the ``tiny_run`` fixture of ``conftest.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = ROOT / "data" / "sample" / "train.jsonl"
SAMPLE_TEST = ROOT / "data" / "sample" / "test.jsonl"
LABELS = ["Sports", "Military", "Economy", "Art", "Space"]


def train_rows_file(folder: Path, n: int = 16) -> Path:
    """The bundled sample when present, else ``n`` generated raw rows (content does not matter: random model)."""
    if SAMPLE_TRAIN.is_file():
        return SAMPLE_TRAIN
    path = folder / "train.jsonl"
    rows = [{"text": f"第{i}条新闻：今天的比赛与会议。" * 3, "category": LABELS[: 2 + i % 4],
             "output": LABELS[i % 2]} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# Few short steps: the whole run takes seconds on 2 CPU cores.
FAST = ["--max-length", "128", "--batch-size", "2", "--grad-accum", "1", "--logging-steps", "1", "--limit", "24"]


def three_step_run(folder: Path) -> Path:
    """``folder/run``: a run dir made by the library, 3 LoRA steps of the tiny model on 8 training rows."""
    from qwen_cls.resumable.training_run import train_run

    out = folder / "run"
    train_run(train_rows_file(folder), out, model="tiny", max_length=128, max_steps=3, batch_size=2,
              grad_accum=1, learning_rate=1e-2, save_steps=100, limit=8, seed=1)
    return out


def train_command(*args: str) -> list[str]:
    """``qwen-cls train ARGS`` as a subprocess command line (this interpreter, so the venv's packages)."""
    return [sys.executable, "-m", "qwen_cls", "train", *args]


def subprocess_env() -> dict:
    """One BLAS thread per process (2 cores, 2 processes) and no hub access."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", QWEN_CLS_OFFLINE="1",
               HF_HUB_OFFLINE="1")
    return env


def ctrl_c_when(command: list[str], started: Path, settle: float, logs: Path, env: dict | None = None):
    """Run ``command``; once the file ``started`` exists and ``settle`` seconds have passed, send SIGINT to its
    process group, as Ctrl+C in a terminal does. Returns (exit status, stdout, stderr). Its output goes to files in
    ``logs``, not to pipes nobody reads while it runs (a full pipe would stall it)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "wb") as stdout, open(logs / "stderr", "wb") as stderr:
        proc = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, env=env, start_new_session=True,
            # as from a terminal: SIGINT at its default. A child inherits an ignored SIGINT (POSIX; Python then keeps
            # it ignored), and an earlier test in the same pytest worker can leave it so: the chain then ran to the end.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 600
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (logs / "stderr").read_bytes()[-3000:]
            time.sleep(0.2)
        time.sleep(settle)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    out, err = ((logs / name).read_text(encoding="utf-8") for name in ("stdout", "stderr"))
    return proc.returncode, out, err


# --- the shared tiny chain run (conftest.tiny_run): hand-written raw rows in the schema -----------------------

CHAIN_LABELS = ("Sports", "Economy", "Art", "Military")
CHAIN_TOPICS = {"Sports": "足球比赛冠军球队", "Economy": "市场经济增长银行", "Art": "画家展览美术馆",
                "Military": "军队演习舰艇"}


# The shared chain run: 16 of its 20 raw training rows, 8 of its 10 test rows, seed 3; logging_steps 1000 makes
# it a run too short to log a loss on schedule (only the first step's), which test_short_run checks.
TINY_RUN_PARAMETERS = {"max_train_samples": 16, "max_test_samples": 8, "validation_rows": 4, "seed": 3,
                       "logging_steps": 1000}


def tiny_run_inputs(out: Path) -> dict:
    """Every parameter the shared tiny run (run folder ``out``) gets besides the tiny profile's: its raw files,
    which sit beside ``out``, and :data:`TINY_RUN_PARAMETERS`."""
    return {"train_path": str(out.parent / "raw_train.jsonl"), "test_path": str(out.parent / "raw_test.jsonl"),
            **TINY_RUN_PARAMETERS}


def chain_raw_rows(n: int, offset: int) -> list[dict]:
    """``n`` raw rows over :data:`CHAIN_LABELS`; some exceed 384 tokens, and the candidates come both as a JSON
    list and as a comma-separated string (the schema allows both)."""
    rows = []
    for i in range(n):
        answer = CHAIN_LABELS[(i + offset) % len(CHAIN_LABELS)]
        others = [label for label in CHAIN_LABELS if label != answer][: 1 + i % 3]
        category = others + [answer] if i % 2 else [answer] + others
        text = f"第{i + offset}条新闻：" + CHAIN_TOPICS[answer] * (1 + (i * 37) % 60)  # some rows exceed 384 tokens
        rows.append({"text": text, "category": category if i % 3 else ", ".join(category), "output": answer})
    return rows


def write_raw(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
