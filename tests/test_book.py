"""``qwen-cls book`` (``make book``): the executed notebooks of a run, the README, docs/ and the solutions as a
static website. The book of the shared tiny run is built as ``make book`` builds it and read in headless Chromium
with the network off: every page renders, every picture loads, no request leaves the machine, no cell error, the
Chinese font is the book's own; each notebook page shows the run's pictures (the same PNG bytes) and its progress
lines, and names the run it came from."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from _chromium import chromium_tab, outside
from _tiny_run import subprocess_env
from test_dashboard import CHROMIUM

from qwen_cls.commands.cli import main
from qwen_cls.publish.book import BOOK_MARK, fold_stream, jupyterlab_outputs, pick_run, rewrite_links

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ outputs as JupyterLab shows them


def test_a_carriage_return_overwrites_the_line_as_in_a_terminal():
    bar = "\rtrain:   0%|          | 0/36\rtrain:  50%|#####     | 18/36\rtrain: 100%|##########| 36/36"
    assert fold_stream(bar) == "train: 100%|##########| 36/36"
    assert fold_stream("abcdef\rXY") == "XYcdef"  # only what is written over is replaced
    assert fold_stream("first\r\nsecond\rSECOND\n") == "first\nSECOND\n"  # \r\n is a newline


def test_consecutive_outputs_of_one_stream_merge_and_other_outputs_keep_their_place():
    picture = {"output_type": "display_data", "data": {"image/png": "iVBOR"}, "metadata": {}}
    outputs = [{"output_type": "stream", "name": "stderr", "text": "\rLoading: 10%"},
               {"output_type": "stream", "name": "stderr", "text": ["\rLoading: 100%", "\n"]},
               {"output_type": "stream", "name": "stdout", "text": "rows: 16\n"},
               picture,
               {"output_type": "stream", "name": "stderr", "text": "\n"},  # a bare newline shows nothing
               {"output_type": "stream", "name": "stdout", "text": "done\n"}]
    assert jupyterlab_outputs(outputs) == [
        {"output_type": "stream", "name": "stderr", "text": "Loading: 100%\n"},
        {"output_type": "stream", "name": "stdout", "text": "rows: 16\n"},
        picture,
        {"output_type": "stream", "name": "stdout", "text": "done\n"}]


def test_links_to_files_outside_the_book_go_to_the_repository_or_become_text():
    pages = {"README.md", "docs/cli.md", "docs/images/a.png", "notebooks/03_x.ipynb"}
    text = ("[cli](docs/cli.md) [nb](notebooks/03_x.ipynb) ![pic](docs/images/a.png) [bench](benchmarks/RESULTS.md) "
            "[web](https://swanlab.cn) [here](#four-profiles) [opts](docs/cli.md#options)")
    assert rewrite_links(text, "README.md", pages, None) == (
        "[cli](docs/cli.md) [nb](notebooks/03_x.ipynb) ![pic](docs/images/a.png) bench "
        "[web](https://swanlab.cn) [here](#four-profiles) [opts](docs/cli.md#options)")
    assert rewrite_links("[make](../Makefile#L3) [back](../README.md)", "docs/cli.md", pages,
                         "https://github.com/o/r/blob/abc") == (
        "[make](https://github.com/o/r/blob/abc/Makefile#L3) [back](../README.md)")


# ------------------------------------------------------------------ which run, and what is never touched


def fake_run(folder: Path, profile: str = "tiny") -> Path:
    """A finished run's files as far as the book reads them (no model)."""
    (folder / "notebooks").mkdir(parents=True)
    (folder / "notebooks" / "00_check_environment.ipynb").write_text(
        json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}), encoding="utf-8")
    (folder / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "profile": profile}), encoding="utf-8")
    (folder / "params.json").write_text("{}", encoding="utf-8")
    return folder


def test_the_demo_is_shown_else_the_tiny_run_which_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["book"]) == 2  # neither run exists
    err = capsys.readouterr().err
    assert "runs/demo" in err and "make demo" in err and "Traceback" not in err
    fake_run(tmp_path / "runs" / "demo-tiny")
    run, note = pick_run(None, tmp_path)
    assert run == tmp_path / "runs" / "demo-tiny" and "random weights" in note
    fake_run(tmp_path / "runs" / "demo", "gemma3-270m")
    assert pick_run(None, tmp_path) == (tmp_path / "runs" / "demo", None)
    (tmp_path / "runs" / "demo" / "RUN_INCOMPLETE").write_text("", encoding="utf-8")
    assert main(["book"]) == 2  # an unfinished demo is named, never silently replaced by the tiny run
    assert "runs/demo" in capsys.readouterr().err


def test_a_folder_the_book_did_not_build_is_refused_and_left_as_it_is(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path / "run")
    mine = tmp_path / "book" / "html" / "index.html"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own page", encoding="utf-8")
    assert main(["book", "--run", str(run), "--out", str(tmp_path / "book")]) == 2
    assert BOOK_MARK in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "book").rglob("*")] == ["html", "index.html"]  # nothing added, no scratch
    assert mine.read_text(encoding="utf-8") == "my own page"


# ------------------------------------------------------------------ the tiny run's book, read in a browser


