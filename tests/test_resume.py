"""Resume: a run killed with SIGKILL restarts from its last complete checkpoint and ends where an
uninterrupted run with the same seed ends, tensor for tensor."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from _tiny_run import FAST, subprocess_env, train_command, train_rows_file
from safetensors.torch import load_file

from qwen_cls.resumable.checkpointing import CHECKPOINT_FILES, last_complete_checkpoint, remove_incomplete_checkpoints


def _fake_checkpoint(folder, files=CHECKPOINT_FILES):
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("x")


def test_last_complete_checkpoint_skips_incomplete_folders(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _fake_checkpoint(ckpts / "checkpoint-2")
    _fake_checkpoint(ckpts / "checkpoint-10")
    _fake_checkpoint(ckpts / "checkpoint-12", files=CHECKPOINT_FILES[1:])  # killed before trainer_state.json
    (ckpts / ".staging" / "checkpoint-14").mkdir(parents=True)
    # 10 > 2 numerically (not as strings); 12 is incomplete
    assert last_complete_checkpoint(tmp_path) == ckpts / "checkpoint-10"
    removed = remove_incomplete_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == [".staging", "checkpoint-12"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-10", "checkpoint-2"]
    assert last_complete_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.slow
def test_kill_9_then_resume_reaches_the_uninterrupted_adapter(tmp_path):
    from qwen_cls.model_builds.tiny import build_tiny_model

    build_tiny_model()  # build the shared cache once, before two processes want it
    train = train_rows_file(tmp_path)
    args = ["--train", str(train), "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "2",
            "--seed", "7", *FAST]
    env = subprocess_env()
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # Both start together (one core each); the second sleeps after each step so the kill lands mid-run.
    uninterrupted = subprocess.Popen(train_command(*args, "--out", str(whole)), env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(train_command(*args, "--out", str(killed), "--step-sleep", "1.5"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # a hang guard: the other test worker and a busy machine slow the start
    while last_complete_checkpoint(killed) is None:
        assert victim.poll() is None, "training ended before a checkpoint appeared"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "adapter").exists()  # it really died before the end
    step_at_kill = int(last_complete_checkpoint(killed).name.split("-")[1])
    assert step_at_kill < 6

    resumed = subprocess.run(train_command(*args, "--out", str(killed)), env=env, capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    out, _ = uninterrupted.communicate(timeout=180)
    assert uninterrupted.returncode == 0, out[-3000:]

    rank0 = json.loads((killed / "ranks" / "rank0.json").read_text())
    assert rank0["resumed_from"] == f"checkpoint-{step_at_kill}"
    assert rank0["global_step"] == 6
    # the resumed process trained only the remaining steps (batch 2, no accumulation: 1 batch per step)
    assert rank0["batches"] == 6 - step_at_kill
    assert json.loads((whole / "ranks" / "rank0.json").read_text())["batches"] == 6

    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # lora_A, lora_B x 7 projections x 2 layers
    assert all(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # trained: lora_B starts at zero
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-7), key

    # rotation: only the newest save_total_limit checkpoints remain, no staging leftovers
    for run in (whole, killed):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_train_reports_a_bad_row_before_loading_anything(tmp_path, capsys):
    from qwen_cls.commands.cli import main

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a", "category": ["X", "Y"], "output": "X"}\n{"text": "b", "category": ["X", "Y"]}\n',
                   encoding="utf-8")
    assert main(["train", "--train", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"{bad}:2: missing field(s) output")
    assert not (tmp_path / "run").exists()


# --- damaged checkpoints, and resuming with other settings -------------------------------------------------------

RESUME_ARGS = ["--max-steps", "4", "--save-steps", "2", "--save-total-limit", "2", "--seed", "7", *FAST]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (trained in this process, seconds)."""
    from qwen_cls.commands.cli import main

    folder = tmp_path_factory.mktemp("trained")
    train = train_rows_file(folder)
    out = folder / "run"
    assert main(["train", "--train", str(train), "--out", str(out), *RESUME_ARGS]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    return train, out


@pytest.fixture()
def run_copy(trained, tmp_path):
    import shutil

    train, out = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return train, copy


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.slow
def test_run_config_records_the_training_data_fingerprint(trained):
    import hashlib

    train, out = trained
    config = json.loads((out / "run_config.json").read_text())
    assert config["training"]["train_sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()
    recorded = json.loads((out / "checkpoints" / "checkpoint-2" / "train_config.json").read_text())
    assert recorded["train_sha256"] == config["training"]["train_sha256"] and recorded["lr"] == 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json",
                                     "scheduler.pt", "rng_state.pth"])
