"""Progress bars in the kernels of ``qwen-cls run`` (``QWEN_CLS_HEADLESS=1``): one final line each, so an executed
notebook does not save a wall of refreshes; elsewhere (JupyterLab, a terminal) tqdm's live bars stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import qwen_cls  # first, as the notebooks do
import datasets
from tqdm.auto import tqdm, trange

for _ in tqdm(range(40), desc="rows", mininterval=0):
    pass
for _ in trange(5, desc="epochs", mininterval=0):
    pass
with tqdm(total=4, desc="inner", leave=False, mininterval=0) as bar:  # a bar that clears itself: nothing
    bar.update(4)
datasets.Dataset.from_dict({"a": list(range(2000))}).map(lambda b: b, batched=True, batch_size=10, desc="tokenize")
"""


def bar_lines(headless: bool) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "QWEN_CLS_HEADLESS"}
    if headless:
        env["QWEN_CLS_HEADLESS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line.strip() for line in done.stderr.replace("\r", "\n").splitlines() if "|" in line]


def test_headless_kernels_write_one_final_line_per_bar():
    lines = bar_lines(headless=True)
    assert [line.split(":")[0] for line in lines] == ["rows", "epochs", "tokenize"]
    assert "40/40" in lines[0] and "5/5" in lines[1] and "2000/2000" in lines[2]
    assert all("100%" in line for line in lines)


def test_live_bars_stay_outside_qwen_cls_run():
    lines = bar_lines(headless=False)
    assert sum(line.startswith("rows:") for line in lines) > 2  # refreshed while running, 0% first
    assert any(line.startswith("rows:") and " 0%" in line for line in lines)
    assert any(line.startswith("inner:") for line in lines)
