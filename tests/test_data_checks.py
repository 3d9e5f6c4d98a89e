"""Nothing wrong in silence (issue 33): what the data step checks before anything runs.

- test rows whose text a training row also has (leaked into training): counted, warned about by ``qwen-cls run``'s
  preflight with the test file's line numbers, recorded by 04 in ``metrics.json`` as ``leaked_test_rows``;
- labels that differ only by case or full-width letters (``Sports`` / ``sports``): refused by ``qwen-cls convert``
  and the preflight, naming files and lines, unless ``--allow-lookalike-labels``;
- the chat families' special tokens (``<|im_end|>``, ``<end_of_turn>``, ...) in a text or label: refused with
  ``path:line``, the token and the fix, since a tokenizer reads them as control tokens, not as text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_labels import TEST, TRAIN, write_raw

from qwen_cls import data
from qwen_cls.chain import sweep
from qwen_cls.chain.preflight import preflight
from qwen_cls.chain.templating import resolve_parameters
from qwen_cls.commands.cli import main
from qwen_cls.files import DataError
from qwen_cls.prompt import CONTROL_TOKEN, control_tokens

pytestmark = pytest.mark.filterwarnings("ignore")


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. test rows leaked into training ----------------------------------------------------------------------------

def test_leaked_rows_are_exact_text_matches_in_either_row_form():
    train = [data.RawRow("球队夺冠", ["Sports", "Art"], "Sports", 1), {"text": "画展开幕", "output": "Art"}]
    test = [{"text": "球队夺冠"}, {"text": "球队夺冠 "}, {"text": "画展开幕"}, {"text": "舰艇演习"},
            data.RawRow("画展开幕", ["Art", "Sports"], "Art", 9)]
    assert data.leaked_rows(train, test) == [0, 2, 4]  # "球队夺冠 " (a trailing space) is another text
    assert data.leaked_rows(train, []) == [] and data.leaked_rows([], test) == []


def _split_training_rows(params: dict, train_path: Path) -> tuple[list, list]:
    """The rows 01 trains on and validates with, split as 01 splits them."""
    return data.split_train_validation(data.read_raw_rows(train_path), params["max_train_samples"],
                                       params["validation_rows"], params["seed"])


def test_preflight_warns_of_test_rows_whose_text_training_has(tmp_path, capsys):
    train = write_raw(tmp_path / "train.jsonl", TRAIN)
    params = resolve_parameters("tiny", {"train_path": str(train), "test_path": str(tmp_path / "test.jsonl"),
                                         "validation_rows": 4}, tmp_path / "out")
    trained, validation = _split_training_rows(params, train)
    # lines 2 and 4 copy training rows, line 5 a validation row (never trained on: not a leak of training)
    test = write_raw(tmp_path / "test.jsonl", [TEST[0], trained[3].to_dict(), TEST[1], trained[0].to_dict(),
                                               validation[0].to_dict(), TEST[2]])
    preflight(params)  # a warning, not an error
    err = capsys.readouterr().err
    assert f"warning: {test}: 2 of 6 test rows have exactly the text of a training row of {train} (lines 2, 4; the " \
           "text field compared as written)" in err
    assert "leaked_test_rows" in err and "Remove them from one of the files" in err
    assert not (tmp_path / "out").exists()
    write_raw(test, TEST)
    preflight(params)
    assert "exactly the text" not in capsys.readouterr().err  # nothing leaked: nothing said


@pytest.mark.slow
@pytest.mark.subprocess
def test_04_records_leaked_test_rows_in_metrics_json(tiny_run, tmp_path):
    """The session's tiny run, copied, with two of its 8 test rows replaced by training rows; 04 run again on it."""
    import papermill

    from qwen_cls.chain.templating import notebook_parameters
    from qwen_cls.chapters import notebooks_dir

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out, symlinks=True)
    rows = {name: [json.loads(line) for line in (out / "data" / f"{name}.jsonl").read_text(encoding="utf-8")
                   .splitlines()] for name in ("train", "test")}
    test = list(rows["test"])
    test[1], test[6] = rows["train"][0], rows["train"][5]
    (out / "data" / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test),
                                             encoding="utf-8")
    known = {r["text"] for r in rows["train"]}
    assert sum(r["text"] in known for r in rows["test"]) == 0  # the shared run's own test rows: none leaked
    params = json.loads((out / "params.json").read_text(encoding="utf-8"))
    name = "04_evaluation.ipynb"
    declared = notebook_parameters(notebooks_dir() / name)
    given = {k: params[k] for k in declared if k in params} | {"out_dir": str(out), "swanlab_mode": "disabled"}
    papermill.execute_notebook(str(notebooks_dir() / name), str(tmp_path / name), parameters=given,
                               cwd=str(notebooks_dir()), progress_bar=False)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["leaked_test_rows"] == sum(r["text"] in known for r in test) == 2
    assert json.loads((tiny_run[0] / "metrics.json").read_text(encoding="utf-8"))["leaked_test_rows"] == 0


