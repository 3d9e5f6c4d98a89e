"""Shared fixtures, markers and the parallel layout of the test suite.

Fixtures shared by the whole session (build once, reuse; read them, never write into them):

* ``tiny_dir`` / ``tokenizer``: the tiny offline model (random Qwen2, real tokenizer) built once into a temp
  folder, and its tokenizer. The model cache's own tiny model (``resolve_model("tiny")``, ``load_model("tiny")``)
  is built once before any test runs (:func:`_model_cache_ready`), so parallel workers never race to build it.
* ``gemma_dir`` / ``gemma_tokenizer``: the Gemma 3 270M folder in the model cache (``make setup`` builds it; a
  worker that finds it missing builds it under a lock the other workers wait on).
* ``tiny_run``: ONE ``qwen-cls run --profile tiny`` (the whole notebook chain 00-07, in a subprocess, one BLAS
  thread) on hand-written raw files, made on first use: ``(out, stdout, test_raw_rows)``. Every test that only
  reads a finished chain's files should take it instead of running its own chain (a chain costs a minute on 2
  cores); see :func:`_tiny_run.tiny_run_inputs` for what it ran with. ``test_nbval`` runs lab's copies on the same
  inputs and checks both trained the same adapter. Made once per session even with several workers (below).
* ``write_lines``: write raw lines to a file in ``tmp_path``.

The other chains of ``make test``, each a module fixture its tests share: the real sweep (two points, stopped with
Ctrl+C and resumed: ``test_sweep``), nbval (``test_nbval``), the qwen2-0.5b profile on unseen labels
(``test_recipe_chain``); and ``test_run``'s Ctrl+C in notebook 03. A scenario that needs a chain of its own should
first ask whether one of these can serve it.

Markers (``pyproject.toml``): ``slow`` (trains, runs notebooks or computes with Gemma 3 270M) and
``subprocess`` (starts other processes: the CLI, kernels, torchrun, pip, a server); ``make test-fast`` runs the
tests that are neither. Mark a new test that takes seconds with one of them.

Parallel (``make test``: ``pytest -n 2 --dist loadfile``, pytest-xdist, the costliest files first): each test file
runs whole on one worker, so a module's fixtures are made once; a costly session fixture shared by several files
(``tiny_run``, the Gemma folder, the cache's tiny model) is made once per session under a lock in the workers'
common temp folder, the other workers waiting for it and reusing it. Each worker (and what it starts) uses
``cores // workers`` BLAS threads. Tests must not write outside their ``tmp_path`` (the other worker runs at
the same time); ports come from ``test_dashboard.free_port``.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:  # an xdist worker: share the cores instead of each worker (and its kernels) taking them all
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The costliest test files (pytest --durations), scheduled first so that no worker is left alone with one at the
# end (make test: --no-loadscope-reorder keeps this order; xdist would otherwise put the files with most tests first).
COSTLY_FIRST = ("test_sweep.py", "test_run.py", "test_nbval.py", "test_recipe_chain.py", "test_resume.py",
                "test_serve.py")


def pytest_collection_modifyitems(config, items):
    """The files of :data:`COSTLY_FIRST` first, in that order; each file keeps its own order."""
    rank = {name: i for i, name in enumerate(COSTLY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _shared_root(tmp_path_factory) -> Path:
    """The temp folder all workers of this session share (each worker's own sits inside it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def _locked(tmp_path_factory, name: str):
    """An exclusive lock shared by all workers of this session (their common temp root), held while open."""
    handle = open(_shared_root(tmp_path_factory) / f"{name}.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@pytest.fixture(scope="session", autouse=True)
def _model_cache_ready(tmp_path_factory):
    """The cache's tiny model exists before any test asks for it (one worker builds it, the others wait)."""
    from qwen_cls.model_builds.tiny import build_tiny_model

    with _locked(tmp_path_factory, "tiny-model"):
        build_tiny_model()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from qwen_cls.model_builds.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from qwen_cls.model import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory):
    """The Gemma 3 270M dense folder in the model cache: built on first use (about a minute), then reused."""
    from qwen_cls.model_builds.gemma import build_gemma_model

    with _locked(tmp_path_factory, "gemma-model"):
        return build_gemma_model()


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_dir):
    from qwen_cls.model import load_tokenizer

    return load_tokenizer(gemma_dir)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny-profile ``qwen-cls run`` (subprocess, the whole chain) on hand-written raw files: 20 train rows
    (16 used), 10 test rows (8 used), :data:`_tiny_run.TINY_RUN_PARAMETERS` (all of its inputs:
    :func:`_tiny_run.tiny_run_inputs`). Returns ``(out, stdout, test_raw_rows)``:
    the run folder, what the command printed, and the 10 raw test rows (``_tiny_run.chain_raw_rows(10, 100)``).
    Shared by every test of the session that takes it: only read it."""
    import json
    import tempfile

    from _tiny_run import chain_raw_rows, subprocess_env, tiny_run_inputs, write_raw

    record = _shared_root(tmp_path_factory) / "tiny_run.json"
    with _locked(tmp_path_factory, "tiny-run"):  # the first worker runs it; the others wait, then read it
        if not record.is_file():
            base = Path(tempfile.mkdtemp(prefix="tiny_run", dir=record.parent))
            out = base / "out"
            inputs = tiny_run_inputs(out)
            write_raw(Path(inputs["train_path"]), chain_raw_rows(20, 0))
            write_raw(Path(inputs["test_path"]), chain_raw_rows(10, 100))
            params = [arg for key, value in inputs.items() for arg in ("-p", key, str(value))]
            proc = subprocess.run(  # one BLAS thread, as the nbval run that must train the same adapter
                [sys.executable, "-m", "qwen_cls", "run", "--profile", "tiny", "--out", str(out), *params],
                capture_output=True, text=True, timeout=900, env=subprocess_env(),
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            record.write_text(json.dumps({"out": str(out), "stdout": proc.stdout}), encoding="utf-8")
        done = json.loads(record.read_text(encoding="utf-8"))
    return Path(done["out"]), done["stdout"], chain_raw_rows(10, 100)


@pytest.fixture()
def write_lines(tmp_path):
    """Write raw bytes/str lines to a file and return its path."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
        return path

    return _write
