"""``qwen-cls sweep``: grids parsed like ``-p`` values, bad grids refused before anything exists, and a sweep
folder that resumes: finished points are skipped, broken ones run again, Ctrl+C keeps what finished.

Most tests replace papermill by a fake that writes what notebooks 03 and 04 write (seconds); the slow ones
run the issue's command for real on the tiny profile: stopped with Ctrl+C in its second point and run again
(the finished point skipped, the interrupted one run again), then its rerun, and the dashboard of the sweep
folder showing every point.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import papermill
import pytest
from _tiny_run import ctrl_c_when
from PIL import Image

from qwen_cls.chain.locks import lock_path
from qwen_cls.chain.sweep import _sweep_owned, parse_grid, plan, point_name
from qwen_cls.commands.cli import main
from qwen_cls.run_record import RUN_INCOMPLETE

SWEEP_CMD = ["sweep", "--profile", "tiny", "-g", "learning_rate", "1e-3,5e-3",
             "-p", "max_train_samples", "16", "-p", "max_test_samples", "8"]
POINTS = ("learning_rate=0.001", "learning_rate=0.005")
# The real runs add one knob: 04's per-row generate baseline (512 new tokens a row) on 1 row instead of 3.
REAL_CMD = [*SWEEP_CMD, "-p", "speed_rows", "1"]


def snapshot(folder: Path) -> dict:
    """Every path below ``folder``: bytes (files) and modification time in ns; equal = nothing changed."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# --- the grid ---------------------------------------------------------------------------------------------------

def test_grid_values_are_parsed_like_p_values():
    grid = parse_grid([("lora_r", "4,8"), ("learning_rate", "1e-3, 5e-3"),
                       ("gradient_checkpointing", "True,False"), ("base_model", "tiny,qwen/Qwen2-0.5B")])
    assert list(grid) == ["lora_r", "learning_rate", "gradient_checkpointing", "base_model"]
    assert grid["lora_r"] == [4, 8] and all(type(v) is int for v in grid["lora_r"])
    assert grid["learning_rate"] == [0.001, 0.005] and all(type(v) is float for v in grid["learning_rate"])
    assert grid["gradient_checkpointing"] == [True, False]
    assert all(type(v) is bool for v in grid["gradient_checkpointing"])
    assert grid["base_model"] == ["tiny", "qwen/Qwen2-0.5B"]


def test_points_are_the_cartesian_product_with_readable_names(tmp_path):
    points = plan("tiny", {"learning_rate": [1e-3, 5e-3], "lora_r": [4, 8]}, {"max_train_samples": 16},
                  tmp_path / "s")
    assert [p.name for p in points] == ["learning_rate=0.001,lora_r=4", "learning_rate=0.001,lora_r=8",
                                        "learning_rate=0.005,lora_r=4", "learning_rate=0.005,lora_r=8"]
    for point in points:
        assert point.params["out_dir"] == str(tmp_path / "s" / point.name)
        assert (point.params["learning_rate"], point.params["lora_r"]) == tuple(point.values.values())
        assert point.params["max_train_samples"] == 16 and point.params["profile"] == "tiny"
        assert point.params["lora_alpha"] == 32  # the profile's own value, untouched
    assert point_name({"train_path": "../data/a b.jsonl", "seed": 3}) == "train_path=.._data_a_b.jsonl,seed=3"
    assert not list(tmp_path.iterdir())  # planning creates nothing


def test_what_a_sweep_folder_may_hold():
    keys = ["learning_rate", "lora_r"]
    for name in ("sweep.json", "sweep.csv", "swanlog", ".sweep.png.x1y2.tmp", "learning_rate=0.001,lora_r=4",
                 "learning_rate=0.001,lora_r=4.previous", "learning_rate=1e-05,lora_r=8.failed",
                 ".learning_rate=0.001,lora_r=4.lock"):
        assert _sweep_owned(name, keys), name
    for name in ("notes.txt", ".git", "lora_r=4", "lora_r=4,learning_rate=0.001", "learning_rate=0.001",
                 "learning_rate=0.001,lora_r=4,seed=1", "params.json"):
        assert not _sweep_owned(name, keys), name


