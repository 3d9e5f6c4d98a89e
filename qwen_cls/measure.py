"""Measuring tools: wall time (CUDA synchronised) and peak memory (CUDA allocator, CPU RSS, or tensor bytes).

Taught in: 03, 04
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def limit_malloc_caching() -> bool:
    """Make glibc hand large freed blocks back to the OS at once, so RSS tracks live CPU tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD = 64 KiB, fixed (no dynamic raise)
    except (OSError, AttributeError):
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or RSS sampled every ~0.5 ms on CPU."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.0005):
        self.device, self.interval, self.peak_bytes = torch.device(device), interval, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss_bytes()) - self._start
        return False


@contextmanager
def stopwatch(device: torch.device | str = "cpu"):
    """``with stopwatch() as t: ...`` then ``t["s"]`` holds the wall seconds (CUDA synchronised)."""
    cuda = torch.device(device).type == "cuda"
    result = {}
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield result
    if cuda:
        torch.cuda.synchronize()
    result["s"] = time.perf_counter() - start


class TensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors allocated inside the block and alive at once: the CPU counterpart of
    ``torch.cuda.max_memory_allocated`` minus its level at entry, exact and independent of the C allocator.

    Every operator's output that does not share storage with one of its inputs (views, in-place results)
    is a new allocation, counted until its storage is freed. Tensors that existed before the block (model
    weights) are never counted. Slower than running without it (a Python call per operator): time elsewhere.
    """

    def __init__(self):
        super().__init__()
        self.live_bytes = self.peak_bytes = 0
        self._sizes: dict[int, int] = {}

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._count(t)
        return out