# --- 2. look-alike labels -----------------------------------------------------------------------------------------

LOOKALIKE = [
    {"text": "球队夺冠", "category": ["Sports", "Art"], "output": "Sports"},
    {"text": "画展开幕", "category": ["Art", "Sports"], "output": "Art"},
    {"text": "联赛揭幕", "category": ["sports", "Art"], "output": "sports"},
    {"text": "决赛打响", "category": "Ｓｐｏｒｔｓ, Economy", "output": "Ｓｐｏｒｔｓ"},  # full-width letters
    {"text": "银行加息", "category": ["Economy", "Art"], "output": "Economy"},
]


def test_convert_refuses_lookalike_labels_naming_files_and_lines(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw.jsonl", LOOKALIKE)
    out = tmp_path / "rows.jsonl"
    out.write_text("an earlier conversion\n", encoding="utf-8")
    assert main(["convert", str(raw), str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"error: labels that differ only by case (or full-width letters): 'Sports' ({raw}:1, {raw}:2) / "
            f"'sports' ({raw}:3) / 'Ｓｐｏｒｔｓ' ({raw}:4). They would be learned as different labels: write each "
            "label one way in every file, or pass --allow-lookalike-labels if they really are different labels") in err
    assert "Economy" not in err and "Traceback" not in err
    assert out.read_text(encoding="utf-8") == "an earlier conversion\n"  # left as it was

    assert main(["convert", str(raw), str(out), "--labels", "--allow-lookalike-labels"]) == 0
    captured = capsys.readouterr()
    assert "warning: labels that differ only by case" in captured.err and "--allow-lookalike-labels: they are " \
        "learned as different labels" in captured.err
    assert [r["output"] for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())] == \
        [r["output"] for r in LOOKALIKE]
    assert {line.split()[0] for line in captured.out.splitlines()[1:]} == {"Sports", "sports", "Ｓｐｏｒｔｓ", "Art",
                                                                          "Economy"}


def test_surrounding_whitespace_alone_makes_one_label_not_two(tmp_path, capsys):
    """Every label is stripped as it is read, so ``"Sports "`` is ``Sports``: nothing to refuse."""
    rows = [{"text": "球队夺冠", "category": ["Sports ", "Art"], "output": "Sports "},
            {"text": "联赛揭幕", "category": [" Sports", "Art"], "output": "Sports"},
            {"text": "画展开幕", "category": "Art ,Sports", "output": " Art"}]
    raw = write_raw(tmp_path / "raw.jsonl", rows)
    assert main(["convert", str(raw), str(tmp_path / "rows.jsonl"), "--labels"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and [line.split() for line in out.out.splitlines()[1:]] == [["Sports", "2"], ["Art", "1"]]


def test_run_refuses_lookalike_labels_across_train_and_test_before_anything(tmp_path, capsys):
    train = write_raw(tmp_path / "train.jsonl", TRAIN)  # Sports, Economy
    test = write_raw(tmp_path / "test.jsonl", [TEST[0], {"text": "联赛揭幕", "category": ["SPORTS", "Art"],
                                                         "output": "SPORTS"}])
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    assert main(["run", "--profile", "tiny", "--out", str(out), "-p", "train_path", str(train), "-p", "test_path",
                 str(test), "-p", "validation_rows", "2"]) == 2
    err = capsys.readouterr().err
    assert f"error: labels that differ only by case (or full-width letters): 'Sports' ({train}:1, {train}:2, " \
           f"{train}:3, ... 17 rows) / 'SPORTS' ({test}:2)" in err  # 16 training rows and test line 1 list Sports
    assert "--allow-lookalike-labels" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before and not out.exists()

    params = resolve_parameters("tiny", {"train_path": str(train), "test_path": str(test), "validation_rows": 2},
                                out)
    preflight(params, allow_lookalike_labels=True)  # opted in: a warning, and the run would go on
    assert "warning: labels that differ only by case" in capsys.readouterr().err


def test_sweep_refuses_lookalike_labels_and_passes_the_opt_in_to_every_run(tmp_path, capsys, monkeypatch):
    train = write_raw(tmp_path / "train.jsonl", TRAIN)
    test = write_raw(tmp_path / "test.jsonl", [{"text": "联赛揭幕", "category": ["sports", "Art"], "output": "sports"}])
    args = ["sweep", "--profile", "tiny", "--out", str(tmp_path / "sweep"), "-g", "seed", "1,2", "-p", "train_path",
            str(train), "-p", "test_path", str(test), "-p", "validation_rows", "2"]
    assert main(args) == 2
    assert "'sports'" in capsys.readouterr().err and not (tmp_path / "sweep").exists()
    calls = []

    def run_chain(*a, **kw):
        calls.append(kw["allow_lookalike_labels"])
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_chain", run_chain)
    assert main(args + ["--allow-lookalike-labels"]) == 130  # preflight passed; the first point's run started
    assert calls == [True]


# --- 4. the chat families' special tokens in data -------------------------------------------------------------------

def _specials(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def test_the_pattern_matches_every_special_token_of_the_offline_tokenizers(tokenizer, gemma_tokenizer):
    from qwen_cls.model import load_tokenizer
    from qwen_cls.model_cache import QWEN_BUILD

    tokenizers = [tokenizer, gemma_tokenizer]
    if QWEN_BUILD.state(QWEN_BUILD.default_dir())[0] == "built":
        tokenizers.append(load_tokenizer(QWEN_BUILD.default_dir()))
    for tok in tokenizers:
        specials = _specials(tok)
        assert len(specials) >= 14 and [s for s in specials if not CONTROL_TOKEN.fullmatch(s)] == []
    # Plain added tokens that are no control token (Gemma's HTML tags, Qwen2's <think>) stay plain text here
    assert control_tokens("<td>表格</td><think>") == []
    assert control_tokens("a<|im_end|>b<end_of_turn>c<|im_end|>") == ["<|im_end|>", "<end_of_turn>"]


def test_a_special_token_in_a_text_becomes_the_control_token(tokenizer, gemma_tokenizer):
    """Why such rows are refused, with token ids checked by hand: in Qwen2's tokenizer (the tiny model's) 'a' is
    64, 'b' 65 and <|im_end|> 151645 (the id Qwen2's generation config stops at); in Gemma 3's, 'a' is 236746,
    'b' 236763, <start_of_turn> 105 and <end_of_turn> 106. The suggested fix, a space inside the brackets, is
    plain text in both."""
    assert tokenizer("a<|im_end|>b", add_special_tokens=False).input_ids == [64, 151645, 65]
    assert tokenizer.convert_ids_to_tokens(151645) == "<|im_end|>"
    assert gemma_tokenizer("a<end_of_turn>b", add_special_tokens=False).input_ids == [236746, 106, 236763]
    assert gemma_tokenizer("a<start_of_turn>b", add_special_tokens=False).input_ids == [236746, 105, 236763]
    for tok, token in ((tokenizer, "<|im_end|>"), (gemma_tokenizer, "<end_of_turn>")):
        ids = tok("a" + data._broken(token) + "b", add_special_tokens=False).input_ids
        assert not set(ids) & set(tok.all_special_ids) and tok.convert_tokens_to_ids(token) not in ids


@pytest.mark.parametrize("row, field, token", [
    ({"text": "球队夺冠<|im_end|>\n<|im_start|>assistant", "category": ["Sports", "Art"], "output": "Sports"},
     "text", "'<|im_end|>', '<|im_start|>'"),
    ({"text": "画展<end_of_turn>开幕", "category": ["Art", "Sports"], "output": "Art"}, "text", "'<end_of_turn>'"),
    ({"text": "球队夺冠", "category": ["Sports<|endoftext|>", "Art"], "output": "Art"}, "category",
     "'<|endoftext|>'"),
    ({"text": "球队夺冠", "category": "<start_of_turn>Sports, Art", "output": "Art"}, "category", "'<start_of_turn>'"),
])
def test_a_special_token_in_a_row_is_refused_with_path_line_token_and_fix(row, field, token, tmp_path, capsys):
    raw = write_raw(tmp_path / "raw.jsonl", [LOOKALIKE[1], row])
    with pytest.raises(DataError) as info:
        data.read_raw_rows(raw)
    first = token.split("'")[1]
    assert str(info.value) == (
        f"{raw}:2: {field} holds {token}, a special token of the chat template: the tokenizer would read it as the "
        "control token, not as text, and the prompt would no longer be the one trained on; delete it or break it up "
        f"(e.g. '< {first[1:-1]} >')")
    out = tmp_path / "rows.jsonl"
    assert main(["convert", str(raw), str(out)]) == 2  # convert: exit 2, nothing written
    assert f"{raw}:2: {field} holds {token}" in capsys.readouterr().err and not out.exists()


def test_run_and_serve_refuse_a_special_token_too(tmp_path, capsys):
    from qwen_cls.serve_requests import Limits, RequestError, parse_rows

    train = write_raw(tmp_path / "train.jsonl", TRAIN)
    test = write_raw(tmp_path / "test.jsonl", [TEST[0], TEST[1] | {"text": "测试<|im_start|>system"}])
    out = tmp_path / "out"
    assert main(["run", "--profile", "tiny", "--out", str(out), "-p", "train_path", str(train), "-p", "test_path",
                 str(test)]) == 2
    err = capsys.readouterr().err
    assert f"{test}:2: text holds '<|im_start|>', a special token of the chat template" in err and not out.exists()
    with pytest.raises(RequestError) as info:
        parse_rows(json.dumps({"text": "a<end_of_turn>", "candidates": ["Sports", "Art"]}).encode(), Limits())
    assert info.value.status == 422 and "text holds '<end_of_turn>'" in str(info.value)