@pytest.mark.parametrize("args, message", [
    (["-g", "nonsense_key", "1,2"], "-g nonsense_key: unknown parameter"),
    (["-g", "learning_rate", ""], "-g learning_rate: the grid is empty"),
    (["-g", "learning_rate", "1e-3,,5e-3"], "an empty value between commas"),
    (["-g", "learning_rate", "1e-3,fast"], "-g learning_rate must be a number > 0"),
    (["-g", "lora_r", "4,8.5"], "-g lora_r must be an integer >= 1, got 8.5"),
    (["-g", "gradient_checkpointing", "yes"], "-g gradient_checkpointing must be True or False"),
    (["-g", "learning_rate", "1e-3", "-g", "learning_rate", "5e-3"], "-g learning_rate is given twice"),
    (["-g", "learning_rate", "1e-3,0.001"], "the value 0.001 is listed twice"),
    (["-g", "learning_rate", "1e-3", "-p", "learning_rate", "5e-3"], "given both as -g and -p"),
    (["-g", "profile", "tiny,qwen2-0.5b"], "choose the profile with --profile"),
    (["-g", "learning_rate", "1e-3", "-p", "nonsense_key", "1"], "unknown parameter(s) nonsense_key"),
])
def test_a_bad_grid_exits_2_with_one_line_and_creates_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert main(["sweep", "--profile", "tiny", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # no sweep folder, no lock file


def test_a_grid_is_required(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--out", str(tmp_path / "s")])
    assert info.value.code == 2 and "-g/--grid" in capsys.readouterr().err



def test_the_plot_draws_a_line_per_value_of_the_second_key(tmp_path):
    from qwen_cls.chain.sweep_report import sweep_plot

    rows = [{"point": f"learning_rate={lr},lora_r={r}", "learning_rate": lr, "lora_r": r, "accuracy": acc}
            for (lr, r), acc in zip([(1e-3, 4), (1e-3, 8), (5e-3, 4), (5e-3, 8)], [0.5, 0.6, 0.7, 0.9])]
    fig = sweep_plot(rows, ["learning_rate", "lora_r"], path=tmp_path / "sweep.png")
    lines = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in fig.axes[0].get_lines()}
    assert lines == {"lora_r = 4": [(0, 0.5), (1, 0.7)], "lora_r = 8": [(0, 0.6), (1, 0.9)]}
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0.001", "0.005"]
    with Image.open(tmp_path / "sweep.png") as png:
        assert png.format == "PNG"

# --- the sweep folder, with a fake papermill ----------------------------------------------------------------------

def fake_execute(interrupt: str | None = None, fail: str | None = None):
    """A stand-in for ``papermill.execute_notebook`` writing what 03 and 04 write; test accuracy = 100 x the learning
    rate, validation accuracy = 0.5 - 10 x the learning rate (the other way round: ranking by validation puts the
    points in grid order, ranking by test would reverse them), so each point's numbers differ.
    ``interrupt``/``fail``: the point (out_dir name) whose 03 raises."""
    from papermill.exceptions import PapermillExecutionError

    def execute(input_path, output_path, parameters=None, **kwargs):
        name, out = Path(input_path).name, Path(parameters["out_dir"])
        Path(output_path).write_text(json.dumps({"parameters": parameters}), encoding="utf-8")
        if name.startswith("03"):
            if out.name == interrupt:
                raise KeyboardInterrupt
            if out.name == fail:
                raise PapermillExecutionError(3, 7, "train()", "RuntimeError", "boom", [])
            lr = parameters["learning_rate"]
            (out / "train_log.json").write_text(json.dumps([{"loss": 1.0, "step": 1},
                                                            {"train_runtime": 1000 * lr, "step": 2}]))
            (out / "run_config.json").write_text(json.dumps({"training": {"learning_rate": lr}}))
        if name.startswith("04"):
            lr = json.loads((out / "run_config.json").read_text())["training"]["learning_rate"]
            (out / "metrics.json").write_text(json.dumps({"accuracy": 100 * lr, "macro_f1": 50 * lr,
                                                          "zero_shot": {"accuracy": 0.25, "macro_f1": 0.1},
                                                          "validation": {"rows": 4, "accuracy": 0.5 - 10 * lr}}))

    return execute


def sweep(out: Path, *extra: str) -> int:
    return main([*SWEEP_CMD, "--out", str(out), "--quiet", "-p", "swanlab_mode", "disabled", *extra])


@pytest.fixture()
def swept(tmp_path, monkeypatch):
    """A finished (fake) sweep of two learning rates in tmp_path/sweep."""
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute())
    out = tmp_path / "sweep"
    assert sweep(out) == 0
    return out


def test_fake_sweep_writes_one_row_per_point_from_its_files(swept):
    rows = read_csv(swept / "sweep.csv")
    assert [r["point"] for r in rows] == list(POINTS)
    assert [float(r["learning_rate"]) for r in rows] == [0.001, 0.005]
    assert [float(r["accuracy"]) for r in rows] == pytest.approx([0.1, 0.5])
    assert [float(r["validation_accuracy"]) for r in rows] == pytest.approx([0.49, 0.45])
    assert [r["rank"] for r in rows] == ["1", "2"]  # by validation accuracy: the better test accuracy ranks 2nd
    assert [float(r["macro_f1"]) for r in rows] == pytest.approx([0.05, 0.25])
    assert [float(r["zero_shot"]) for r in rows] == [0.25, 0.25]
    assert [float(r["train_seconds"]) for r in rows] == pytest.approx([1.0, 5.0])  # train_runtime of train_log
    md = (swept / "sweep.md").read_text(encoding="utf-8")
    assert "| 2 | learning_rate=0.005 | 0.005 | 0.450 | 0.500 | 0.250 | 0.250 | 5.0 |" in md
    assert "| rank | point | learning_rate | validation_accuracy | test accuracy |" in md
    with Image.open(swept / "sweep.png") as png:
        assert png.format == "PNG" and png.size[0] > 200
    record = json.loads((swept / "sweep.json").read_text(encoding="utf-8"))
    assert record["grid"] == {"learning_rate": [0.001, 0.005]} and record["fixed"]["max_train_samples"] == 16


def test_a_rerun_skips_finished_points_and_changes_nothing(swept, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished point ran again")

    before = snapshot(swept)
    monkeypatch.setattr(papermill, "execute_notebook", refuse)
    capsys.readouterr()
    assert sweep(swept) == 0
    assert capsys.readouterr().out.count("finished with these parameters; skipped") == 2
    assert snapshot(swept) == before  # byte for byte, same mtimes: tables and plot not rewritten


@pytest.mark.parametrize("damage, why", [
    ("no metrics.json", "its run has no metrics.json; running it again"),
    ("marked incomplete", "its last run did not finish; running it again"),
    ("parameters changed", "its parameters changed; running it again (the finished run is kept until the new one "
                           "succeeds)"),
], ids=["no metrics.json", "marked incomplete", "parameters changed"])
def test_a_broken_point_runs_again_and_the_finished_one_is_untouched(swept, damage, why, capsys):
    broken, kept = swept / POINTS[0], swept / POINTS[1]
    if damage == "no metrics.json":
        (broken / "metrics.json").unlink()
    elif damage == "marked incomplete":
        (broken / RUN_INCOMPLETE).write_text("x")
    else:  # e.g. a profile default changed since: its params.json no longer says what it would run with
        params = json.loads((broken / "params.json").read_text())
        (broken / "params.json").write_text(json.dumps({**params, "seed": 7}))
    kept_before = snapshot(kept)
    capsys.readouterr()
    assert sweep(swept) == 0
    out = capsys.readouterr().out
    assert f"[point 1/2] {POINTS[0]}: {why} -> {broken}" in out
    assert f"[point 2/2] {POINTS[1]}: finished with these parameters; skipped" in out
    assert snapshot(kept) == kept_before
    assert not (broken / RUN_INCOMPLETE).exists()
    assert json.loads((broken / "metrics.json").read_text())["accuracy"] == pytest.approx(0.1)
    assert json.loads((broken / "params.json").read_text())["seed"] == 42
    assert [float(r["accuracy"]) for r in read_csv(swept / "sweep.csv")] == pytest.approx([0.1, 0.5])
    assert not [p for p in swept.parent.iterdir() if p.name.endswith((".previous", ".failed", ".lock"))]


def test_ctrl_c_keeps_finished_points_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute(interrupt=POINTS[1]))
    assert sweep(out) == 130
    err = capsys.readouterr().err
    assert f"interrupted at point {POINTS[1]}" in err and "rerun the same command to resume" in err
    assert (out / POINTS[0] / "metrics.json").is_file() and not (out / POINTS[0] / RUN_INCOMPLETE).exists()
    assert (out / POINTS[1] / RUN_INCOMPLETE).exists() and not (out / "sweep.csv").exists()
    finished = snapshot(out / POINTS[0])

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute())
    assert sweep(out) == 0
    assert snapshot(out / POINTS[0]) == finished
    assert [r["point"] for r in read_csv(out / "sweep.csv")] == list(POINTS)


