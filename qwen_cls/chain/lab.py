"""``qwen-cls lab``: one switch for the whole chain. Working copies of notebooks 00-07 with a profile injected
(:func:`~qwen_cls.chain.templating.prepare_notebooks`), then JupyterLab on them, listening on 127.0.0.1 only.

The committed notebooks hold the ``gemma3-270m`` profile; ``qwen-cls lab --profile tiny`` moves all eight to
the tiny model (a quick mechanics pass on a weak laptop), ``--profile qwen2.5-coder-0.5b`` to Qwen's own model of
the Qwen2-0.5B shape (offline, a CPU), ``--profile qwen2-0.5b`` to the recipe (a GPU),
without editing a cell. The copies live in ``runs/lab-<profile>/notebooks`` (git-ignored); a copy the learner
changed is kept as it is, never overwritten. The profile's offline model is built into the cache first when it is
missing (the notebooks only find it there).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from ..chapters import notebooks_dir
from ..profiles import COMMITTED_PROFILE, PROFILES
from .templating import prepare_notebooks

HOST = "127.0.0.1"  # JupyterLab runs code for whoever reaches it: never listen beyond this machine


def lab_folder(profile: str) -> Path:
    """Where ``qwen-cls lab --profile PROFILE`` prepares its copies: ``runs/lab-<profile>/notebooks``."""
    return notebooks_dir().parent / "runs" / f"lab-{profile}" / "notebooks"


def lab_command(folder: str | os.PathLike, *, port: int | None = None, browser: bool = True,
                allow_root: bool = False) -> list[str]:
    """The JupyterLab command line for ``folder``, bound to :data:`HOST` (it prints its address with a token);
    ``allow_root``: ``--allow-root``, without which JupyterLab refuses to start as root."""
    command = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.ip={HOST}", f"--ServerApp.root_dir={folder}"]
    if port is not None:
        command.append(f"--ServerApp.port={port}")
    if not browser:
        command.append("--no-browser")
    if allow_root:
        command.append("--allow-root")
    return command


def cmd_lab(args) -> int:
    folder = Path(args.dir).expanduser().resolve() if args.dir else lab_folder(args.profile)
    done = prepare_notebooks(args.profile, folder)
    from ..model_builds.offline import ensure_built  # torch: not at `qwen-cls` start

    ensure_built(PROFILES[args.profile]["base_model"])  # before JupyterLab: the notebooks never build a model
    written = [name for name, what in done.items() if what == "written"]
    kept = [name for name, what in done.items() if what == "kept"]
    print(f"{len(done)} notebooks with the {args.profile} profile in {folder}")
    if written:
        print(f"  prepared: {', '.join(written)}")
    if kept:
        print(f"  kept as you left them (changed since prepared; delete a file to get a fresh copy): {', '.join(kept)}")
    as_root = os.geteuid() == 0  # containers, Colab-like machines: JupyterLab refuses root without --allow-root
    command = lab_command(folder, port=args.port, browser=not args.no_browser, allow_root=as_root)
    if as_root:
        print("note: running as root (a container?): JupyterLab gets --allow-root; it still listens on "
              f"{HOST} only")
    if args.prepare_only:
        print(f"open them with: {shlex.join(command)}")
        return 0
    print(f"starting JupyterLab on {HOST} (Ctrl+C stops it): open 00_check_environment.ipynb, run every notebook "
          "in order", flush=True)
    os.execv(command[0], command)  # JupyterLab takes over this process (its Ctrl+C, its exit status)
    return 0  # not reached, except where execv is replaced (tests)


def register(subparsers) -> None:
    """Add ``qwen-cls lab`` to the CLI."""
    p = subparsers.add_parser(
        "lab", help="copies of notebooks 00-07 with a profile injected, opened in JupyterLab on 127.0.0.1")
    p.add_argument("--profile", choices=sorted(PROFILES), default=COMMITTED_PROFILE,
                   help=f"parameter set injected into every notebook (default {COMMITTED_PROFILE}, the committed "
                        "notebooks' values): tiny (a 1-minute mechanics pass) or qwen2-0.5b (the recipe, on a GPU)")
    p.add_argument("--dir", default=None,
                   help="folder for the copies (default: runs/lab-<profile>/notebooks); changed copies are kept")
    p.add_argument("--port", type=int, default=None, help="JupyterLab's port (default: its own, 8888 or the next free)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser (JupyterLab prints the address)")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the copies and print the JupyterLab command, without starting it")
    p.set_defaults(func=cmd_lab)
