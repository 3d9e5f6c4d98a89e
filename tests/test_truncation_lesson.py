"""Notebook 02's lesson shows the blog's ``[:max_length]`` cutting answers under every profile (issue 32, item 2):
its cells, taken from the committed notebook and run as they are, on the default profile's rows (the 800 THUCNews
training headlines 01 keeps, Gemma 3 270M's tokenizer, max_length 128) and on the tiny profile's sample rows."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

from qwen_cls import data

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "02_tokenization.ipynb"
NEEDLES = ("from qwen_cls.prompt import SYSTEM_PROMPT", "def fit_prompt(", "tokenized = tokenize_dataset(",
           "report = truncation_report(",
           "full_prompts = ", "cut_length = ")


def run_lesson(tokenizer, train_rows: list[dict], max_length: int, folder: Path) -> dict:
    cells = [c for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    namespace = {"tokenizer": tokenizer, "train_rows": train_rows, "max_length": max_length, "profile": "test",
                 "report_path": folder / "truncation_report.json"}
    for needle in NEEDLES:
        found = [c for c in cells if needle in "".join(c["source"])]
        assert len(found) == 1, needle
        exec("".join(found[0]["source"]), namespace)
    return namespace


def rows_of(path: Path, n_train: int, n_validation: int) -> list[dict]:
    train, _ = data.split_train_validation(data.read_raw_rows(path), n_train, n_validation, 42)
    return [data.to_instruction_row(r) for r in train]


@pytest.mark.slow
def test_02_shows_the_blogs_cut_dropping_answers_of_the_default_profiles_headlines(gemma_tokenizer, tmp_path,
                                                                                   capsys):
    path = ROOT / "data" / "thucnews" / "train.jsonl"
    if not path.is_file():
        pytest.skip("data/thucnews/ not fetched (make setup)")
    ns = run_lesson(gemma_tokenizer, rows_of(path, 800, 300), 128, tmp_path)
    assert ns["report"]["recipe_answer_cut"] == 0  # at max_length 128 the blog's cut touches no headline ...
    assert max(ns["full_lengths"]) <= 128
    # ... so 02 cuts at the median full length, 71 tokens: 323 of the 800 headlines lose their whole answer, 69 part
    # of it; the answer-preserving rule at 71 shortens 406 headlines and keeps every answer (the cell asserts it)
    assert (ns["cut_length"], ns["blog_gone"], ns["blog_partly"]) == (71, 323, 69)
    assert sum(ns["ours"]["text_truncated"]) == 406
    out = capsys.readouterr().out
    assert f"cut_length = {ns['cut_length']} (训练行完整长度的中位数" in out
    assert f"{ns['blog_partly']} 行只剩部分答案, {ns['blog_gone']} 行整个答案都没了" in out


def test_02_cuts_the_tiny_profiles_sample_at_its_own_max_length(tokenizer, tmp_path, capsys):
    rows = rows_of(ROOT / "data" / "sample" / "train.jsonl", 0, 8)  # tiny: 72 training rows, max_length 384
    ns = run_lesson(tokenizer, rows, 384, tmp_path)
    assert ns["cut_length"] == 384 and "(这次的 max_length: 它已经会切掉答案)" in capsys.readouterr().out
    # the long synthetic rows: 18 of 72 lose their whole answer at 384, as 02's report counts them
    assert (ns["blog_gone"], ns["blog_partly"]) == (18, 0) == (ns["report"]["recipe_answer_gone"], 0)