def test_a_failed_point_exits_1_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute(fail=POINTS[0]))
    assert sweep(tmp_path / "sweep") == 1
    err = capsys.readouterr().err
    assert f"error: point {POINTS[0]}: 03_lora_training.ipynb failed" in err and "RuntimeError: boom" in err


def test_more_values_of_the_same_grid_run_only_the_new_point(swept, monkeypatch):
    before = snapshot(swept / POINTS[0])
    assert main(["sweep", "--profile", "tiny", "-g", "learning_rate", "1e-3,5e-3,1e-2", "-p", "max_train_samples",
                 "16", "-p", "max_test_samples", "8", "--out", str(swept), "--quiet",
                 "-p", "swanlab_mode", "disabled"]) == 0
    assert snapshot(swept / POINTS[0]) == before
    assert [r["point"] for r in read_csv(swept / "sweep.csv")] == [*POINTS, "learning_rate=0.01"]


@pytest.mark.parametrize("what, message", [
    ("foreign file", "is not a sweep folder (it holds notes.txt"),
    ("another grid", "holds another sweep (--profile tiny -g lora_r 4,8"),
    ("other -p values", "keep its profile, grid keys and -p values"),
    ("a stray file", "holds notes.txt, which `qwen-cls sweep` did not write"),
])
def test_a_folder_that_is_not_this_sweep_is_refused_untouched(swept, capsys, what, message):
    if what == "foreign file":
        swept = swept.parent / "other"
        swept.mkdir()
        (swept / "notes.txt").write_text("mine")
    elif what == "another grid":
        (swept / "sweep.json").write_text(json.dumps({"profile": "tiny", "grid": {"lora_r": [4, 8]}, "fixed": {}}))
    elif what == "other -p values":
        record = json.loads((swept / "sweep.json").read_text())
        (swept / "sweep.json").write_text(json.dumps({**record, "fixed": {"max_train_samples": 32}}))
    else:
        (swept / "notes.txt").write_text("mine")
    before = snapshot(swept.parent)
    capsys.readouterr()
    assert sweep(swept) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: "), err
    assert snapshot(swept.parent) == before


