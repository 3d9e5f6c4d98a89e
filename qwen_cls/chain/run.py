"""Run the notebook chain (00 -> 07, see :data:`NOTEBOOKS`) with papermill into one run directory (``qwen-cls run``).

Each notebook receives the parameters its ``parameters`` cell declares, taken from a profile
(:mod:`qwen_cls.profiles`) and ``-p KEY VALUE`` overrides, checked against :data:`~qwen_cls.profiles.SCHEMA`
before anything is created. The executed notebooks land in ``OUT/notebooks/``, the resolved parameters in
``OUT/params.json``, every artifact beside them.

A run folder always holds one run (:func:`run_folder`). While a run writes it, ``OUT/RUN_INCOMPLETE`` marks it
unfinished and a lock (``.OUT.lock`` beside it, ``fcntl.flock``, released by the kernel even after ``kill -9``)
turns a second run away. A finished run is replaced only with ``--overwrite``, and only when the new run
succeeds: until then it waits in ``OUT.previous``; a failed or interrupted attempt puts it back and keeps its
own files, marked incomplete, in ``OUT.failed``. A run killed outright is repaired by the next run into ``OUT``.

Its parts: :mod:`~qwen_cls.chain.templating` (parameters), :mod:`~qwen_cls.chain.preflight` (checks before any
notebook starts), :mod:`~qwen_cls.chain.run_folder` (the folder's transactions), :mod:`~qwen_cls.chain.kernels`
(one notebook in its kernel).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from ..chapters import NOTEBOOKS, notebooks_dir
from ..data import LOOKALIKE_HELP
from ..files import write_json_atomic
from ..profiles import COMMITTED_PROFILE, DEFAULT_PROFILE, PROFILES
from ..run_record import PARAMS
from .kernels import run_notebook, sigterm_interrupts
from .preflight import preflight
from .run_folder import Interrupted, NotebookFailed, run_folder
from .templating import (
    edited_defaults,
    injected_parameters,
    notebook_defaults,
    notebook_parameters,
    parse_value,
    resolve_parameters,
)


def run_chain(profile: str = DEFAULT_PROFILE, out: str | os.PathLike | None = None, overrides: dict | None = None,
              *, notebooks: tuple[str, ...] = NOTEBOOKS, progress: bool = True, log_output: bool = True,
              overwrite: bool = False, allow_lookalike_labels: bool = False) -> Path:
    """Execute ``notebooks`` in order into the run directory (see :func:`run_folder`); return its path.
    ``allow_lookalike_labels``: see :func:`preflight`."""
    folder = notebooks_dir()
    declared = {name: notebook_parameters(folder / name) for name in notebooks}
    valid = set().union(*declared.values())
    params = resolve_parameters(profile, overrides, out, valid_keys=valid | set(PROFILES[profile]))
    preflight(params, allow_lookalike_labels=allow_lookalike_labels)
    defaults = {name: notebook_defaults(folder / name) for name in notebooks}
    if profile == COMMITTED_PROFILE:
        for name in notebooks:
            edited = edited_defaults(defaults[name], profile)
            if edited:
                print(f"note: {name}'s parameters cell differs from the {profile} profile in {', '.join(edited)}; "
                      "the profile's values are injected", file=sys.stderr)
    with sigterm_interrupts(), run_folder(params["out_dir"], overwrite=overwrite) as run_dir:
        (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
        write_json_atomic(params, run_dir / PARAMS)
        from ..model_builds.offline import ensure_built  # torch: not at `qwen-cls` start

        ensure_built(params["base_model"])  # an offline model missing from the cache: built now, the notebooks find it
        if log_output:
            logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
            logging.getLogger("papermill").setLevel(logging.INFO)
        started, seconds = time.perf_counter(), {}
        for k, name in enumerate(notebooks, 1):
            target = run_dir / "notebooks" / name
            print(f"[{k}/{len(notebooks)}] {name} -> {target}", flush=True)
            begun = time.perf_counter()
            run_notebook(folder / name, target, injected_parameters(profile, params, defaults[name], overrides),
                     cwd=folder, progress=progress, log_output=log_output, run_dir=run_dir)
            seconds[name.removesuffix(".ipynb")] = round(time.perf_counter() - begun, 1)
        write_json_atomic(chain_record(profile, time.perf_counter() - started, seconds), run_dir / CHAIN)
    return run_dir


CHAIN = "chain.json"


def chain_record(profile: str, total: float, seconds: dict) -> dict:
    """``chain.json``: what the whole chain cost on this machine: wall seconds (in all and per notebook, kernel
    start included), the peak memory of the largest kernel (``getrusage`` of the finished children), the CPU."""
    import resource

    from .machine import cpu_name

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {"profile": profile, "seconds": round(total, 1), "notebook_seconds": seconds,
            "peak_kernel_rss_mib": round(peak / 1024), "cpu": cpu_name(),
            "date": time.strftime("%Y-%m-%d")}


def cmd_run(args) -> int:
    overrides = {}
    for key, value in args.param or []:
        overrides[key] = parse_value(value)
    try:
        run_dir = run_chain(args.profile, args.out, overrides, log_output=not args.quiet, overwrite=args.overwrite,
                            allow_lookalike_labels=args.allow_lookalike_labels)
    except NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        # the executor's abandoned cell task ("Task exception was never retrieved ... DeadKernelError") and
        # nbclient's "Kernel died" lines are echoes of the interrupt itself: one line says it all
        for name in ("asyncio", "papermill", "nbclient"):
            logging.getLogger(name).disabled = True
        print(f"interrupted; {exc.note}" if exc.note else "interrupted", file=sys.stderr)
        return 130
    print(f"\nDone. Outputs are in {run_dir}")
    for name in ("metrics.json", "confusion_matrix.png", "calibration.png", "loss_curve.png", "learning_curve.png",
                 "predictions.jsonl", "rag_metrics.json", "approaches.json", "approaches.png", "adapter", "seq_cls",
                 "swanlog", "notebooks"):
        if (run_dir / name).exists():
            print(f"  {run_dir / name}")
    return 0


def register(subparsers) -> None:
    """Add ``qwen-cls run`` to the CLI."""
    p = subparsers.add_parser("run", help="execute the notebook chain 00-07 with papermill into a run folder")
    p.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE,
                   help="parameter set: tiny (offline mechanics, 1 min), gemma3-270m (a real model learning on CPU, "
                        "offline after make setup, about 7 min on 2 cores), qwen2.5-coder-0.5b (Qwen's own model of "
                        "the Qwen2-0.5B shape learning on CPU, offline after make setup QWEN=1) or qwen2-0.5b (the "
                        "real recipe; network + GPU advisable)")
    p.add_argument("--out", default=None, help="run folder (default: the profile's out_dir)")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="override a notebook parameter (values parsed like papermill: int, float, True, ...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out (the old run is kept until the new one succeeds)")
    p.add_argument("--quiet", action="store_true", help="progress bars only, no cell output")
    p.add_argument("--allow-lookalike-labels", action="store_true", help=LOOKALIKE_HELP)
    p.set_defaults(func=cmd_run)
