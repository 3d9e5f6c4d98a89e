"""``qwen-cls run``: a run folder always holds one run.

A finished run is replaced only with ``--overwrite`` and only when the new run succeeds; a failed, interrupted
or killed run leaves the previous run intact or a folder marked ``RUN_INCOMPLETE``; a second run into a folder
being written exits 2 at once. papermill is replaced by a fake that writes what the notebooks write (a few
files per notebook), so each test takes seconds; one test kills a real ``qwen-cls run`` process with SIGKILL.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from qwen_cls.chain.locks import lock_path
from qwen_cls.chain.run_folder import failed_path, previous_path
from qwen_cls.commands.cli import main
from qwen_cls.run_record import RUN_INCOMPLETE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAST = ["-p", "swanlab_mode", "disabled"]


def fake_execute(fail_at: str | None = None, error: type[BaseException] = PapermillExecutionError,
                 sleep_at: str | None = None):
    """A stand-in for ``papermill.execute_notebook``: each notebook writes its executed copy and the files
    the real one writes, tagged with the run's seed (``fail_at``: that notebook raises after writing some)."""

    def execute(input_path, output_path, parameters=None, **kwargs):
        name = Path(input_path).name
        out = Path(parameters["out_dir"])
        seed = parameters.get("seed")
        Path(output_path).write_text(json.dumps({"notebook": name, "parameters": parameters}), encoding="utf-8")
        if name.startswith("01"):
            (out / "data").mkdir(exist_ok=True)
            (out / "data" / "train.jsonl").write_text(f'{{"seed": {seed}}}\n', encoding="utf-8")
        if sleep_at and name.startswith(sleep_at):
            (out / "notebooks" / "ready").write_text("x")  # tells the test that the run is half way
            time.sleep(600)
        if fail_at and name.startswith(fail_at):
            if name.startswith("03"):
                (out / "adapter").mkdir(exist_ok=True)
                (out / "adapter" / "adapter_model.safetensors").write_bytes(b"half")
            if error is PapermillExecutionError:
                raise PapermillExecutionError(3, 7, "train()", "RuntimeError", "boom", [])
            raise error()
        if name.startswith("03"):
            (out / "adapter").mkdir(exist_ok=True)
            (out / "adapter" / "adapter_model.safetensors").write_bytes(f"weights {seed}".encode())
            (out / "run_config.json").write_text(json.dumps({"seed": seed}), encoding="utf-8")
        if name.startswith("04"):  # 04 declares no seed: it evaluates what 03 trained
            (out / "metrics.json").write_text(json.dumps({"seed": seed_of(out / "run_config.json")}), encoding="utf-8")
        return None

    return execute


