"""Resume: a run killed with SIGKILL restarts from its last complete checkpoint and ends where an
uninterrupted run with the same seed ends, tensor for tensor."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from _tiny_run import FAST, subprocess_env, train_command, train_rows_file
from qwen_cls.checkpointing import CHECKPOINT_FILES, last_complete_checkpoint, remove_incomplete_checkpoints


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
    from qwen_cls.model import build_tiny_model

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
    deadline = time.monotonic() + 120
    while last_complete_checkpoint(killed) is None:
        assert victim.poll() is None, "training ended before a checkpoint appeared"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
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
    from qwen_cls.cli import main

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a", "category": ["X", "Y"], "output": "X"}\n{"text": "b", "category": ["X", "Y"]}\n',
                   encoding="utf-8")
    assert main(["train", "--train", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"{bad}:2: missing field(s) output")
    assert not (tmp_path / "run").exists()
