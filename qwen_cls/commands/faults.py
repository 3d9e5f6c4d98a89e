"""Runtime faults (out of memory, disk full) as one clear line with a hint, instead of a traceback.

User mistakes (bad paths, bad rows, wrong adapter) are ``ValueError``/``FileNotFoundError`` and exit 2 in
``cli.main``; the faults here are the machine's: ``cli.main`` prints ``error: <hint>`` and exits 1.
"""

from __future__ import annotations

import errno

OOM_HINT = ("out of memory: lower --batch-size (raise --grad-accum to keep the effective batch), lower "
            "--max-length, and keep gradient checkpointing on")


def describe_fault(exc: BaseException) -> str | None:
    """The message for an out-of-memory or disk-full exception, ``None`` for anything else."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))
    ):
        return OOM_HINT
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {exc.filename}" if exc.filename else ""
        return (f"disk full{where}: free space (or write somewhere else) and rerun; "
                "nothing half-written was left in place")
    return None