def png_hashes(notebook: Path) -> list[str]:
    """SHA-256 of every PNG the executed notebook shows, in order."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return [hashlib.sha256(base64.b64decode("".join(o["data"]["image/png"]))).hexdigest()
            for cell in cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


def progress_lines(notebook: Path) -> list[str]:
    """The last state of every progress bar (a stream written with ``\\r``) the notebook printed."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    texts = ["".join(o["text"]) if isinstance(o["text"], list) else o["text"]
             for cell in cells for o in cell.get("outputs", []) if o.get("output_type") == "stream"]
    return [t.split("\r")[-1].strip() for t in texts if "\r" in t and t.split("\r")[-1].strip()]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium); .ci/run installs it")
def test_the_tiny_runs_book_reads_offline_in_headless_chromium(tiny_run, tmp_path):
    run, _, _ = tiny_run
    chain = json.loads((run / "chain.json").read_text(encoding="utf-8"))
    config = json.loads((run / "run_config.json").read_text(encoding="utf-8"))
    started = time.perf_counter()
    command = [sys.executable, "-m", "qwen_cls", "book", "--run", str(run), "--out", str(tmp_path / "book")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=subprocess_env())
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = tmp_path / "book" / "html"
    assert proc.stdout.startswith(f"book: {html / 'index.html'}")
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    assert seconds < 120, seconds  # the book's promise on 2 cores (the demo's book takes about 10 s)
    assert sorted(p.name for p in (tmp_path / "book").iterdir()) == ["html"]  # the scratch folder is gone

    notebooks = sorted((run / "notebooks").glob("*.ipynb"))
    pages = sorted(p for p in html.rglob("*.html") if "_static" not in p.parts)
    expected = {"index.html", "README.html", "search.html", "genindex.html",
                *(f"notebooks/{n.stem}.html" for n in notebooks),
                *(f"notebooks/solutions/{p.stem}.html" for p in (ROOT / "notebooks" / "solutions").glob("*.md")),
                *(f"docs/{p.stem}.html" for p in (ROOT / "docs").glob("*.md"))}
    assert {p.relative_to(html).as_posix() for p in pages} == expected
    banner = [f"profile {chain['profile']}", f"model {config['base_model']}", chain["date"], chain["cpu"],
              "random weights, the model learns nothing"]
    assert chain["profile"] == "tiny"

    seen = {}
    with chromium_tab() as tab:
        for page in pages:
            name = page.relative_to(html).as_posix()
            report = tab.open(page.as_uri())
            assert not outside(report["requests"]), (name, outside(report["requests"]))
            assert not report["failed"], (name, report["failed"])
            assert not report["errors"], (name, report["errors"])
            text = tab.evaluate("document.body.innerText")
            assert tab.evaluate("document.querySelector('main.bd-main') !== null"), (name, text[:300])
            for fact in banner:  # every page names the run and says the tiny model's weights are random
                assert fact in tab.evaluate("document.querySelector('.bd-header-announcement').innerText"), (name, fact)
            assert tab.evaluate("document.querySelectorAll('.output.traceback, .output.error, "
                                "div.system-message, .problematic').length") == 0, name
            broken = tab.evaluate(
                "Promise.all([...document.images].map(i => { i.loading = 'eager'; "
                "return i.decode().then(() => null, () => i.src); })).then(a => a.filter(x => x))", wait=True)
            assert broken == [], (name, broken)
            # Chinese text: the book's own Noto Sans SC (qwen_cls.plots' font), loaded from the book
            assert tab.evaluate("document.fonts.load('16px \"Noto Sans SC Book\"', '数据转换').then(f => f.length)",
                                wait=True) == 1, name
            seen[name] = {"text": text, "requests": report["requests"], "images": tab.evaluate(
                "[...document.querySelectorAll('.cell_output img')].map(i => i.src)"), "links": tab.evaluate(
                "[...document.querySelectorAll('article a[href]')].map(a => a.href)")}

    font = [u for u in seen["index.html"]["requests"] if u.endswith(".otf")]
    assert font and font[0].startswith(html.as_uri())
    for notebook in notebooks:
        page = seen[f"notebooks/{notebook.stem}.html"]
        shown = [hashlib.sha256(Path(unquote(src.removeprefix("file://"))).read_bytes()).hexdigest()
                 for src in page["images"]]
        assert shown == png_hashes(notebook), notebook.stem  # every picture of the run, the same bytes, in order
        for line in progress_lines(notebook):
            assert line in page["text"], (notebook.stem, line)
        assert not re.search(r"\r", page["text"])
        assert "Outputs of the run" in page["text"] and chain["date"] in page["text"]
        downloads = [a for a in page["links"] if a.endswith(f"/{notebook.name}")]
        assert downloads and Path(unquote(downloads[0].removeprefix("file://"))).read_bytes()  # the executed notebook
        if (ROOT / "notebooks" / "solutions" / f"{notebook.stem}.md").is_file():
            assert (html / "notebooks" / "solutions" / f"{notebook.stem}.html").as_uri() in page["links"]
    for stem in ("03_lora_training", "04_evaluation", "06_approaches"):  # learning curve, confusion matrix, chart
        assert seen[f"notebooks/{stem}.html"]["images"], stem
