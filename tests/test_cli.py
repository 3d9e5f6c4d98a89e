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


def test_convert_ok_with_label_inventory(tmp_path):
    raw, out = tmp_path / "raw.jsonl", tmp_path / "out.jsonl"
    raw.write_text(GOOD * 2, encoding="utf-8")
    result = qwen_cls("convert", raw, out, "--labels")
    assert result.returncode == 0, result.stderr
    assert f"wrote 2 instruction rows to {out}" in result.stdout
    assert "Space" in result.stdout and result.stdout.rstrip().endswith("2")
    assert [json.loads(line)["output"] for line in out.read_text(encoding="utf-8").splitlines()] == ["Space"] * 2


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


def test_labels_command(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(GOOD + GOOD.replace('"output": "Space"', '"output": "Military"') + GOOD, encoding="utf-8")
    lines = qwen_cls("labels", raw).stdout.splitlines()
    assert lines[0].split() == ["Space", "2", "66.7%"]
    assert lines[1].split() == ["Military", "1", "33.3%"]
    assert lines[-1].split() == ["total", "3"]
