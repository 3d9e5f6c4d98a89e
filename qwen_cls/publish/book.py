"""``qwen-cls book`` (``make book``): the executed notebooks of a finished run, the README, ``docs/`` and the
solutions as a static website to read before running anything (Sphinx, MyST-NB, sphinx-book-theme).

The run's notebooks are shown as they were executed, never run again (``nb_execution_mode = "off"``): pictures,
tables and the one-line progress summaries as JupyterLab shows them (consecutive outputs of one stream merged,
``\\r`` overwriting the line as a terminal does). Every page says which run it came from (profile, model, date,
CPU: ``chain.json``, ``run_config.json``, ``metrics.json``), and a tiny run says on every page that its weights are
random. Chinese text uses Noto Sans SC, the font :mod:`qwen_cls.plots` draws with, cut down to the characters the
book holds and served from the book itself: reading the book fetches nothing from another machine.

Without ``--run`` the book shows ``runs/demo`` (``make demo``), or ``runs/demo-tiny`` when no demo exists. It is
built in a scratch folder inside ``--out`` and renamed into ``--out/html`` at the end; a folder there that this
command did not build (no ``.qwen_cls_book`` mark) is refused and left as it is.
"""

from __future__ import annotations

import html
import json
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..files import DataError, atomic_dir, atomic_file, check_output_folder
from ..run_record import METRICS, RUN_CONFIG
from ..serving.load_options import check_run_finished

ROOT = Path(__file__).resolve().parents[2]  # the repository: README.md, docs/, notebooks/solutions/
CONF = Path(__file__).with_name("book_conf.py.in")
DEMO, DEMO_TINY = Path("runs/demo"), Path("runs/demo-tiny")
DEFAULT_OUT = Path("runs/book")
CHAIN = "chain.json"  # written by qwen_cls.chain.run: profile, cpu, date, seconds per notebook
BOOK_MARK = ".qwen_cls_book"  # in the html folder: a book this command built (only such a folder is replaced)
FONT = "NotoSansSC-Regular.otf"
TINY_WARNING = ("tiny profile: random weights, the model learns nothing; these pages show the mechanics only "
                "(make demo, then make book, shows Gemma 3 270M really learning)")
_LINK = re.compile(r"(!?\[[^\]\n]*\])\(([^)\s]+)\)")