def test_a_second_sweep_into_a_busy_folder_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute())
    out = tmp_path / "sweep"
    with open(lock_path(out), "w") as held:  # what a running sweep holds
        fcntl.flock(held, fcntl.LOCK_EX)
        assert sweep(out) == 2
    assert "is being written by another `qwen-cls sweep`" in capsys.readouterr().err
    assert not out.exists()


# --- the real thing: the command on the tiny profile ------------------------------------------------------

@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """The issue's command (+ speed_rows 1), run for real (papermill, tiny model, SwanLab local) the way a user
    may: Ctrl+C once the second point's first notebook runs, then the same command again, which resumes. Returns
    (DIR, seconds of both, stdout of each, a snapshot of the first point after the interruption)."""
    out = tmp_path_factory.mktemp("sweep") / "lr"
    command = [sys.executable, "-m", "qwen_cls", *REAL_CMD, "--out", str(out), "--quiet"]
    started = time.monotonic()
    status, interrupted, err = ctrl_c_when(  # once the second point's first notebook runs
        command, out / POINTS[1] / "notebooks" / "00_check_environment.ipynb", 2, tmp_path_factory.mktemp("logs"),
        env=real_env())
    assert status == 130, interrupted[-3000:] + err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith(f"interrupted at point {POINTS[1]}; ")
    assert (out / POINTS[1] / RUN_INCOMPLETE).is_file() and not (out / "sweep.csv").exists()
    kept = snapshot(out / POINTS[0])
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=real_env())
    seconds = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return out, seconds, (interrupted, resumed.stdout), kept