def test_damaged_newest_checkpoint_is_skipped_with_one_warning_naming_the_file(run_copy, trained, capsys, damaged):
    from qwen_cls.commands.cli import main
    from qwen_cls.resumable.checkpointing import checkpoint_problem, resume_checkpoint

    train, out = run_copy
    newest = out / "checkpoints" / "checkpoint-4"
    _truncate(newest / damaged)
    assert checkpoint_problem(newest).startswith(f"{newest / damaged}: ")
    assert resume_checkpoint(out) == (out / "checkpoints" / "checkpoint-2", [(newest, checkpoint_problem(newest))])
    capsys.readouterr()
    assert main(["train", "--train", str(train), "--out", str(out), *RESUME_ARGS]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(newest / damaged) in warnings[0], err
    kept = out / "damaged-checkpoints" / "checkpoint-4"
    assert f"moved to {kept}" in warnings[0] and (kept / damaged).is_file()  # kept, not deleted
    assert "Traceback" not in err and f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in err
    rank0 = json.loads((out / "ranks" / "rank0.json").read_text())
    assert rank0["resumed_from"] == "checkpoint-2" and rank0["global_step"] == 4 and rank0["batches"] == 2
    # the same adapter as the uninterrupted run, and checkpoint-4 written anew
    a = load_file(trained[1] / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)
    assert checkpoint_problem(newest) is None


@pytest.mark.slow
def test_no_loadable_checkpoint_starts_over_with_a_warning(run_copy, capsys):
    from qwen_cls.resumable.checkpointing import resume_checkpoint

    _, out = run_copy
    for name in ("checkpoint-2", "checkpoint-4"):
        _truncate(out / "checkpoints" / name / "trainer_state.json", keep=0.3)
    checkpoint, damaged = resume_checkpoint(out)
    assert checkpoint is None and [p.name for p, _ in damaged] == ["checkpoint-4", "checkpoint-2"]
    assert all("trainer_state.json: invalid JSON" in problem for _, problem in damaged)


@pytest.mark.slow
@pytest.mark.parametrize("change, keys", [
    (["--lr", "0.002"], ["lr"]),
    (["--batch-size", "4"], ["batch_size"]),
    (["--grad-accum", "2"], ["grad_accum"]),
    (["--max-length", "96"], ["max_length"]),
    (["--seed", "8"], ["seed"]),
    (["--limit", "20"], ["limit"]),
    (["--max-steps", "6"], ["max_steps"]),
    ("other-data", ["train", "train_sha256"]),
    ("same-path-new-contents", ["train_sha256"]),
])
def test_resume_with_other_settings_is_refused_naming_them(run_copy, tmp_path, capsys, change, keys):
    from qwen_cls.commands.cli import main

    train, out = run_copy
    args = ["train", "--train", str(train), "--out", str(out), *RESUME_ARGS]
    if change == "other-data":
        other = tmp_path / "other.jsonl"
        other.write_bytes(train.read_bytes().replace("。".encode(), "！".encode(), 1))
        args[2] = str(other)
    elif change == "same-path-new-contents":
        moved = tmp_path / "data.jsonl"
        moved.write_bytes(train.read_bytes())
        args[2] = str(moved)
        assert main(["train", "--train", str(moved), "--out", str(tmp_path / "r2"), *RESUME_ARGS]) == 0
        out = tmp_path / "r2"
        args[4] = str(out)
        moved.write_bytes(train.read_bytes().replace("。".encode(), "！".encode(), 1))
    else:
        # the last value of a repeated option wins with argparse
        args += change
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot resume from {out / 'checkpoints' / 'checkpoint-4'}: it was trained with "
                          "other settings: "), err
    named = [part.split(" (")[0] for part in err.split("settings: ", 1)[1].split(". Rerun")[0].split("; ")]
    assert named == keys
    assert "--no-resume" in err and "--resume-anyway" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched


@pytest.mark.slow
def test_resume_anyway_continues_with_a_warning(run_copy, capsys):
    from qwen_cls.commands.cli import main

    train, out = run_copy
    assert main(["train", "--train", str(train), "--out", str(out), *RESUME_ARGS, "--lr", "0.002",
                 "--resume-anyway"]) == 0
    err = capsys.readouterr().err
    assert "warning: resuming from checkpoint-4 with other settings (--resume-anyway): lr (checkpoint 0.0001, " \
           "now 0.002)" in err


@pytest.mark.slow
def test_no_resume_starts_over_without_the_old_checkpoints(run_copy, capsys):
    from qwen_cls.commands.cli import main

    train, out = run_copy
    assert main(["train", "--train", str(train), "--out", str(out), *RESUME_ARGS[2:], "--max-steps", "2",
                 "--lr", "0.002", "--no-resume"]) == 0
    assert "--no-resume: removed 2 checkpoint(s) of the earlier run" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert json.loads((out / "checkpoints" / "checkpoint-2" / "train_config.json").read_text())["lr"] == 0.002


# --- one writer per run dir: the lock ------------------------------------------------------------------------------

def test_train_into_a_locked_run_dir_exits_2_at_once_naming_the_holder(tmp_path, capsys):
    import fcntl

    from qwen_cls.commands.cli import main

    out = tmp_path / "run"
    with open(tmp_path / ".run.lock", "w") as held:  # what a running `qwen-cls run --out RUN` holds
        held.write("pid 4242, since 09:00\nqwen-cls run\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        assert main(["train", "--train", str(train_rows_file(tmp_path)), "--out", str(out), *FAST]) == 2
        assert time.monotonic() - start < 10  # refused before a model loads
    err = capsys.readouterr().err
    assert err == (f"error: {out} is being written by another `qwen-cls run` (pid 4242, since 09:00); wait for it "
                   "to finish or choose another --out\n")
    assert not out.exists()


@pytest.mark.slow
def test_two_trains_into_one_run_dir_the_second_exits_2_naming_the_first(tmp_path):
    from qwen_cls.model_builds.tiny import build_tiny_model

    build_tiny_model()  # the shared cache, before a process wants it
    out = tmp_path / "run"
    args = ["--train", str(train_rows_file(tmp_path)), "--out", str(out), "--max-steps", "4", "--save-steps", "2",
            "--seed", "7", *FAST]
    env = subprocess_env()
    first = subprocess.Popen(train_command(*args, "--step-sleep", "1"), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    lock = tmp_path / ".run.lock"
    while not (lock.is_file() and lock.read_text().startswith(f"pid {first.pid}, ")):  # held before the model loads
        assert first.poll() is None, "the first train ended before it held the lock"
        assert time.monotonic() < deadline, "no lock within 120 s"
        time.sleep(0.05)
    start = time.monotonic()
    second = subprocess.run(train_command(*args), env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert first.poll() is None  # refused while the first still trains: at once, not after waiting for it
    assert time.monotonic() - start < 60
    assert second.stderr.startswith(f"error: {out} is being written by another `qwen-cls train` (pid {first.pid}, ")
    assert len(second.stderr.strip().splitlines()) == 1
    output, _ = first.communicate(timeout=180)
    assert first.returncode == 0, output[-3000:]
    rank0 = json.loads((out / "ranks" / "rank0.json").read_text())
    assert rank0["global_step"] == 4 and rank0["batches"] == 4 and rank0["resumed_from"] is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not lock.exists()  # the lock file went with its holder