def run(out: Path, *extra: str, seed: int = 1) -> int:
    return main(["run", "--out", str(out), "--quiet", *FAST, "-p", "seed", str(seed), *extra])


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` with its bytes and mode (byte-identical means equal snapshots)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
            for p in sorted(folder.rglob("*"))}


def seed_of(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))["seed"] if path.exists() else None


def assert_one_run_per_folder(parent: Path) -> None:
    """No folder whose params.json and run_config.json (or metrics.json) come from different runs."""
    for folder in [p for p in parent.iterdir() if p.is_dir()]:
        params = folder / "params.json"
        if params.exists():
            for other in ("run_config.json", "metrics.json"):
                if (folder / other).exists():
                    assert seed_of(folder / other) == seed_of(params), (folder, other)


@pytest.fixture()
def finished(tmp_path, monkeypatch):
    """A finished (fake) run with seed 1 in tmp_path/run."""
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute())
    out = tmp_path / "run"
    assert run(out, seed=1) == 0
    assert not (out / RUN_INCOMPLETE).exists() and seed_of(out / "run_config.json") == 1
    return out


def test_rerun_over_a_finished_run_without_overwrite_exits_2_and_changes_nothing(finished, capsys):
    before = snapshot(finished.parent)
    capsys.readouterr()
    assert run(finished, seed=2) == 2
    err = capsys.readouterr().err
    assert f"{finished} already holds a finished run" in err and "--overwrite" in err
    assert snapshot(finished.parent) == before  # byte for byte; no lock file, no .previous left


def test_overwrite_replaces_a_finished_run_whole(finished):
    assert run(finished, "--overwrite", seed=2) == 0
    assert seed_of(finished / "params.json") == seed_of(finished / "run_config.json") == 2
    assert json.loads((finished / "params.json").read_text())["out_dir"] == str(finished)  # no staging path
    assert sorted(p.name for p in finished.parent.iterdir()) == ["run"]
    assert not (finished / RUN_INCOMPLETE).exists()


@pytest.mark.parametrize("fail_at", ["03", "04"])
def test_failed_overwrite_keeps_the_previous_run_and_marks_the_attempt(finished, monkeypatch, capsys, fail_at):
    before = snapshot(finished)
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute(fail_at=fail_at))
    capsys.readouterr()
    assert run(finished, "--overwrite", seed=2) == 1
    err = capsys.readouterr().err
    failed = failed_path(finished)
    assert "failed at cell 7: RuntimeError: boom" in err
    assert f"executed copy: {failed / 'notebooks'}" in err and "still holds the previous run" in err
    assert snapshot(finished) == before  # the previous run, untouched
    assert (failed / RUN_INCOMPLETE).is_file() and seed_of(failed / "params.json") == 2
    assert not previous_path(finished).exists() and not lock_path(finished).exists()
    assert_one_run_per_folder(finished.parent)
    # the next successful run replaces the run and clears the failed attempt
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute())
    assert run(finished, "--overwrite", seed=3) == 0
    assert sorted(p.name for p in finished.parent.iterdir()) == ["run"]
    assert seed_of(finished / "params.json") == seed_of(finished / "run_config.json") == 3


def test_failed_first_run_is_marked_incomplete_and_replaced_without_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute(fail_at="03"))
    assert run(out) == 1
    assert f"{out} is marked incomplete ({RUN_INCOMPLETE})" in capsys.readouterr().err
    assert "This run folder is incomplete" in (out / RUN_INCOMPLETE).read_text() and (out / "params.json").exists()
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute())
    assert run(out, seed=5) == 0  # an unfinished run is no finished run: no --overwrite needed
    assert not (out / RUN_INCOMPLETE).exists() and seed_of(out / "run_config.json") == 5


def test_ctrl_c_prints_one_line_exits_130_and_keeps_the_previous_run(finished, monkeypatch, capsys):
    before = snapshot(finished)
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute(fail_at="03", error=KeyboardInterrupt))
    capsys.readouterr()
    assert run(finished, "--overwrite", seed=2) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("interrupted; ")
    assert "still holds the previous run" in err
    assert snapshot(finished) == before
    assert (failed_path(finished) / RUN_INCOMPLETE).is_file()


def test_a_second_run_into_a_locked_folder_exits_2_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute(fail_at="00"))  # must never be reached
    out = tmp_path / "run"
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 4242, since now\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        start = time.monotonic()
        assert run(out) == 2
        assert time.monotonic() - start < 30
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert f"{out} is being written by another `qwen-cls run` (pid 4242" in err
    assert not out.exists()


def test_a_stale_lock_file_blocks_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute())
    out = tmp_path / "run"
    lock_path(out).write_text("pid 1, since long ago\n")  # left by a killed run: nobody holds the flock
    assert run(out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_folder_with_other_files_is_never_taken(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute(fail_at="00"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    before = snapshot(tmp_path)
    assert run(out, "--overwrite") == 2
    assert "is not a run folder (it holds thesis.tex" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert run(tmp_path / "f" / "run") == 2
    assert "not a folder" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


KILLABLE = """
import sys
sys.path.insert(0, {here!r})
import papermill, test_run_folder as t
papermill.execute_notebook = t.fake_execute(sleep_at="03")
sys.exit(t.run(__import__("pathlib").Path({out!r}), "--overwrite", seed=2))
"""


def start_half_way(finished: Path) -> subprocess.Popen:
    """A real ``qwen-cls run --overwrite`` process over ``finished``, returned once it sleeps in notebook 03."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE.format(here=str(HERE), out=str(finished))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (finished / "notebooks" / "ready").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run never reached notebook 03"
        time.sleep(0.05)
    return proc


@pytest.mark.subprocess
def test_kill_9_half_way_then_next_run_restores_the_previous_run(finished, capsys):
    """A real ``qwen-cls run`` process, killed with SIGKILL in notebook 03 while replacing a finished run."""
    before = snapshot(finished)
    victim = start_half_way(finished)
    # half way: the folder is marked, the previous run waits aside, a second run is turned away
    assert (finished / RUN_INCOMPLETE).is_file() and previous_path(finished).is_dir()
    assert run(finished, "--overwrite", seed=3) == 2
    assert "is being written by another" in capsys.readouterr().err
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert_one_run_per_folder(finished.parent)  # the marked folder has the new params.json and no run_config
    # the next run (kill -9 left a lock file, but no lock) repairs the folder: the previous run comes back
    assert run(finished, seed=3) == 2  # ... and it is a finished run again: no --overwrite, no change
    err = capsys.readouterr().err
    assert f"restored the previous run into {finished}" in err and "already holds a finished run" in err
    assert snapshot(finished) == before
    assert (failed_path(finished) / RUN_INCOMPLETE).is_file()
    assert not previous_path(finished).exists()


@pytest.mark.subprocess
def test_sigterm_is_handled_like_ctrl_c(finished):
    before = snapshot(finished)
    proc = start_half_way(finished)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [f"interrupted; {finished} still holds the previous run, unchanged; this "
                                        f"attempt's files (marked {RUN_INCOMPLETE}) are in {failed_path(finished)}"]
    assert snapshot(finished) == before and not lock_path(finished).exists()


def test_a_project_folder_with_git_and_run_like_names_is_never_replaced(tmp_path, capsys):
    """``.git`` + ``data/`` + ``notebooks/`` look like run files by name: still not a run, even with --overwrite."""
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "data").mkdir()
    (project / "data" / "train.jsonl").write_text('{"x": 1}\n')
    (project / "notebooks").mkdir()
    before = {str(p.relative_to(project)): p.read_bytes() if p.is_file() else None for p in sorted(project.rglob("*"))}
    assert main(["run", "--out", str(project), "--overwrite"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    after = {str(p.relative_to(project)): p.read_bytes() if p.is_file() else None for p in sorted(project.rglob("*"))}
    assert after == before
    bare = tmp_path / "bare"  # run-like names but no params.json
    (bare / "data").mkdir(parents=True)
    assert main(["run", "--out", str(bare), "--overwrite"]) == 2
    assert "no params.json" in capsys.readouterr().err and (bare / "data").is_dir()