def real_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", QWEN_CLS_OFFLINE="1",
                HF_HUB_OFFLINE="1", QWEN_CLS_SWANLAB_MODE="local")


@pytest.mark.slow
def test_real_sweep_table_matches_each_points_own_files(real_sweep):
    out, _, (_, stdout), _ = real_sweep
    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 2 and {"learning_rate", "accuracy", "macro_f1", "zero_shot", "train_seconds"} <= set(rows[0])
    by_point = {row["point"]: row for row in rows}
    validation = {name: json.loads((out / name / "metrics.json").read_text())["validation"] for name in POINTS}
    assert [r["point"] for r in rows] == sorted(POINTS, key=lambda n: -validation[n]["accuracy"])  # ranked by it
    assert [r["rank"] for r in rows] == ["1", "2"]
    for name in POINTS:
        row, folder = by_point[name], out / name
        params = json.loads((folder / "params.json").read_text(encoding="utf-8"))
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        log = json.loads((folder / "train_log.json").read_text(encoding="utf-8"))
        assert row["point"] == name and float(row["learning_rate"]) == params["learning_rate"]
        assert (params["max_train_samples"], params["max_test_samples"], metrics["n_test"]) == (16, 8, 8)
        assert float(row["accuracy"]) == metrics["accuracy"] and float(row["macro_f1"]) == metrics["macro_f1"]
        assert float(row["zero_shot"]) == metrics["zero_shot"]["accuracy"]
        assert float(row["validation_accuracy"]) == metrics["validation"]["accuracy"]
        assert metrics["validation"]["rows"] == metrics["validation"]["of"] == 8  # tiny: eval_rows 0, all 8
        runtime = [e["train_runtime"] for e in log if "train_runtime" in e]
        assert float(row["train_seconds"]) == pytest.approx(runtime[-1], rel=1e-6) and runtime[-1] > 0
    assert [json.loads((out / n / "params.json").read_text())["learning_rate"] for n in POINTS] == [1e-3, 5e-3]
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG"
    assert (out / "sweep.md").read_text(encoding="utf-8").count("| learning_rate=") == 2
    assert "qwen-cls dashboard" in stdout


@pytest.mark.slow
def test_real_sweep_points_log_into_one_swanlab_folder_the_dashboard_serves(real_sweep):
    from test_dashboard import free_port, get_json, stop_group

    from qwen_cls.serving.dashboard import find_log_dir

    out, _, _, _ = real_sweep
    assert find_log_dir(out) == out / "swanlog"
    assert not any((out / name / "swanlog").exists() for name in POINTS)  # no log of their own
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen_cls", "dashboard", str(out), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                project = get_json(f"http://127.0.0.1:{port}/api/v1/project")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "dashboard did not answer"
                time.sleep(0.3)
    finally:
        stop_group(proc)
    names = sorted(e["name"] for e in project["experiments"])
    assert names == sorted([*POINTS, *(f"{n}-eval" for n in POINTS)])  # training + evaluation of each point


