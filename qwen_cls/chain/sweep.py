"""``qwen-cls sweep``: a parameter grid over the notebook chain, one ``qwen-cls run`` per point, one comparison.

``qwen-cls sweep --profile P --out DIR -g KEY V1,V2 [-g KEY2 ...] [-p KEY VALUE ...]`` runs the chain
(:func:`~qwen_cls.chain.run.run_chain`) once per point of the cartesian product of the ``-g`` grids, into
``DIR/<point>/`` (``learning_rate=0.001,lora_r=4``), then writes ``DIR/sweep.csv``, ``DIR/sweep.md`` and
``DIR/sweep.png`` (:mod:`~qwen_cls.chain.sweep_report`). Grid values are parsed and checked like ``-p``
values, for every point, before anything is created.

Resumable: a point whose run finished (``metrics.json``, no ``RUN_INCOMPLETE``) with the parameters it would
run with now (its ``params.json``) is skipped; any other point is run again through ``qwen-cls run``'s own
folder rules (an unfinished attempt is replaced, a finished one only when its new run succeeds). Ctrl+C stops
the sweep between or inside points; finished points stay as they are.

The sweep folder: ``sweep.json`` (profile, grid, fixed ``-p`` values: a rerun must keep the profile, the
grid keys and the ``-p`` values; grid values may change), the point folders, the tables, and ``swanlog/``:
every point logs into this one SwanLab folder (:data:`~qwen_cls.tracking.SWANLOG_ENV`), so
``qwen-cls dashboard DIR`` shows all points side by side. Anything else in ``DIR`` makes it foreign:
refused, never touched. ``.DIR.lock`` beside it turns a second sweep (or run) into ``DIR`` away.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..chapters import NOTEBOOKS, notebooks_dir
from ..data import LOOKALIKE_HELP
from ..files import check_folder_path, write_json_atomic
from ..profiles import DEFAULT_PROFILE, PROFILES, ParameterError, check_parameter
from ..run_record import METRICS, PARAMS
from ..tracking import LOG_SUBDIR, SWANLOG_ENV
from .kernels import sigterm_interrupts
from .locks import hold_lock
from .preflight import preflight
from .run import run_chain
from .run_folder import Interrupted, NotebookFailed, RunFolderError, run_folder_state
from .sweep_report import PLOT, TABLE_CSV, TABLE_MD, sweep_arguments, value_text, write_comparison
from .templating import notebook_parameters, parse_value, resolve_parameters

MANIFEST = "sweep.json"
SWEEP_LAYOUT = frozenset({MANIFEST, TABLE_CSV, TABLE_MD, PLOT, LOG_SUBDIR})
NOT_IN_GRID = ("profile", "out_dir")  # chosen with --profile and --out
MAX_NAME = 200  # characters of a point folder's name (file systems allow 255)


class SweepError(ValueError):
    """A grid or sweep folder that cannot be used; the message says what to change (exit status 2)."""


@dataclass(frozen=True)
class Point:
    """One point of the grid: its folder name, its grid values and the parameters its run gets."""

    name: str
    values: dict
    params: dict


# --- the grid --------------------------------------------------------------------------------------------------

def parse_grid(pairs) -> dict[str, list]:
    """``-g KEY V1,V2,...`` pairs -> ``{KEY: [values]}``, each value parsed like a ``-p`` value (True/False/None,
    int, float, else text). An empty grid, an empty value, a key given twice or a value listed twice is a
    :class:`SweepError`."""
    grid: dict[str, list] = {}
    for key, text in pairs:
        if key in grid:
            raise SweepError(f"-g {key} is given twice; list all its values in one -g {key} V1,V2,...")
        if not text.strip():
            raise SweepError(f"-g {key}: the grid is empty; give its values as -g {key} V1,V2,...")
        items = [item.strip() for item in text.split(",")]
        if "" in items:
            raise SweepError(f"-g {key} {text!r}: an empty value between commas")
        values = [parse_value(item) for item in items]
        for i, value in enumerate(values):
            if any(_same_grid_value(value, earlier) for earlier in values[:i]):
                raise SweepError(f"-g {key}: the value {items[i]} is listed twice")
        grid[key] = values
    if not grid:
        raise SweepError("give at least one grid: -g KEY V1,V2,...")
    return grid


def _same_grid_value(a, b) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # 1e-3 == 0.001, but True is not 1


def point_name(values: dict) -> str:
    """The folder name of a point: ``key=value`` pairs in grid order, joined by commas; characters that
    do not belong in a file name (``/``, spaces, ...) become ``_``."""
    parts = []
    for key, value in values.items():
        text = re.sub(r"[^\w.+-]", "_", value_text(value))
        parts.append(f"{key}={text}")
    return ",".join(parts)


def _is_point_name(name: str, keys: list[str]) -> bool:
    pattern = ",".join(re.escape(key) + r"=[\w.+-]+" for key in keys)
    return re.fullmatch(pattern, name) is not None


def chain_keys(profile: str) -> set[str]:
    """Every parameter a point may set: the notebooks' ``parameters`` cells and the profile's keys."""
    folder = notebooks_dir()
    return set().union(*(notebook_parameters(folder / name) for name in NOTEBOOKS)) | set(PROFILES[profile])


def plan(profile: str, grid: dict[str, list], fixed: dict, out: str | os.PathLike) -> list[Point]:
    """The points of the grid, each with the parameters its run will get; every key and value checked (like
    ``qwen-cls run`` checks ``-p``) before anything exists: a :class:`ValueError` naming the key otherwise."""
    if profile not in PROFILES:
        raise SweepError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    valid = chain_keys(profile)
    for key in grid:
        if key in NOT_IN_GRID:
            raise SweepError(f"-g {key}: choose the {key.replace('_dir', ' folder')} with --{key.split('_')[0]}, "
                             "not with a grid")
        if key not in valid:
            raise SweepError(f"-g {key}: unknown parameter; valid keys: {', '.join(sorted(valid - set(NOT_IN_GRID)))}")
        if key in fixed:
            raise SweepError(f"{key} is given both as -g and -p; keep one")
        for value in grid[key]:
            try:
                check_parameter(key, value)
            except ParameterError as exc:
                raise ParameterError(f"-g {exc}") from None
    if "out_dir" in fixed:
        raise SweepError("choose the sweep folder with --out, not -p out_dir")
    out = Path(out).expanduser().resolve()
    points, seen = [], {}
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = point_name(values)
        if len(name) > MAX_NAME:
            raise SweepError(f"the point name {name[:60]}... is longer than {MAX_NAME} characters; "
                             "use shorter grid values")
        if name in seen:
            raise SweepError(f"the points {seen[name]} and {values} get the same folder name {name}; "
                             "use values that differ in letters or digits")
        seen[name] = values
        params = resolve_parameters(profile, {**fixed, **values}, out / name, valid_keys=valid)
        points.append(Point(name, values, params))
    return points


# --- the sweep folder ------------------------------------------------------------------------------------------

def sweep_record(profile: str, grid: dict[str, list], fixed: dict) -> dict:
    """What ``sweep.json`` records: the profile, the grid (keys in order, values) and the fixed ``-p`` values."""
    return json.loads(json.dumps({"profile": profile, "grid": grid, "fixed": fixed}))


def _sweep_owned(name: str, keys: list[str]) -> bool:
    """A name a sweep writes: its layout, a temp file of an atomic write of one, a point folder of the grid
    ``keys``, or what ``qwen-cls run`` leaves beside a point (``.P.lock``, ``P.previous``, ``P.failed``)."""
    if name in SWEEP_LAYOUT or any(name.startswith(f".{owned}.") for owned in SWEEP_LAYOUT):
        return True
    if name.startswith(".") and name.endswith(".lock"):
        name = name[1:-len(".lock")]
    for suffix in (".previous", ".failed"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    return _is_point_name(name, keys)


def check_sweep_folder(out: Path, record: dict) -> None:
    """Refuse ``out`` unless it is absent, empty, or a sweep of the same profile, grid keys and ``-p`` values
    holding nothing but what a sweep writes."""
    check_folder_path(out, "--out")
    if not out.exists():
        return
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    try:
        earlier = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or not {"profile", "grid", "fixed"} <= set(earlier) \
            or not isinstance(earlier["grid"], dict):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise SweepError(f"{out} is not a sweep folder (it holds {shown} and no {MANIFEST}); "
                         "choose a new or empty folder for --out")
    same = (earlier["profile"] == record["profile"] and list(earlier["grid"]) == list(record["grid"])
            and earlier["fixed"] == record["fixed"])
    if not same:
        raise SweepError(f"{out} holds another sweep ({sweep_arguments(earlier)}); this one is "
                         f"{sweep_arguments(record)}: keep its profile, grid keys and -p values, or choose another "
                         "--out")
    foreign = [n for n in names if not _sweep_owned(n, list(record["grid"]))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise SweepError(f"{out} holds {shown}, which `qwen-cls sweep` did not write; move it away or choose "
                         "another --out")


def is_finished(point: Point, folder: Path) -> bool:
    """The point's run finished (``metrics.json``, not marked incomplete) with the parameters it would get now."""
    try:
        if run_folder_state(folder) != "finished" or not (folder / METRICS).is_file():
            return False
        recorded = json.loads((folder / PARAMS).read_text(encoding="utf-8"))
    except (OSError, ValueError, RunFolderError):
        return False
    return recorded == json.loads(json.dumps(point.params))


