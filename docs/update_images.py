"""Copy the README's pictures from a finished `make demo` run and print its headline numbers.

    .venv/bin/python docs/update_images.py [RUN_DIR]     # default runs/demo; `make docs-images` runs it

Refuses a run that is not a finished gemma3-270m run (the README shows real learning, never the tiny model's).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICTURES = ("learning_curve.png", "approaches.png")


def main(argv: list[str]) -> int:
    run = Path(argv[0]) if argv else ROOT / "runs" / "demo"
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file() or (run / "RUN_INCOMPLETE").exists():
        print(f"error: {run} is not a finished run (no metrics.json, or RUN_INCOMPLETE): run `make demo` first",
              file=sys.stderr)
        return 2
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    if metrics.get("profile") != "gemma3-270m" or metrics.get("tiny_model"):
        print(f"error: {run} is a {metrics.get('profile')!r} run; the README's pictures come from gemma3-270m "
              "(`make demo`)", file=sys.stderr)
        return 2
    missing = [name for name in PICTURES if not (run / name).is_file()]
    if missing:
        print(f"error: {run} has no {', '.join(missing)}", file=sys.stderr)
        return 2
    out = ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    for name in PICTURES:
        shutil.copyfile(run / name, out / name)
        print(f"{run / name} -> {out / name}")
    approaches = json.loads((run / "approaches.json").read_text(encoding="utf-8"))
    print(f"accuracy {metrics['accuracy']:.3f} (LoRA, {metrics['n_test']} test rows), zero-shot "
          f"{metrics['zero_shot']['accuracy']:.3f}, chance {metrics['chance_accuracy']:.3f}, macro-F1 "
          f"{metrics['macro_f1']:.3f}, ECE {metrics['ece']:.3f}")
    print("approaches:", ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in approaches.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
