"""Run the notebook chain (00 -> 05, see :data:`NOTEBOOKS`) with papermill into one run directory (``qwen-cls run``).

Each notebook receives the parameters its ``parameters`` cell declares, taken from a profile
(:mod:`qwen_cls.profiles`) and ``-p KEY VALUE`` overrides. The executed notebooks land in
``OUT/notebooks/``, the resolved parameters in ``OUT/params.json``, every artifact beside them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .data import read_raw_rows, write_json_atomic
from .profiles import DEFAULT_PROFILE, PROFILES, is_path_key, profile_parameters

NOTEBOOKS = (
    "00_check_environment.ipynb",
    "01_data_conversion.ipynb",
    "02_tokenization.ipynb",
    "03_lora_training.ipynb",
    "04_evaluation.ipynb",
    "05_rag.ipynb",
)


class NotebookFailed(RuntimeError):
    """A notebook of the chain raised; the message names the notebook, the error and the saved copy."""


def notebooks_dir() -> Path:
    """The ``notebooks/`` folder of the source tree (the notebooks' working directory)."""
    import qwen_cls

    return Path(qwen_cls.__file__).resolve().parent.parent / "notebooks"


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, str]:
    """Name -> default (as source text) of a notebook's ``parameters`` cell."""
    import papermill

    return {name: info["default"] for name, info in papermill.inspect_notebook(str(notebook)).items()}


def parse_value(text: str):
    """A ``-p`` value as papermill's CLI reads it: True/False/None, int, float, else the string."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def resolve_parameters(profile: str, overrides: dict | None = None, out: str | os.PathLike | None = None, *,
                       valid_keys: set[str] | None = None) -> dict:
    """Profile values, then ``overrides``, then ``out``; paths made absolute; unknown keys rejected.

    Profile paths are relative to the notebooks folder, override paths to the current directory.
    """
    params = profile_parameters(profile)
    valid = set(valid_keys) if valid_keys is not None else set(params)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    if "profile" in overrides and overrides["profile"] != profile:
        raise ValueError("choose the profile with --profile, not -p profile")
    base = notebooks_dir()
    for key, value in params.items():
        if is_path_key(key) and isinstance(value, str) and value:
            params[key] = str((base / value).resolve())
    for key, value in overrides.items():
        if is_path_key(key) and isinstance(value, str) and value:
            value = str(Path(value).expanduser().resolve())
        elif key == "base_model" and isinstance(value, str) and Path(value).expanduser().exists():
            value = str(Path(value).expanduser().resolve())  # a local model folder, as seen from here
        params[key] = value
    if out is not None:
        params["out_dir"] = str(Path(out).expanduser().resolve())
    return params


def preflight(params: dict) -> None:
    """Fail before any notebook starts: missing local inputs, or a hub download while offline."""
    from .model import TINY
    from .network import require_host

    for key in ("train_path", "test_path"):
        path = Path(params[key])
        if path.is_dir():
            raise IsADirectoryError(f"{key}={path} is a directory; give a raw JSONL file")
        if not path.exists() and not params.get("download_data"):
            raise FileNotFoundError(f"{key}={path} does not exist (raw JSONL rows: text, category, output)")
    if any(not Path(params[k]).exists() for k in ("train_path", "test_path")):
        require_host("www.modelscope.cn", what="the Fudan news dataset")
    for key in ("train_path", "test_path"):  # bad rows: path:line now, not a failed notebook later
        if Path(params[key]).exists():
            read_raw_rows(params[key])
    model = str(params["base_model"])
    if model != TINY and not Path(model).expanduser().exists():
        require_host("www.modelscope.cn", what=f"the model {model}")


def run_chain(profile: str = DEFAULT_PROFILE, out: str | os.PathLike | None = None, overrides: dict | None = None,
              *, notebooks: tuple[str, ...] = NOTEBOOKS, progress: bool = True, log_output: bool = True) -> Path:
    """Execute ``notebooks`` in order into the run directory; return its path."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    folder = notebooks_dir()
    declared = {name: notebook_parameters(folder / name) for name in notebooks}
    valid = set().union(*declared.values())
    params = resolve_parameters(profile, overrides, out, valid_keys=valid | set(PROFILES[profile]))
    preflight(params)
    run_dir = Path(params["out_dir"])
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    write_json_atomic(params, run_dir / "params.json")
    if log_output:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        logging.getLogger("papermill").setLevel(logging.INFO)
    for k, name in enumerate(notebooks, 1):
        target = run_dir / "notebooks" / name
        print(f"[{k}/{len(notebooks)}] {name} -> {target}", flush=True)
        try:
            papermill.execute_notebook(
                str(folder / name), str(target),
                parameters={key: params[key] for key in declared[name] if key in params},
                cwd=str(folder), progress_bar=progress, log_output=log_output,
            )
        except PapermillExecutionError as exc:
            raise NotebookFailed(
                f"{name} failed at cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n  executed copy: {target}"
            ) from None
    return run_dir


def cmd_run(args) -> int:
    overrides = {}
    for key, value in args.param or []:
        overrides[key] = parse_value(value)
    try:
        run_dir = run_chain(args.profile, args.out, overrides, log_output=not args.quiet)
    except NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"\nDone. Outputs are in {run_dir}")
    for name in ("metrics.json", "confusion_matrix.png", "loss_curve.png", "predictions.jsonl",
                 "rag_metrics.json", "adapter", "swanlog", "notebooks"):
        if (run_dir / name).exists():
            print(f"  {run_dir / name}")
    return 0


def register(subparsers) -> None:
    """Add ``qwen-cls run`` to the CLI."""
    p = subparsers.add_parser("run", help="execute the notebook chain 00-05 with papermill into a run folder")
    p.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE,
                   help="parameter set: tiny (offline, minutes on CPU) or qwen2-0.5b (the real recipe)")
    p.add_argument("--out", default=None, help="run folder (default: the profile's out_dir)")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="override a notebook parameter (values parsed like papermill: int, float, True, ...)")
    p.add_argument("--quiet", action="store_true", help="progress bars only, no cell output")
    p.set_defaults(func=cmd_run)