def _why(folder: Path) -> str:
    try:
        state = run_folder_state(folder)
    except RunFolderError:
        return "not a folder"
    if state == "absent":
        return "new"
    if state == "incomplete":
        return "its last run did not finish; running it again"
    if state == "finished" and not (folder / METRICS).is_file():
        return f"its run has no {METRICS}; running it again"
    if state == "finished":
        return "its parameters changed; running it again (the finished run is kept until the new one succeeds)"
    return state


@contextlib.contextmanager
def logs_into(log_dir: Path):
    """Every SwanLab run started in the block (the kernels inherit the environment) logs into ``log_dir``."""
    old = os.environ.get(SWANLOG_ENV)
    os.environ[SWANLOG_ENV] = str(log_dir)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SWANLOG_ENV, None)
        else:
            os.environ[SWANLOG_ENV] = old


# --- the command -----------------------------------------------------------------------------------------------

def run_sweep(profile: str, out: str | os.PathLike, grid: dict[str, list], fixed: dict | None = None, *,
              log_output: bool = True, allow_lookalike_labels: bool = False) -> tuple[Path, list[dict]]:
    """Run every point of ``grid`` not yet finished, then write the comparison; return ``(DIR, rows)``.
    ``allow_lookalike_labels``: see :func:`~qwen_cls.chain.preflight.preflight`."""
    fixed = dict(fixed or {})
    points = plan(profile, grid, fixed, out)
    out = Path(out).expanduser().resolve()
    record = sweep_record(profile, grid, fixed)
    check_sweep_folder(out, record)  # read-only: a foreign folder is refused before anything is created
    todo = [p for p in points if not is_finished(p, out / p.name)]
    checked = set()
    for point in todo:  # missing inputs, bad rows, no network: now, not at the third point
        inputs = json.dumps({k: v for k, v in point.params.items() if k != "out_dir"}, sort_keys=True)
        if inputs not in checked:
            preflight(point.params, allow_lookalike_labels=allow_lookalike_labels)
            checked.add(inputs)
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold_lock(out, "qwen-cls sweep"))  # names the holder (sweep or run) and its PID
        check_sweep_folder(out, record)  # again, now that it is ours
        for point in points:
            if run_folder_state(out / point.name) == "foreign":
                raise RunFolderError(f"{out / point.name} holds files `qwen-cls run` did not write; move them "
                                     "away and rerun")
        out.mkdir(parents=True, exist_ok=True)
        if _json_or_none(out / MANIFEST) != record:
            write_json_atomic(record, out / MANIFEST)
        ran = False
        for k, point in enumerate(points, 1):
            folder = out / point.name
            if is_finished(point, folder):
                print(f"[point {k}/{len(points)}] {point.name}: finished with these parameters; skipped", flush=True)
                continue
            print(f"[point {k}/{len(points)}] {point.name}: {_why(folder)} -> {folder}", flush=True)
            try:
                with logs_into(out / LOG_SUBDIR):
                    run_chain(profile, folder, {**fixed, **point.values}, log_output=log_output, overwrite=True,
                              allow_lookalike_labels=allow_lookalike_labels)
            except (NotebookFailed, Interrupted, KeyboardInterrupt) as exc:
                exc.sweep_point = point.name
                raise
            ran = True
        rows = write_comparison(out, points, record, force=ran)
    return out, rows


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _resume_hint(out: str) -> str:
    return f"finished points are kept; rerun the same command to resume (finished points are skipped): {out}"