def pick_run(run: str | os.PathLike | None, root: Path = Path(".")) -> tuple[Path, str | None]:
    """The run to show and a note when it is not the one asked for: ``run``, else ``runs/demo``, else
    ``runs/demo-tiny``. A run that is missing, unfinished or without executed notebooks is a ``ValueError``
    naming it and the command that makes it."""
    note = None
    if run is None:
        demo, tiny = root / DEMO, root / DEMO_TINY
        if demo.exists() or not tiny.exists():
            if not demo.exists():
                raise DataError(demo, None, f"no run to show: neither {DEMO} nor {DEMO_TINY} exists; run `make demo` "
                                            "(or `make demo-tiny`, one minute) first, or pass --run RUN")
            run = demo
        else:
            run, note = tiny, (f"{DEMO} does not exist: the book shows {DEMO_TINY} ({TINY_WARNING})")
    run = Path(run)
    if not run.is_dir():
        raise DataError(run, None, "not a run folder; pass the --out folder of a finished `qwen-cls run`")
    check_run_finished(run, "--run")
    if not sorted((run / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        raise DataError(run / "notebooks", None, "no executed notebooks here: the book shows the notebooks of a "
                                                 "`qwen-cls run` (make demo); rerun it")
    return run, note


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(path, None, f"not valid JSON ({exc}); rerun the run that wrote it") from None


def run_facts(run: Path, root: Path = Path(".")) -> dict:
    """What every page says about the run: folder, profile, model, date, CPU, dtype, accuracy, seconds."""
    chain, config, metrics = (_read_json(run / name) for name in (CHAIN, RUN_CONFIG, METRICS))
    profile = chain.get("profile") or config.get("profile") or metrics.get("profile") or "unknown"
    stamp = (run / METRICS) if (run / METRICS).is_file() else run
    try:
        shown = Path(os.path.abspath(run)).relative_to(os.path.abspath(root)).as_posix()  # links not followed
    except ValueError:
        shown = run.name
    return {
        "run": shown,
        "profile": profile,
        "model": config.get("base_model") or metrics.get("base_model") or "unknown",
        "date": chain.get("date") or time.strftime("%Y-%m-%d", time.localtime(stamp.stat().st_mtime)),
        "cpu": chain.get("cpu") or "machine not recorded",
        "dtype": config.get("dtype"),
        "accuracy": metrics.get("accuracy"),
        "notebook_seconds": chain.get("notebook_seconds") or {},
        "tiny": profile == "tiny",
    }


def describe(facts: dict) -> str:
    """One line naming the run: ``runs/demo: profile gemma3-270m, model gemma3-270m, 2026-12-06, <CPU>``."""
    return (f"{facts['run']}: profile {facts['profile']}, model {facts['model']}, {facts['date']}, "
            f"{facts['cpu']}")


def fold_stream(text: str) -> str:
    """A stream's text as JupyterLab shows it: ``\\r`` returns to the start of the line, and what follows
    overwrites what was there (a tqdm bar's updates leave its last state, one line)."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown)
    return "\n".join(lines)


def jupyterlab_outputs(outputs: list[dict]) -> list[dict]:
    """Consecutive outputs of the same stream merged (as JupyterLab does), each stream folded by
    :func:`fold_stream`; every other output kept as it is, in its order."""
    merged: list[dict] = []
    for output in outputs:
        if (output.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                and merged[-1].get("name") == output.get("name")):
            merged[-1] = {**merged[-1], "text": _text(merged[-1]["text"]) + _text(output["text"])}
        else:
            merged.append(dict(output))
    for output in merged:
        if output.get("output_type") == "stream":
            output["text"] = fold_stream(_text(output["text"]))
    return [o for o in merged if o.get("output_type") != "stream" or o["text"].strip()]


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def rewrite_links(text: str, page: str, pages: set[str], repository: str | None) -> str:
    """Markdown links of ``page`` (its path in the book) to files the book does not hold: to the file in
    ``repository`` (a ``.../blob/<commit>`` URL) when given, else plain text. Links to the book's own
    pages and pictures, anchors and absolute URLs stay."""

    def one(match: re.Match) -> str:
        label, target = match.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        where = posixpath.normpath(posixpath.join(posixpath.dirname(page), path))
        if where in pages:
            return match.group(0)
        if repository:
            return f"{label}({repository.rstrip('/')}/{where}{'#' + anchor if anchor else ''})"
        return label[1:-1] if not label.startswith("!") else ""

    return _LINK.sub(one, text)


def _header(stem: str, facts: dict, solutions: set[str], repository: str | None) -> str:
    """The first cell of a notebook's page: the run it shows, its notebook, its solutions."""
    kind = "warning" if facts["tiny"] else "note"
    lines = [f":::{{admonition}} Outputs of the run `{facts['run']}`\n:class: {kind}",
             f"Profile `{facts['profile']}`, model `{facts['model']}`, run on {facts['date']} ({facts['cpu']}). "
             "This page shows what that run computed; building the book ran nothing."]
    if facts["tiny"]:
        lines.append(f"**{TINY_WARNING[0].upper()}{TINY_WARNING[1:]}.**")
    links = [f"the executed notebook: {{download}}`{stem}.ipynb <{stem}.ipynb>`"]
    if repository:
        links.append(f"[the committed notebook]({repository.rstrip('/')}/notebooks/{stem}.ipynb)")
    if f"notebooks/solutions/{stem}.md" in solutions:
        links.append(f"[the solutions of its exercises](solutions/{stem}.md)")
    lines.append("Download " + "; ".join(links) + ".")
    return "\n\n".join(lines) + "\n:::\n"


def stage(run: Path, src: Path, facts: dict, *, root: Path = ROOT, repository: str | None = None) -> list[str]:
    """Write the book's sources into ``src``: conf.py (the template) and book.json, index.md, the README,
    ``docs/`` and the solutions (links to files outside the book rewritten), the run's notebooks (a header
    cell added, outputs as JupyterLab shows them), the CSS and the font. Returns the notebooks' stems."""
    notebooks = sorted((run / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    markdown = {"README.md": root / "README.md"}
    markdown.update({f"docs/{p.name}": p for p in sorted((root / "docs").glob("*.md"))})
    markdown.update({f"notebooks/solutions/{p.name}": p for p in sorted((root / "notebooks/solutions").glob("*.md"))})
    missing = [str(p) for p in markdown.values() if not p.is_file()]
    if missing or not (root / "README.md").is_file():
        raise DataError(root / "README.md", None, "the book's pages (README.md, docs/, notebooks/solutions/) are not "
                                                  "here; run it in the repository's root")
    images = {f"docs/images/{p.name}": p for p in sorted((root / "docs/images").glob("*")) if p.is_file()}
    pages = {*markdown, *images, *(f"notebooks/{p.name}" for p in notebooks)}
    solutions = {k for k in markdown if k.startswith("notebooks/solutions/")}
    shown_text = []
    for name, path in markdown.items():
        text = rewrite_links(path.read_text(encoding="utf-8"), name, pages, repository)
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text, encoding="utf-8")
        shown_text.append(text)
    for name, path in images.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, src / name)
    for path in notebooks:
        try:
            notebook = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(path, None, f"not a readable notebook ({exc}); rerun the run") from None
        name = f"notebooks/{path.name}"
        for cell in notebook.get("cells", []):
            if cell.get("cell_type") == "code":
                cell["outputs"] = jupyterlab_outputs(cell.get("outputs", []))
            elif cell.get("cell_type") == "markdown":
                cell["source"] = rewrite_links(_text(cell.get("source", "")), name, pages, repository)
        notebook["cells"].insert(0, {"cell_type": "markdown", "metadata": {}, "id": "qwen-cls-book-run",
                                     "source": _header(path.stem, facts, solutions, repository)})
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(json.dumps(notebook, ensure_ascii=False), encoding="utf-8")
        shown_text.append(json.dumps(notebook, ensure_ascii=False))
    stems = [p.stem for p in notebooks]
    index = _index(facts, stems, sorted(solutions), sorted(k for k in markdown if k.startswith("docs/")))
    (src / "index.md").write_text(index, encoding="utf-8")
    shown_text.append(index)
    announcement = (f"Outputs of the run <code>{html.escape(facts['run'])}</code>: profile "
                    f"<b>{html.escape(facts['profile'])}</b>, model {html.escape(facts['model'])}, "
                    f"{html.escape(facts['date'])}, {html.escape(facts['cpu'])}")
    if facts["tiny"]:
        announcement += f". <b>{html.escape(TINY_WARNING[0].upper() + TINY_WARNING[1:])}.</b>"
    book = {"title": "qwen-cls: the book", "announcement": announcement, "repository_url": None}
    (src / "book.json").write_text(json.dumps(book, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(CONF, src / "conf.py")
    static = src / "_static"
    static.mkdir(exist_ok=True)
    (static / "book.css").write_text(_css(), encoding="utf-8")
    cjk_font(static / FONT, "".join(shown_text))
    return stems


def _index(facts: dict, stems: list[str], solutions: list[str], docs: list[str]) -> str:
    kind = "warning" if facts["tiny"] else "note"
    seconds = facts["notebook_seconds"]
    table = ["| notebook | seconds in this run |", "|---|---|"]
    table += [f"| [{stem}](notebooks/{stem}.ipynb) | {seconds[stem]:.0f} |" if stem in seconds else
              f"| [{stem}](notebooks/{stem}.ipynb) | — |" for stem in stems]
    accuracy = (f" After training, accuracy on its test rows: **{facts['accuracy']:.3f}** (`metrics.json`)."
                if isinstance(facts["accuracy"], (int, float)) else "")
    tiny = f"\n\n**{TINY_WARNING[0].upper()}{TINY_WARNING[1:]}.**" if facts["tiny"] else ""
    parts = [
        "# qwen-cls: the book\n",
        f":::{{admonition}} Outputs of the run `{facts['run']}`\n:class: {kind}\n\n"
        f"Profile `{facts['profile']}`, model `{facts['model']}`, "
        f"run on {facts['date']} ({facts['cpu']}).{accuracy}{tiny}\n:::\n",
        "The notebooks of qwen-cls (LoRA fine-tuning of a small LLM as a Chinese news classifier) as one "
        "`qwen-cls run` executed them, with the README, the guides and the exercise solutions: read what each "
        "step computes before running anything. To run them yourself: `make lab` (JupyterLab on the committed "
        "notebooks), or `make demo` for the whole chain; `make book` rebuilds this book from the last run.\n",
        "\n".join(table) + "\n",
        _toctree("Start", ["README"]),
        _toctree(f"Notebooks ({facts['run']})", [f"notebooks/{s}" for s in stems]),
        _toctree("Solutions", [s.removesuffix(".md") for s in solutions]),
        _toctree("Guides", [d.removesuffix(".md") for d in docs]),
    ]
    return "\n".join(parts)


def _toctree(caption: str, entries: list[str]) -> str:
    return "```{toctree}\n:maxdepth: 1\n:caption: " + caption + "\n\n" + "\n".join(entries) + "\n```\n"


def _css() -> str:
    return (f'@font-face {{ font-family: "Noto Sans SC Book"; src: url("{FONT}") format("opentype"); '
            "font-display: block; }\n"
            ':root { --pst-font-family-base: var(--pst-font-family-base-system), "Noto Sans SC Book", sans-serif;\n'
            '  --pst-font-family-heading: var(--pst-font-family-base-system), "Noto Sans SC Book", sans-serif;\n'
            '  --pst-font-family-monospace: var(--pst-font-family-monospace-system), "Noto Sans SC Book", '
            "monospace; }\n"
            "div.cell_output img { max-width: 100%; height: auto; }\n")


def cjk_font(target: Path, text: str) -> None:
    """Noto Sans SC (:mod:`qwen_cls.fonts`), cut down to the characters of ``text`` plus ASCII."""
    from fontTools import subset

    from ..fonts import cjk_font_path

    source = cjk_font_path()
    if source is None:
        raise DataError("pylopdf-fonts-zh-cn", None, "the Chinese font package is not installed; run `make setup`")
    options = subset.Options()
    options.layout_features, options.name_IDs, options.notdef_outline = ["*"], ["*"], True
    font = subset.load_font(str(source), options)
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=sorted({ord(c) for c in text if ord(c) > 0x7e} | set(range(0x20, 0x7f))))
    subsetter.subset(font)
    subset.save_font(font, str(target), options)


def build_book(run: str | os.PathLike | None = None, out: str | os.PathLike = DEFAULT_OUT, *,
               root: Path = ROOT, repository: str | None = None, jobs: int | str = "auto",
               quiet: bool = True) -> Path:
    """Build the book of ``run`` (:func:`pick_run`) into ``out/html``; returns ``out/html/index.html``."""
    from sphinx.cmd.build import build_main

    if not (root / "README.md").is_file():  # an installed (not editable) package: the repository is here
        root = Path(".")
    run, note = pick_run(run, Path("."))
    if note:
        print(note, file=sys.stderr)
    out = check_output_folder(out, "--out", spared="built")
    target = out / "html"
    if target.exists() and not (target / BOOK_MARK).is_file():
        raise DataError(target, None, f"exists and is not a book `qwen-cls book` built (no {BOOK_MARK}); it is left "
                                      "as it is: choose another --out, or move it away")
    out.mkdir(parents=True, exist_ok=True)
    facts = run_facts(run, Path("."))
    scratch = Path(tempfile.mkdtemp(prefix=".book-build.", dir=out))
    try:
        src = scratch / "src"
        src.mkdir()
        stage(run, src, facts, root=root, repository=repository)
        argv = ["-b", "html", "-j", str(jobs), "-d", str(scratch / "doctrees"), str(src), str(scratch / "html")]
        status = build_main(["-q", *argv] if quiet else argv)
        if status != 0:
            raise DataError(src, None, f"Sphinx stopped with status {status} (its messages are above)")
        with atomic_file(scratch / "html" / BOOK_MARK) as handle:
            json.dump({**facts, "built": time.strftime("%Y-%m-%d %H:%M:%S")}, handle, ensure_ascii=False)
        with atomic_dir(target) as tmp:
            tmp.rmdir()
            os.replace(scratch / "html", tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target / "index.html"


def cmd_book(args) -> int:
    started = time.perf_counter()
    index = build_book(args.run, args.out, repository=args.repository_url, jobs=args.jobs, quiet=not args.verbose)
    facts = json.loads((index.parent / BOOK_MARK).read_text(encoding="utf-8"))
    pages = sum(1 for _ in index.parent.rglob("*.html"))
    print(f"book: {index} ({pages} pages; {describe(facts)}) in {time.perf_counter() - started:.0f} s")
    return 0


def register(subparsers) -> None:
    """Add ``qwen-cls book`` to the CLI."""
    p = subparsers.add_parser("book", help="the executed notebooks of a finished run, the README and docs/ as a "
                                           "static website (runs/book/html), read offline")
    p.add_argument("--run", default=None,
                   help=f"the run to show (default: {DEMO}, or {DEMO_TINY} when no demo exists)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder of the book (default {DEFAULT_OUT}; the pages go "
                                                           "into its html/)")
    p.add_argument("--repository-url", default=None, metavar="URL",
                   help="links to files outside the book point there (e.g. https://github.com/OWNER/REPO/blob/SHA); "
                        "without it they are plain text")
    p.add_argument("--jobs", default="auto", help="Sphinx's parallel processes (default auto: one per core)")
    p.add_argument("--verbose", action="store_true", help="print Sphinx's progress, not only its warnings")
    p.set_defaults(func=cmd_book)
