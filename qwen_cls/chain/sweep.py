"""``qwen-cls sweep``: a parameter grid over the notebook chain, one ``qwen-cls run`` per point, one comparison.

``qwen-cls sweep --profile P --out DIR -g KEY V1,V2 [-g KEY2 ...] [-p KEY VALUE ...]`` runs the chain
(:func:`~qwen_cls.chain.run.run_chain`) once per point of the cartesian product of the ``-g`` grids, into
``DIR/<point>/`` (``learning_rate=0.001,lora_r=4``), then writes ``DIR/sweep.csv``, ``DIR/sweep.md`` and
``DIR/sweep.png``. Grid values are parsed and checked like ``-p`` values, for every point, before anything
is created.

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
import csv
import io
import itertools
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..chapters import NOTEBOOKS, notebooks_dir
from ..data import LOOKALIKE_HELP
from ..files import atomic_file, check_folder_path, write_json_atomic
from ..profiles import DEFAULT_PROFILE, PROFILES, ParameterError, check_parameter
from ..run_record import METRICS, PARAMS, RUN_CONFIG, TRAIN_LOG
from ..tracking import LOG_SUBDIR, SWANLOG_ENV
from .kernels import sigterm_interrupts
from .locks import hold_lock
from .preflight import preflight
from .run import run_chain
from .run_folder import Interrupted, NotebookFailed, RunFolderError, run_folder_state
from .templating import notebook_parameters, parse_value, resolve_parameters

MANIFEST = "sweep.json"
TABLE_CSV, TABLE_MD, PLOT = "sweep.csv", "sweep.md", "sweep.png"
SWEEP_LAYOUT = frozenset({MANIFEST, TABLE_CSV, TABLE_MD, PLOT, LOG_SUBDIR})
# Columns after the grid keys. Points are ranked by validation_accuracy (03's last evaluation on validation rows,
# metrics.json's validation); accuracy, macro_f1 and zero_shot are the test rows' (04), shown, never ranked by.
RESULTS = ("validation_accuracy", "accuracy", "macro_f1", "zero_shot", "train_seconds")
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
            if any(_same(value, earlier) for earlier in values[:i]):
                raise SweepError(f"-g {key}: the value {items[i]} is listed twice")
        grid[key] = values
    if not grid:
        raise SweepError("give at least one grid: -g KEY V1,V2,...")
    return grid


def _same(a, b) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # 1e-3 == 0.001, but True is not 1


def value_text(value) -> str:
    """A value as it appears in a point name and the tables: shortest float repr (``0.001``), else ``str``."""
    return repr(value) if isinstance(value, float) else str(value)


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

def manifest(profile: str, grid: dict[str, list], fixed: dict) -> dict:
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
        raise SweepError(f"{out} holds another sweep ({describe(earlier)}); this one is {describe(record)}: "
                         "keep its profile, grid keys and -p values, or choose another --out")
    foreign = [n for n in names if not _sweep_owned(n, list(record["grid"]))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise SweepError(f"{out} holds {shown}, which `qwen-cls sweep` did not write; move it away or choose "
                         "another --out")


def describe(record: dict) -> str:
    """``--profile tiny -g learning_rate 0.001,0.005 -p max_train_samples 16`` for a ``sweep.json`` record."""
    text = f"--profile {record.get('profile')}"
    for key, values in dict(record.get("grid") or {}).items():
        text += f" -g {key} {','.join(value_text(v) for v in values)}"
    for key, value in dict(record.get("fixed") or {}).items():
        text += f" -p {key} {value_text(value)}"
    return text


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


# --- the comparison --------------------------------------------------------------------------------------------

def train_seconds(folder: Path) -> float | None:
    """Training time of a run: ``run_config.json``'s ``training.train_seconds``, else the Trainer's
    ``train_runtime`` in ``train_log.json`` (``None`` when neither records it)."""
    with contextlib.suppress(OSError, ValueError, LookupError, TypeError):
        seconds = json.loads((folder / RUN_CONFIG).read_text(encoding="utf-8"))["training"]["train_seconds"]
        if isinstance(seconds, (int, float)):
            return float(seconds)
    with contextlib.suppress(OSError, ValueError):
        log = json.loads((folder / TRAIN_LOG).read_text(encoding="utf-8"))
        for entry in reversed(log if isinstance(log, list) else []):
            if isinstance(entry, dict) and isinstance(entry.get("train_runtime"), (int, float)):
                return float(entry["train_runtime"])
    return None


def result_row(point: Point, folder: Path) -> dict:
    """One row of the comparison: ``point``, the grid values, ``validation_accuracy`` (``metrics.json``'s
    ``validation``: 03's last evaluation on validation rows), the test rows' ``accuracy``, ``macro_f1``,
    ``zero_shot`` (accuracy with the adapter off, where ``metrics.json`` has it) and ``train_seconds``."""
    metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
    zero_shot = metrics.get("zero_shot")
    validation = metrics.get("validation")
    return {"point": point.name, **point.values,
            "validation_accuracy": validation.get("accuracy") if isinstance(validation, dict) else None,
            "accuracy": metrics.get("accuracy"),
            "macro_f1": metrics.get("macro_f1"),
            "zero_shot": zero_shot.get("accuracy") if isinstance(zero_shot, dict) else None,
            "train_seconds": train_seconds(folder), "tiny_model": bool(metrics.get("tiny_model"))}


def ranked(rows: list[dict]) -> list[dict]:
    """``rows`` best first by ``validation_accuracy`` alone (ties and points without one keep their grid order,
    the latter last), each with its ``rank`` (1 = best; ``None`` without a validation accuracy). The test
    accuracy plays no part: choosing by it would be model selection on the test rows."""
    def key(item):
        position, row = item
        value = row["validation_accuracy"]
        missing = value is None or isinstance(value, float) and math.isnan(value)
        return (missing, 0.0 if missing else -value, position)

    order = [row for _, row in sorted(enumerate(rows), key=key)]
    out, rank = [], 0
    for row in order:
        has = row["validation_accuracy"] is not None and not (isinstance(row["validation_accuracy"], float)
                                                              and math.isnan(row["validation_accuracy"]))
        rank += has
        out.append({**row, "rank": rank if has else None})
    return out


def csv_text(rows: list[dict], keys: list[str]) -> str:
    """``sweep.csv``: one row per point, ranked (:func:`ranked`); empty cells where a run recorded nothing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "point", *keys, *RESULTS])
    for row in ranked(rows):
        writer.writerow(["" if row[c] is None else value_text(row[c]) for c in ("rank", "point", *keys, *RESULTS)])
    return buffer.getvalue()


