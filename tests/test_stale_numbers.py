"""No stale numbers: every figure the notebooks' markdown, the solutions, the README and docs/ quote from a run is
written by `make docs-images`, listed in docs/figures.md with its key in docs/recorded_runs.json, or allowed there
with a reason; a listed quote must equal the record (`docs/update_images.py` writes the record from the runs)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("update_images", ROOT / "docs" / "update_images.py")
U = importlib.util.module_from_spec(spec)
spec.loader.exec_module(U)

RECORD = json.loads((ROOT / "docs" / "recorded_runs.json").read_text(encoding="utf-8"))
FIGURES = (ROOT / "docs" / "figures.md").read_text(encoding="utf-8")
# What looks like a run's result: an accuracy (three decimals), a time in minutes and seconds, in seconds, in minutes.
RESULT = re.compile(r"(?<![\d.])0\.\d{3}(?!\d)|\d+ min \d+ s\b|\d+ 分 \d+ 秒|(?<![\d.])\d+(?:\.\d+)? ?秒"
                    r"|(?<![\d.])\d+(?:–\d+)? ?分钟")
AUTO_BLOCK = re.compile(r"<!-- (\w+):start -->.*?<!-- \1:end -->", re.S)
NOTEBOOK_ROW = re.compile(r"^\| \[`\d\d_\w+`\].*$", re.M)  # the README's notebook table: its time column is written


def _table(heading: str) -> list[list[str]]:
    section = FIGURES.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


QUOTES = _table("Quotes of the recorded runs")
ALLOWED = _table("Not results of the recorded runs")


def texts() -> dict[str, str]:
    """File (relative) -> the text the rule covers: a notebook's markdown cells, the other files whole."""
    out = {}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        out[f"notebooks/{path.name}"] = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    for path in [*sorted((ROOT / "notebooks" / "solutions").glob("*.md")), ROOT / "README.md",
                 *sorted((ROOT / "docs").glob("*.md"))]:
        if path.name == "figures.md":  # the register itself
            continue
        out[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    return out


def record_value(key: str):
    profile, _, name = key.partition(".")
    value = RECORD["profiles"][profile]
    for part in name.split("."):
        value = value[part]
    return value


def formatted(value, how: str) -> str:
    if how in ("english_time", "chinese_time"):
        return getattr(U, how)(value)
    return format(value, how)


def spans(text: str, allowed: str) -> list[tuple[int, int]]:
    """Where ``allowed`` occurs in ``text``; ``…`` in it stands for any text between its parts."""
    first, *rest = allowed.split("…")
    found = []
    for match in re.finditer(re.escape(first), text):
        end = match.end()
        for part in rest:
            at = text.find(part, end)
            if at < 0:
                break
            end = at + len(part)
        else:
            found.append((match.start(), end))
    return found


def unexplained(files: dict[str, str]) -> list[str]:
    """``file: figure (context)`` for each run-like figure that is neither written by docs-images, listed nor
    allowed."""
    problems = []
    for name, text in files.items():
        covered = [m.span() for m in AUTO_BLOCK.finditer(text)]
        covered += [m.span() for m in re.finditer(re.escape(U.MEASURED) + r".*", text)]
        if name == "README.md":
            covered += [m.span() for m in NOTEBOOK_ROW.finditer(text)]
        for entries in (QUOTES, ALLOWED):
            for entry in entries:
                if entry[0] == name:
                    covered += spans(text, entry[1])
        for match in RESULT.finditer(text):
            if not any(start <= match.start() and match.end() <= end for start, end in covered):
                context = text[max(0, match.start() - 40):match.end() + 20].replace("\n", " ")
                problems.append(f"{name}: {match.group(0)!r} in …{context}…")
    return problems


def test_every_listed_quote_is_in_its_file_and_equals_the_record():
    files = texts()
    assert QUOTES, "docs/figures.md lists no quote"
    for name, quote, key, how in QUOTES:
        assert name in files, f"docs/figures.md names {name}, which the rule does not cover"
        assert quote in files[name], f"{name} no longer quotes {quote!r}: update docs/figures.md"
        expected = formatted(record_value(key), how)
        assert expected in quote, f"{name}: {quote!r} is stale: {key} is {expected} (docs/recorded_runs.json)"


def test_every_allowed_text_is_still_in_its_file():
    files = texts()
    for name, text, reason in ALLOWED:
        assert reason and spans(files.get(name, ""), text), f"docs/figures.md allows {text!r}, not in {name}"


def test_no_run_figure_is_unlisted():
    problems = unexplained(texts())
    assert not problems, "figures that look like run results, neither written by `make docs-images` nor listed " \
        "in docs/figures.md:\n" + "\n".join(problems)


def test_the_scan_finds_a_typed_figure_and_accepts_listed_allowed_and_written_ones():
    text = ("accuracy 0.872 here. 03 took 3 分 21 秒.\n<!-- headline:start -->\n0.901\n<!-- headline:end -->\n"
            f"{U.MEASURED}`tiny` 20 秒\n（0 秒）\n")
    found = unexplained({"notebooks/06_approaches.ipynb": text})
    assert [p.split(": ", 1)[1].split(" in ")[0] for p in found] == ["'0.872'", "'3 分 21 秒'"]


def test_notebook_measured_lines_and_readme_times_equal_the_record():
    gemma = RECORD["profiles"]["gemma3-270m"]["notebook_seconds"]
    tiny = RECORD["profiles"].get("tiny", {}).get("notebook_seconds", {})
    for stem in gemma:
        cells = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text(encoding="utf-8"))["cells"]
        line = next(x for x in "".join(cells[0]["source"]).split("\n") if x.startswith(U.MEASURED))
        assert line == U.measured_line(stem, gemma, tiny, RECORD["cpu"], RECORD["date"]), f"{stem}: stale time"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = U.HEADLINE.search(readme).group(0).split("\n", 1)[1].rsplit("<!--", 1)[0]
    assert U.update_readme(readme, block, gemma, tiny) == readme, "the README's notebook times are stale"


