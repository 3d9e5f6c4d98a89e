"""The machine a figure was measured on: every measured time names it (`chain.json`, the README's tables,
`benchmarks/choose_settings.py`), since the same code runs at other speeds elsewhere."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """``"2-core AMD EPYC"``: this machine's core count and CPU model (Linux ``/proc/cpuinfo``; elsewhere what
    ``platform`` says)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine() or "CPU"
    return f"{os.cpu_count()}-core {model}"