def _cell(value, digits: int) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_text(rows: list[dict], keys: list[str], record: dict) -> str:
    """``sweep.md``: the command, then the table ranked by validation accuracy (:func:`ranked`; accuracies and
    macro-F1 to 3 places, seconds to 1)."""
    lines = [f"# qwen-cls sweep {describe(record)}", "",
             "Ranked by validation accuracy (validation rows split off the training file); the test columns "
             "(accuracy, macro_f1, zero_shot) are shown, never ranked by.", ""]
    lines.append("| rank | point | " + " | ".join(keys) + " | validation_accuracy | test accuracy | test macro_f1 | "
                 "test zero_shot | train_seconds |")
    lines.append("|---" * (len(keys) + 7) + "|")
    for row in ranked(rows):
        cells = ["—" if row["rank"] is None else str(row["rank"]), row["point"], *(value_text(row[k]) for k in keys),
                 _cell(row["validation_accuracy"], 3), _cell(row["accuracy"], 3),
                 _cell(row["macro_f1"], 3), _cell(row["zero_shot"], 3), _cell(row["train_seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if any(row["tiny_model"] for row in rows):
        lines += ["", "tiny random Qwen2: it learns nothing; these numbers show the mechanics only, not results"]
    return "\n".join(lines) + "\n"


def _write_text_if_changed(path: Path, text: str) -> bool:
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return False
    with atomic_file(path) as handle:
        handle.write(text)
    return True


def write_comparison(out: Path, points: list[Point], record: dict, *, force: bool = False) -> list[dict]:
    """``sweep.csv``, ``sweep.md`` and ``sweep.png`` from the points' own files; each written (atomically)
    only when its content changes (``force``: the plot is drawn again even so)."""
    keys = list(record["grid"])
    rows = [result_row(point, out / point.name) for point in points]
    changed = _write_text_if_changed(out / TABLE_CSV, csv_text(rows, keys))
    _write_text_if_changed(out / TABLE_MD, markdown_text(rows, keys, record))
    if changed or force or not (out / PLOT).is_file():
        import matplotlib.pyplot as plt

        from ..plots import sweep_plot

        fig = sweep_plot(rows, keys, path=out / PLOT, title=f"qwen-cls sweep ({record['profile']})")
        plt.close(fig)
    return rows


# --- the command -----------------------------------------------------------------------------------------------

def run_sweep(profile: str, out: str | os.PathLike, grid: dict[str, list], fixed: dict | None = None, *,
              log_output: bool = True, allow_lookalike_labels: bool = False) -> tuple[Path, list[dict]]:
    """Run every point of ``grid`` not yet finished, then write the comparison; return ``(DIR, rows)``.
    ``allow_lookalike_labels``: see :func:`~qwen_cls.chain.preflight.preflight`."""
    fixed = dict(fixed or {})
    points = plan(profile, grid, fixed, out)
    out = Path(out).expanduser().resolve()
    record = manifest(profile, grid, fixed)
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
        if _read_json(out / MANIFEST) != record:
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


def _read_json(path: Path):
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