def cmd_sweep(args) -> int:
    fixed = {key: parse_value(value) for key, value in args.param or []}
    grid = parse_grid(args.grid or [])
    try:
        with sigterm_interrupts():
            out, rows = run_sweep(args.profile, args.out, grid, fixed, log_output=not args.quiet,
                                  allow_lookalike_labels=args.allow_lookalike_labels)
    except NotebookFailed as exc:
        print(f"error: point {getattr(exc, 'sweep_point', '?')}: {exc}\n  {_resume_hint(args.out)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        for name in ("asyncio", "papermill", "nbclient"):  # echoes of the interrupt (see chain.run.cmd_run)
            logging.getLogger(name).disabled = True
        note = getattr(exc, "note", "")
        where = f" at point {exc.sweep_point}" if getattr(exc, "sweep_point", None) else ""
        print(f"interrupted{where}; {note + '; ' if note else ''}{_resume_hint(args.out)}", file=sys.stderr)
        return 130
    print(f"\nDone: {len(rows)} points in {out}")
    print((out / TABLE_MD).read_text(encoding="utf-8"))
    for name in (TABLE_CSV, TABLE_MD, PLOT):
        print(f"  {out / name}")
    if (out / LOG_SUBDIR).is_dir():
        print(f"  all points side by side: qwen-cls dashboard {out}")
    return 0


def register(subparsers) -> None:
    """Add ``qwen-cls sweep`` to the CLI."""
    p = subparsers.add_parser("sweep", help="run the notebook chain once per point of a parameter grid and compare "
                                            "the points in one table (resumable)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE, help="parameter set (as for run)")
    p.add_argument("--out", required=True, help="sweep folder: one run folder per point, sweep.csv/.md/.png")
    p.add_argument("-g", "--grid", nargs=2, action="append", required=True, metavar=("KEY", "V1,V2,..."),
                   help="a parameter and its values, comma-separated (parsed like -p values); several -g: every "
                        "combination")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="a parameter fixed for every point (as for run)")
    p.add_argument("--quiet", action="store_true", help="progress bars only, no cell output")
    p.add_argument("--allow-lookalike-labels", action="store_true", help=LOOKALIKE_HELP)
    p.set_defaults(func=cmd_sweep)