def test_written_blocks_hold_the_recorded_numbers():
    gemma = RECORD["profiles"]["gemma3-270m"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headline = U.HEADLINE.search(readme).group(0)
    assert f"**accuracy {gemma['accuracy']:.3f}**" in headline
    assert f"against {gemma['zero_shot']:.3f} zero-shot" in headline
    assert f"{U.english_time(sum(gemma['notebook_seconds'].values()))} for notebooks 00-07" in headline
    table = U.PROFILES.search(readme).group(0)
    for profile in RECORD["profiles"].values():
        if profile["profile"] != "tiny":
            assert f"**{profile['accuracy']:.3f}** (zero-shot {profile['zero_shot']:.3f}" in table
            assert f"| {U.english_time(profile['chain_seconds'])} |" in table
    doc = (ROOT / "docs" / "approaches.md").read_text(encoding="utf-8")
    written = U.approaches_block(gemma, RECORD["date"])
    assert U.APPROACHES.search(doc).group(0) == f"<!-- approaches:start -->\n{written}<!-- approaches:end -->"


def _fake_run(folder: Path, profile: str, accuracy: float) -> Path:
    (folder / "notebooks").mkdir(parents=True)
    for stem, seconds in (("03_lora_training", 201.4), ("04_evaluation", 99.0)):
        (folder / "notebooks" / f"{stem}.ipynb").write_text(json.dumps(
            {"cells": [], "metadata": {"papermill": {"duration": seconds}}, "nbformat": 4, "nbformat_minor": 5}))
    (folder / "metrics.json").write_text(json.dumps({
        "profile": profile, "base_model": profile, "accuracy": accuracy, "macro_f1": 0.5, "n_test": 500,
        "zero_shot": {"accuracy": 0.346}, "chance_accuracy": 0.32, "ece": 0.031,
        "validation": {"rows": 50, "of": 300, "accuracy": 0.78, "macro_f1": 0.7, "sha256": "x"}}))
    (folder / "run_config.json").write_text(json.dumps({"dtype": "bfloat16", "training": {"train_rows": 800}}))
    (folder / "approaches.json").write_text(json.dumps({"lora": {
        "accuracy": 0.847, "macro_f1": 0.839, "n_test": 150, "train_seconds": 172.6, "rows_per_second": 16.1}}))
    (folder / "chain.json").write_text(json.dumps({"seconds": 457.2, "peak_kernel_rss_mib": 3891, "cpu": "2-core X",
                                                   "date": "2026-12-06"}))
    return folder


def test_record_writer_reads_a_finished_run_and_leaves_out_unfinished_ones(tmp_path):
    demo = _fake_run(tmp_path / "demo", "gemma3-270m", 0.872)
    tiny = _fake_run(tmp_path / "demo-tiny", "tiny", 0.25)
    (tiny / "RUN_INCOMPLETE").write_text("")
    record = U.record_runs({"gemma3-270m": demo, "tiny": tiny, "qwen2.5-coder-0.5b": tmp_path / "absent"},
                           cpu="2-core X", day="2026-12-06")
    assert list(record["profiles"]) == ["gemma3-270m"] and record["cpu"] == "2-core X"
    gemma = record["profiles"]["gemma3-270m"]
    assert (gemma["accuracy"], gemma["zero_shot"], gemma["validation_accuracy"], gemma["validation_rows"],
            gemma["validation_of"], gemma["train_rows"], gemma["n_test"], gemma["ece"]) == \
        (0.872, 0.346, 0.78, 50, 300, 800, 500, 0.031)
    assert gemma["notebook_seconds"] == {"03_lora_training": 201.4, "04_evaluation": 99.0}
    assert (gemma["chain_seconds"], gemma["peak_kernel_rss_mib"], gemma["date"], gemma["run"]) == \
        (457.2, 3891, "2026-12-06", "demo")
    assert gemma["approaches"]["lora"]["accuracy"] == 0.847
    U.write_record(record, tmp_path / "recorded_runs.json")
    assert json.loads((tmp_path / "recorded_runs.json").read_text(encoding="utf-8")) == record
    shutil.rmtree(demo / "notebooks")  # no executed notebooks: chain.json still gives the chain's seconds
    assert U.record_runs({"gemma3-270m": demo}, cpu="c", day="d")["profiles"]["gemma3-270m"]["notebook_seconds"] == {}
    with pytest.raises(ValueError, match="not 'tiny'"):
        U.record_runs({"tiny": demo}, cpu="c", day="d")


def test_approaches_block_replaces_only_its_block():
    figures = {"approaches": {"lora": {"accuracy": 0.8474, "macro_f1": 0.839, "n_test": 150, "train_seconds": 172.6,
                                       "rows_per_second": 16.14}},
               "cpu": "2-core X", "dtype": "bfloat16", "train_rows": 800, "ece": 0.0314, "n_test": 500}
    block = U.approaches_block(figures, "2026-12-06")
    assert "| `lora` | 0.847 | 0.839 | 150 | 172.6 | 16.1 |" in block and "`ece` 0.031" in block
    doc = "head\n<!-- approaches:start -->\nold\n<!-- approaches:end -->\ntail\n"
    assert U.update_approaches_doc(doc, block) == \
        f"head\n<!-- approaches:start -->\n{block}<!-- approaches:end -->\ntail\n"
    with pytest.raises(ValueError, match="approaches"):
        U.update_approaches_doc("no block", block)