@pytest.mark.slow
def test_real_rerun_is_fast_and_changes_nothing(real_sweep):
    out, first, _, _ = real_sweep
    before = snapshot(out)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qwen_cls", *REAL_CMD, "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600, env=real_env())
    again = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped") == 2
    assert again < first / 3, (again, first)
    assert snapshot(out) == before


@pytest.mark.slow
def test_real_interrupted_point_runs_again_and_the_finished_one_is_untouched(real_sweep):
    out, _, (interrupted, resumed), kept = real_sweep
    assert f"[point 2/2] {POINTS[1]}: new" in interrupted
    assert f"[point 1/2] {POINTS[0]}: finished with these parameters; skipped" in resumed
    assert f"[point 2/2] {POINTS[1]}: its last run did not finish; running it again" in resumed
    assert snapshot(out / POINTS[0]) == kept  # byte for byte, same mtimes
    assert not (out / POINTS[1] / RUN_INCOMPLETE).exists()
    metrics = json.loads((out / POINTS[1] / "metrics.json").read_text(encoding="utf-8"))
    row = {r["point"]: r for r in read_csv(out / "sweep.csv")}[POINTS[1]]
    assert row["point"] == POINTS[1] and float(row["accuracy"]) == metrics["accuracy"]


# --- selection reads validation rows only (issue 32) ---------------------------------------------------------------

def test_shuffling_the_test_answers_of_a_finished_sweep_changes_no_ranking(swept):
    """What 04 computes from the test answers (accuracy, macro_f1, zero_shot) is permuted between the points and
    scaled, as a shuffle of the test answers would change it: the table's test columns change, its ranking (rank
    and point order) does not; changing a validation accuracy does change it."""
    from qwen_cls.chain.sweep import plan
    from qwen_cls.chain.sweep_report import write_comparison

    def ranking():
        return [(r["rank"], r["point"]) for r in read_csv(swept / "sweep.csv")]

    before = ranking()
    assert before == [("1", POINTS[0]), ("2", POINTS[1])]
    metrics = {name: json.loads((swept / name / "metrics.json").read_text()) for name in POINTS}
    for name, other in zip(POINTS, reversed(POINTS)):  # the test figures of the other point, far better ones
        shuffled = {**metrics[name], "accuracy": 1 - metrics[other]["accuracy"] / 2,
                    "macro_f1": metrics[other]["macro_f1"], "zero_shot": {"accuracy": 0.9, "macro_f1": 0.9}}
        (swept / name / "metrics.json").write_text(json.dumps(shuffled))
    record = json.loads((swept / "sweep.json").read_text(encoding="utf-8"))
    points = plan(record["profile"], record["grid"], record["fixed"], swept)
    write_comparison(swept, points, record)
    rows = read_csv(swept / "sweep.csv")
    assert [float(r["accuracy"]) for r in rows] == pytest.approx([0.75, 0.95])  # the test columns did change
    assert ranking() == before
    last = json.loads((swept / POINTS[1] / "metrics.json").read_text())
    (swept / POINTS[1] / "metrics.json").write_text(json.dumps({**last, "validation": {"rows": 4, "accuracy": 0.6}}))
    write_comparison(swept, points, record)
    assert ranking() == [("1", POINTS[1]), ("2", POINTS[0])]  # a validation accuracy decides it


def test_ranking_uses_validation_accuracy_only_and_puts_points_without_one_last():
    from qwen_cls.chain.sweep_report import ranked

    rows = [{"point": "a", "validation_accuracy": 0.5, "accuracy": 0.9},
            {"point": "b", "validation_accuracy": None, "accuracy": 1.0},
            {"point": "c", "validation_accuracy": 0.7, "accuracy": 0.1},
            {"point": "d", "validation_accuracy": 0.5, "accuracy": 0.2}]
    assert [(r["rank"], r["point"]) for r in ranked(rows)] == [(1, "c"), (2, "a"), (3, "d"), (None, "b")]
    for test_accuracies in ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]):  # any test accuracies: the same ranking
        again = [{**row, "accuracy": acc} for row, acc in zip(rows, test_accuracies)]
        assert [r["point"] for r in ranked(again)] == ["c", "a", "d", "b"]
