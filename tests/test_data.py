import json
import time
from pathlib import Path

import pytest

from qwen_cls import data
from qwen_cls.files import DataError

GOOD = '{"text": "新华社电 火箭发射成功", "category": ["Military", "Space"], "output": "Space"}'


def test_reads_bom_crlf_blank_lines_and_extra_fields(write_lines):
    content = "\ufeff" + GOOD + "\r\n\r\n" + \
        '{"text": "球队夺冠", "category": "Sports, Art", "output": "Sports", "id": 7}\r\n'
    rows = data.read_raw_rows(write_lines("a.jsonl", content))
    assert [(r.text, r.category, r.output, r.line) for r in rows] == [
        ("新华社电 火箭发射成功", ["Military", "Space"], "Space", 1),
        ("球队夺冠", ["Sports", "Art"], "Sports", 3),
    ]


def test_python_repr_category_as_in_the_original_dataset(write_lines):
    line = json.dumps({"text": "t", "category": "['Art', 'History']", "output": "Art"}, ensure_ascii=False)
    assert data.read_raw_rows(write_lines("a.jsonl", line))[0].category == ["Art", "History"]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "t", "category": ["A", "B"]}', "missing field(s) output"),
        ('{"text": "  ", "category": ["A", "B"], "output": "A"}', "text must be a non-empty string"),
        ('{"text": "t", "category": ["A"], "output": "A"}', "at least 2 distinct"),
        ('{"text": "t", "category": ["A", "A"], "output": "A"}', "lists A more than once"),
        ('{"text": "t", "category": ["A", "B"], "output": "C"}', "'C' is not among the candidates"),
        ('{"text": "t", "category": 5, "output": "A"}', "category must be a list"),
    ],
)
def test_errors_name_path_line_and_fix(write_lines, bad_line, expected):
    path = write_lines("bad.jsonl", GOOD + "\n\n" + bad_line + "\n")
    with pytest.raises(DataError) as info:
        data.read_raw_rows(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert expected in str(info.value)


def test_invalid_utf8_names_the_line(write_lines):
    path = write_lines("latin.jsonl", GOOD.encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        data.read_raw_rows(path)


def test_missing_file_directory_and_empty_file(tmp_path, write_lines):
    with pytest.raises(DataError, match="no such file"):
        data.read_raw_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        data.read_raw_rows(tmp_path)
    with pytest.raises(DataError, match="contains no rows"):
        data.read_raw_rows(write_lines("empty.jsonl", "\n\n"))


def test_output_optional_for_prediction_inputs(write_lines):
    path = write_lines("p.jsonl", '{"text": "t", "category": ["A", "B"]}\n')
    assert data.read_raw_rows(path, require_output=False)[0].output is None


def test_convert_writes_recipe_rows(tmp_path, write_lines):
    raw = write_lines("raw.jsonl", GOOD + "\n")
    out = tmp_path / "out" / "train.jsonl"
    assert data.convert_file(raw, out) == 1
    row = json.loads(out.read_text(encoding="utf-8"))
    # The recipe's input uses Python's repr of the candidate list.
    assert row == {
        "input": "文本:新华社电 火箭发射成功,分类选项列表:['Military', 'Space']",
        "output": "Space",
        "text": "新华社电 火箭发射成功",
        "category": ["Military", "Space"],
    }
    assert [p.name for p in out.parent.iterdir()] == ["train.jsonl"]  # no temp file left


def test_convert_bad_row_leaves_no_output_and_keeps_old_file(tmp_path, write_lines):
    raw = write_lines("raw.jsonl", GOOD + "\n" + '{"text": "x"}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=":2: missing field"):
        data.convert_file(raw, out)
    assert not out.exists()
    out.write_text("old\n")
    with pytest.raises(DataError):
        data.convert_file(raw, out)
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "raw.jsonl"]


def test_atomic_write_cleans_up_on_failure(tmp_path):
    def rows():
        yield {"a": 1}
        raise RuntimeError("disk trouble")

    with pytest.raises(RuntimeError):
        data.write_jsonl_atomic(rows(), tmp_path / "x.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_label_inventory_counts_answers(write_lines):
    lines = [
        '{"text": "a", "category": ["Art", "Sports"], "output": "Art"}',
        '{"text": "b", "category": ["Art", "Sports"], "output": "Sports"}',
        '{"text": "c", "category": ["Art", "Space"], "output": "Art"}',
    ]
    counts = data.label_inventory(data.read_raw_rows(write_lines("r.jsonl", "\n".join(lines))))
    assert list(counts.items()) == [("Art", 2), ("Sports", 1)]


def test_bundled_sample_meets_the_data_card():
    from conftest import SAMPLE

    train, test = data.read_raw_rows(SAMPLE / "train.jsonl"), data.read_raw_rows(SAMPLE / "test.jsonl")
    assert len(train) >= 60 and len(test) >= 20
    assert len(data.label_inventory(train)) >= 6
    assert all(2 <= len(r.category) <= 5 for r in train + test)
    assert not {r.text for r in train} & {r.text for r in test}


def test_download_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_CLS_OFFLINE", "1")
    start = time.monotonic()
    from qwen_cls.downloads import download_fudan_news

    with pytest.raises(ConnectionError, match="tiny"):
        download_fudan_news(tmp_path)
    assert time.monotonic() - start < 5
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ writes: umask modes, symlinks, special files


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_keep_the_umask_mode(tmp_path, umask):
    import os

    from qwen_cls.files import atomic_dir, write_json_atomic

    previous = os.umask(umask)
    try:
        write_json_atomic({"a": 1}, tmp_path / "new.json")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask


def test_overwriting_keeps_the_files_mode_and_writes_through_symlinks(tmp_path):
    import os

    from qwen_cls.files import write_json_atomic

    real = tmp_path / "real.json"
    real.write_text("old")
    os.chmod(real, 0o644)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_json_atomic({"b": 2}, link)
    assert link.is_symlink() and os.readlink(link) == str(real)  # still a link ...
    assert json.loads(real.read_text()) == {"b": 2}  # ... to the file that was written
    assert real.stat().st_mode & 0o777 == 0o644


def test_special_files_and_file_parents_are_refused(tmp_path):
    import os

    from qwen_cls.files import write_json_atomic

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        write_json_atomic({}, fifo)
    with pytest.raises(DataError, match="not a regular file"):
        write_json_atomic({}, "/dev/null")
    assert Path("/dev/null").is_char_device()  # untouched
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        write_json_atomic({}, tmp_path / "afile" / "out.json")
    assert list(tmp_path.iterdir()) and not fifo.is_file()


@pytest.mark.subprocess
def test_dev_stdout_is_refused_whatever_stdout_is(tmp_path):
    """/dev/stdout is a link into /proc: a pipe, a terminal or a file; as an output path it is refused unless
    it names a regular file."""
    import subprocess
    import sys

    code = ("from qwen_cls.files import write_json_atomic, DataError\n"
            "try:\n    write_json_atomic({}, '/dev/stdout')\nexcept DataError as e:\n    print('refused', e)\n")
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert piped.stdout.startswith("refused /dev/stdout: is not a regular file"), piped.stdout + piped.stderr


def test_a_symlinked_output_folder_is_written_through(tmp_path):
    from qwen_cls.files import atomic_dir

    real = tmp_path / "big-disk" / "exports"
    real.mkdir(parents=True)
    link = tmp_path / "exports"
    link.symlink_to(real)
    with atomic_dir(link) as tmp:
        (tmp / "model.txt").write_text("weights")
    assert link.is_symlink() and (real / "model.txt").read_text() == "weights"


# --- the validation split (issue 32) ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_validation_split_keeps_the_training_rows_and_takes_the_shuffled_files_last_rows():
    rows = list(range(8000))  # the THUCNews training file's row count
    train, validation = data.split_train_validation(rows, 800, 300, 42)
    assert train == data.sample_rows(rows, 800, 42)  # training rows exactly as without a validation split
    assert validation == data.sample_rows(rows, 0, 42)[-300:] and len(validation) == 300
    assert not set(train) & set(validation)
    train_all, validation_all = data.split_train_validation(rows, 0, 300, 42)  # 0: all the other rows
    assert len(train_all) == 7700 and train_all[:800] == train and validation_all == validation
    sample_train, sample_validation = data.split_train_validation(list(range(80)), 0, 8, 42)  # tiny's 80 rows
    assert (len(sample_train), len(sample_validation)) == (72, 8)
    assert sorted(sample_train + sample_validation) == list(range(80))
    assert data.split_train_validation(rows, 800, 0, 42) == (train, [])


@pytest.mark.parametrize("n_train, n_validation", [(0, 1000), (1, 1000), (5, 2000)])
def test_validation_split_refuses_a_file_it_would_leave_no_training_row(n_train, n_validation):
    with pytest.raises(ValueError, match=f"1000 rows, fewer than {n_validation} validation \\+ 1 training rows"):
        data.split_train_validation(list(range(1000)), n_train, n_validation, 42)


def test_validation_split_of_a_small_file_trains_on_what_validation_leaves():
    """A profile's max_train_samples above the file's rows (the gemma3-270m profile on an 80-row file): validation
    still takes its rows from the end, training all the others, as sample_rows keeps all rows."""
    rows = list(range(80))
    train, validation = data.split_train_validation(rows, 800, 30, 42)
    assert validation == data.sample_rows(rows, 0, 42)[-30:] and len(train) == 50
    assert train == data.sample_rows(rows, 0, 42)[:50] and not set(train) & set(validation)


def test_choose_settings_splits_as_notebook_01():
    from benchmarks.choose_settings import split_rows

    params = {"train_path": "../data/sample/train.jsonl", "max_train_samples": 30, "seed": 7}
    train, validation = split_rows(params, 8)
    ours = data.split_train_validation(data.read_raw_rows(ROOT / "data" / "sample" / "train.jsonl"), 30, 8, 7)
    assert [r["text"] for r in train] == [r.text for r in ours[0]] and len(train) == 30
    assert [r["text"] for r in validation] == [r.text for r in ours[1]] and len(validation) == 8
    source = (ROOT / "benchmarks" / "choose_settings.py").read_text(encoding="utf-8")
    assert "test_path" not in source and "test.jsonl" not in source  # the settings it chooses never see test rows


def test_rows_digest_is_the_same_for_raw_and_instruction_rows_and_changes_with_an_answer():
    rows = data.read_raw_rows(ROOT / "data" / "sample" / "train.jsonl")[:5]
    converted = [data.to_instruction_row(r) for r in rows]
    assert data.rows_sha256(rows) == data.rows_sha256(converted)
    assert len(data.rows_sha256(rows)) == 64
    flipped = [dict(converted[0], output=converted[0]["category"][-1] if converted[0]["output"] !=
                    converted[0]["category"][-1] else converted[0]["category"][0]), *converted[1:]]
    assert data.rows_sha256(flipped) != data.rows_sha256(converted)


def test_validation_result_is_03s_last_evaluation_on_validation_rows(tmp_path):
    from qwen_cls.run_record import validation_result

    (tmp_path / "run_config.json").write_text(json.dumps({
        "base_model": "tiny", "max_length": 64, "training": {"eval_rows": 50},
        "validation": {"file": "v.jsonl", "rows": 300, "sha256": "ab" * 32}}))
    (tmp_path / "train_log.json").write_text(json.dumps([
        {"eval_accuracy": 0.25, "eval_macro_f1": 0.2, "step": 0}, {"loss": 1.5, "step": 5},
        {"eval_accuracy": 0.84, "eval_macro_f1": 0.81, "step": 100}, {"train_runtime": 9.0, "step": 100}]))
    assert validation_result(tmp_path) == {"rows": 50, "accuracy": 0.84, "macro_f1": 0.81, "of": 300,
                                           "sha256": "ab" * 32}
    (tmp_path / "train_log.json").write_text(json.dumps([{"loss": 1.5, "step": 5}]))  # qwen-cls train: none
    assert validation_result(tmp_path) is None
