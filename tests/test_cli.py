import json
import shutil
import subprocess
import sys

import pytest

GOOD = '{"text": "火箭发射成功", "category": ["Military", "Space"], "output": "Space"}\n'


def qwen_cls(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qwen_cls", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_console_script_is_installed():
    assert shutil.which("qwen-cls") or (__import__("pathlib").Path(sys.executable).parent / "qwen-cls").exists()


@pytest.mark.subprocess
def test_convert_ok_with_label_inventory(tmp_path):
    raw, out = tmp_path / "raw.jsonl", tmp_path / "out.jsonl"
    raw.write_text(GOOD * 2, encoding="utf-8")
    result = qwen_cls("convert", raw, out, "--labels")
    assert result.returncode == 0, result.stderr
    assert f"wrote 2 instruction rows to {out}" in result.stdout
    assert "Space" in result.stdout and result.stdout.rstrip().endswith("2")
    assert [json.loads(line)["output"] for line in out.read_text(encoding="utf-8").splitlines()] == ["Space"] * 2


@pytest.mark.subprocess
@pytest.mark.parametrize("case", ["bad_row", "missing", "directory"])
def test_convert_user_errors_exit_2_with_path_line(tmp_path, case):
    out = tmp_path / "out.jsonl"
    if case == "bad_row":
        raw = tmp_path / "raw.jsonl"
        raw.write_text(GOOD + '{"text": "x", "category": ["A", "B"], "output": "Z"}\n', encoding="utf-8")
        expected = f"{raw}:2: output 'Z' is not among the candidates ['A', 'B']"
    elif case == "missing":
        raw = tmp_path / "nope.jsonl"
        expected = f"{raw}: no such file"
    else:
        raw = tmp_path
        expected = f"{raw}: is a directory"
    result = qwen_cls("convert", raw, out)
    assert result.returncode == 2
    assert result.stderr.startswith(expected), result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.subprocess
def test_labels_command(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(GOOD + GOOD.replace('"output": "Space"', '"output": "Military"') + GOOD, encoding="utf-8")
    lines = qwen_cls("labels", raw).stdout.splitlines()
    assert lines[0].split() == ["Space", "2", "66.7%"]
    assert lines[1].split() == ["Military", "1", "33.3%"]
    assert lines[-1].split() == ["total", "3"]


# --- options checked before anything loads or is created: exit 2 naming the option -------------------------------

SAMPLE_TRAIN = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "sample" / "train.jsonl"


@pytest.mark.parametrize("option, value", [
    ("--save-steps", "0"), ("--save-steps", "-5"), ("--max-steps", "0"), ("--max-steps", "-2"),
    ("--batch-size", "0"), ("--grad-accum", "0"), ("--lr", "0"), ("--lr", "-1e-4"), ("--lr", "nan"),
    ("--epochs", "0"), ("--epochs", "-1"), ("--max-length", "0"), ("--max-length", "16"),
    ("--save-total-limit", "0"), ("--logging-steps", "0"), ("--limit", "-1"), ("--seed", "-1"),
])
def test_train_refuses_bad_numbers_before_anything(tmp_path, capsys, option, value):
    from qwen_cls.commands.cli import main

    assert main(["train", "--train", str(SAMPLE_TRAIN), "--out", str(tmp_path / "run"), f"{option}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} must be"), err
    assert list(tmp_path.iterdir()) == []


def test_train_out_that_is_a_file_is_named_clearly(tmp_path, capsys):
    from qwen_cls.commands.cli import main

    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        assert main(["train", "--train", str(SAMPLE_TRAIN), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}: not a folder") and "File exists" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_no_resume_and_resume_anyway_exclude_each_other(tmp_path, capsys):
    from qwen_cls.commands.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--train", str(SAMPLE_TRAIN), "--out", str(tmp_path / "r"), "--no-resume", "--resume-anyway"])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.fixture()
def predict_args(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(GOOD, encoding="utf-8")
    return ["predict", "--run", str(tmp_path / "no-run-needed"), "--input", str(rows),
            "--output", str(tmp_path / "out.jsonl")]


@pytest.mark.parametrize("option, value, expected", [
    ("--batch-size", "0", "error: --batch-size must be an integer >= 1"),
    ("--batch-size", "-3", "error: --batch-size must be an integer >= 1"),
    ("--max-length", "0", "error: --max-length must be an integer >= 64"),
    ("--device", "gpu", "error: --device 'gpu': not a device"),
    ("--device", "xla", "error: --device xla: unsupported device type"),
    ("--device", "cuda:x", "error: --device 'cuda:x': not a device"),
    ("--min-confidence", "1.5", "error: --min-confidence must be a probability between 0 and 1"),
    ("--min-confidence", "-0.1", "error: --min-confidence must be a probability between 0 and 1"),
    ("--min-confidence", "nan", "error: --min-confidence must be a probability between 0 and 1"),
])
def test_predict_refuses_bad_options_before_a_model_loads(predict_args, tmp_path, capsys, option, value, expected):
    from qwen_cls.commands.cli import main

    assert main([*predict_args, option, value]) == 2
    assert capsys.readouterr().err.startswith(expected)
    assert not (tmp_path / "out.jsonl").exists()


def test_predict_device_cuda_without_cuda_is_one_clear_line(predict_args, tmp_path, capsys, monkeypatch):
    import torch

    from qwen_cls.commands.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert main([*predict_args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: this torch build has no CUDA support") and "--device cpu" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out.jsonl").exists()


def test_predict_paths_that_are_files_or_folders_in_the_wrong_place(predict_args, tmp_path, capsys):
    from qwen_cls.commands.cli import main

    (tmp_path / "f").write_text("x")
    args = list(predict_args)
    args[2] = str(tmp_path / "f")  # --run is a file
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"error: --run {tmp_path / 'f'}: is a file, not a folder")
    args = [*predict_args[:-1], str(tmp_path / "f" / "out.jsonl")]  # --output below a file
    assert main(args) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "rows.jsonl"]


def test_predict_refuses_a_run_folder_marked_incomplete(predict_args, tmp_path, capsys):
    from qwen_cls.commands.cli import main

    run = tmp_path / "no-run-needed"
    run.mkdir()
    (run / "RUN_INCOMPLETE").write_text("unfinished")
    assert main(predict_args) == 2
    assert capsys.readouterr().err.startswith(f"error: --run {run}: marked incomplete (RUN_INCOMPLETE)")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.subprocess
def test_a_file_where_a_folder_is_needed_is_named_not_just_file_exists(tmp_path):
    (tmp_path / "f").write_text("x")
    result = qwen_cls("tiny-model", "--out", tmp_path / "f" / "tiny")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: --out {tmp_path / 'f' / 'tiny'}: not a folder ({tmp_path / 'f'} is a "
                                    "file); choose another --out")
